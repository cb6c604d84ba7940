"""``train.py plan``: its text and JSON, fits or not, the largest micro-batch, MoE counts, the
estimate against a measured CPU step, and the warning a training run prints first."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from qwen3 import Qwen3
from qwen3.moe import Experts
from trainer.cli import main
from trainer.plan import Target, parse_size, plan_run, warn_if_unfit

REPO = Path(__file__).resolve().parents[1]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_plan", REPO / "benchmarks/bench_plan.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plan_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert main(["train.py", "plan", *args, "format=json"], 0.0) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    data: dict[str, object] = json.loads(last)
    return data


def test_plan_text_names_every_part(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "train.py",
            "plan",
            "model=qwen3-0.6b",
            "trainer.seq_len=4096",
            "trainer.batch_size=1",
            "devices=1",
            "device_memory=80GB",
        ],
        0.0,
    )
    out = capsys.readouterr().out
    assert code == 0
    for part in (
        "parameters",
        "tokens per step",
        "FLOPs per token",
        "weights",
        "gradients",
        "optimizer state",
        "activations (none)",
        "loss chunk",
        "peak",
        "fits",
        "largest micro-batch",
        "time per step",
        "assumed MFU",
        "to the budget",
    ):
        assert part in out, part
    assert "fits              yes" in out
    assert "tokens per step   4,096" in out


def test_plan_json_last_line(capsys: pytest.CaptureFixture[str]) -> None:
    data = _plan_json(capsys, "model=qwen3-0.6b", "trainer.seq_len=4096", "devices=1")
    for key in (
        "peak_bytes_per_device",
        "fits",
        "max_micro_batch",
        "memory_bytes_per_device",
        "params_total",
        "params_active",
        "step_seconds",
        "total_seconds",
    ):
        assert key in data, key
    mem = data["memory_bytes_per_device"]
    assert isinstance(mem, dict) and set(mem) >= {
        "weights",
        "grads",
        "optimizer",
        "activations",
        "loss_chunk",
        "muon_work",
    }
    # 596 M parameters in float32: weights and gradients 4 bytes each
    assert mem["weights"] == mem["grads"] == 4 * data["params_total"]  # type: ignore[operator]


def test_fits_and_does_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    small = _plan_json(capsys, "model=qwen3-0.6b", "trainer.batch_size=1", "trainer.seq_len=2048")
    assert small["fits"] is True and small["max_micro_batch"] >= 1  # type: ignore[operator]
    # 8 B parameters on one 80 GB GPU: 16 bytes per parameter before any activation
    big = _plan_json(capsys, "model=qwen3-8b", "trainer.batch_size=1", "devices=1")
    assert big["fits"] is False and big["max_micro_batch"] == 0
    assert str(big["suggestion"]).startswith("none fits: more devices")  # nothing to shard over
    ddp = _plan_json(capsys, "model=qwen3-8b", "trainer.batch_size=1", "devices=8")
    assert ddp["fits"] is False and "trainer.fsdp=true" in str(ddp["suggestion"])
    sharded = _plan_json(
        capsys, "model=qwen3-8b", "trainer.batch_size=1", "trainer.fsdp=true", "devices=8"
    )
    assert sharded["fits"] is True and sharded["mode"] == "FSDP"
    assert sharded["peak_bytes_per_device"] < ddp["peak_bytes_per_device"]  # type: ignore[operator]


def test_max_micro_batch_grows_with_memory_and_checkpointing() -> None:
    bench = _bench()
    by_memory = []
    for gb in (24, 40, 80, 141):
        cfg = bench.run_config(["model=qwen3-0.6b", "trainer.seq_len=4096"])
        by_memory.append(plan_run(cfg, Target(device_memory=gb * 10**9)).max_micro_batch)
    assert by_memory == sorted(by_memory) and by_memory[-1] > by_memory[0]
    by_mode = []
    peaks = []
    for mode in ("none", "selective", "full"):
        cfg = bench.run_config(
            ["model=qwen3-0.6b", "trainer.seq_len=4096", f"trainer.activation_checkpointing={mode}"]
        )
        plan = plan_run(cfg, Target())
        by_mode.append(plan.max_micro_batch)
        peaks.append(plan.memory.peak)
    assert by_mode == sorted(by_mode) and by_mode[0] < by_mode[-1]
    assert peaks == sorted(peaks, reverse=True)
    # at the largest micro-batch it fits; one more does not
    cfg = bench.run_config(["model=qwen3-0.6b", "trainer.seq_len=4096"])
    best = plan_run(cfg, Target()).max_micro_batch
    over = bench.run_config(
        ["model=qwen3-0.6b", "trainer.seq_len=4096", f"trainer.batch_size={best + 1}"]
    )
    at = bench.run_config(
        ["model=qwen3-0.6b", "trainer.seq_len=4096", f"trainer.batch_size={best}"]
    )
    assert plan_run(at, Target()).fits and not plan_run(over, Target()).fits


def test_moe_active_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    data = _plan_json(capsys, "model=tiny-moe")
    bench = _bench()
    cfg = bench.run_config(["model=tiny-moe"])
    vocab = data["params_total"]
    with torch.device("meta"):
        from trainer.budget import planned_vocab_size

        model = Qwen3(
            __import__("dataclasses").replace(
                cfg.model, vocab_size=planned_vocab_size(cfg.model, cfg.data, None)
            )
        )
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    per_expert = sum(m.gate_up_proj.numel() + m.down_proj.numel() for m in experts)
    unused = per_expert * (1 - cfg.model.num_experts_per_tok / cfg.model.num_experts)
    assert data["params_total"] == model.num_params() == vocab
    assert data["params_active"] == model.num_params() - round(unused)
    # Qwen3-30B-A3B: 30.5 B parameters, 3.3 B active (its model card)
    big = _plan_json(capsys, "model=qwen3-30b-a3b")
    assert abs(big["params_total"] / 30.5e9 - 1) < 0.01  # type: ignore[operator]
    assert abs(big["params_active"] / 3.3e9 - 1) < 0.03  # type: ignore[operator]


def test_estimate_within_15_percent_of_a_measured_cpu_step() -> None:
    bench = _bench()
    for mode in ("none", "full"):
        cfg = bench.run_config(
            [
                "model=tiny",
                "trainer.batch_size=4",
                "trainer.seq_len=128",
                "trainer.device=cpu",
                f"trainer.activation_checkpointing={mode}",
            ]
        )
        estimate, measured = bench.estimated_peak(cfg), bench.measured_peak(cfg)
        assert abs(estimate / measured - 1) <= 0.15, (mode, estimate, measured)


def test_warning_before_a_run_that_will_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _bench().run_config(["model=qwen3-0.6b", "trainer.seq_len=4096", "trainer.batch_size=16"])
    message = warn_if_unfit(cfg, torch.device("cuda"), 1, memory_bytes=80 * 10**9)
    assert message is not None and message in capsys.readouterr().err
    assert "will likely run out of memory" in message and "trainer.batch_size=" in message
    assert "trainer.grad_accum=" in message  # the global batch is kept
    assert warn_if_unfit(cfg, torch.device("cuda"), 1, memory_bytes=1000 * 10**9) is None
    assert warn_if_unfit(cfg, torch.device("cpu"), 1) is None  # a CPU has no fixed budget
    # the run calls it before any data is read
    assert "warn_if_unfit(cfg, device, dist.world_size)" in (REPO / "trainer/run.py").read_text()


@pytest.mark.parametrize(
    ("arg", "problem"),
    [
        ("devices=0", "devices="),
        ("device_memory=lots", "device_memory="),
        ("format=yaml", "format="),
        ("mfu=2", "mfu="),
        ("gpu=potato", "gpu="),
    ],
)
def test_bad_plan_options_are_one_line(
    capsys: pytest.CaptureFixture[str], arg: str, problem: str
) -> None:
    assert main(["train.py", "plan", arg], 0.0) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: ") and problem in err and "\n" not in err


def test_sizes() -> None:
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("141GiB") == 141 * 2**30
    assert parse_size("1.5TB") == 1_500_000_000_000
    with pytest.raises(ValueError):
        parse_size("80 gigs")
    assert sys.modules  # keep the import list honest
