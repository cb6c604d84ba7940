"""Time to first step: what a training run imports before its first step, and the peak FLOP/s
figure (for MFU) read from a per-machine cache instead of a matmul measurement in every run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.metrics import (
    PlotWriter,
    peak_cache_path,
    peak_flops,
    peak_key,
    quieter_now,
    write_plot,
)

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
# Imported only by the code that needs them: the plot at an evaluation, wandb when a run logs to it,
# datasets for an `hf` source, transformers and lm-eval for `train.py eval`.
HEAVY = ("matplotlib", "wandb", "datasets", "transformers", "lm_eval", "pyarrow")


@pytest.mark.parametrize("module", ["trainer.cli", "trainer.run"])
def test_training_entry_imports_no_heavy_module(module: str) -> None:
    """`train.py` imports trainer.cli, which imports trainer.run for a training run: neither
    pulls in a module the first step does not need."""
    code = f"import sys, {module}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_peak_is_measured_once_then_read_from_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "sub" / "peak_flops.json"
    cache.parent.mkdir()
    cache.write_text("{not json")  # unreadable (a torn write by hand): measured again, replaced
    first = peak_flops(CPU, None, None, cache=cache)
    entry = json.loads(cache.read_text())[peak_key(CPU, torch.float32)]
    assert first > 1e8 and entry["flops"] == first  # a measured figure, as it was stored
    # A figure no matmul would measure: returned as is, so nothing was measured.
    entry["flops"] = 1.25e9
    cache.write_text(json.dumps({peak_key(CPU, torch.float32): entry}))
    assert peak_flops(CPU, None, None, cache=cache) == 1.25e9
    assert peak_flops(CPU, torch.float32, None, cache=cache) == 1.25e9  # None means float32


def test_a_configured_peak_measures_nothing_and_writes_no_cache(tmp_path: Path) -> None:
    cache = tmp_path / "peak_flops.json"
    assert peak_flops(CPU, None, 2.5e11, cache=cache) == 2.5e11
    assert not cache.exists()


def test_the_figure_is_kept_per_device_dtype_threads_and_torch_version() -> None:
    key = peak_key(CPU, torch.float32)
    assert key != peak_key(CPU, torch.bfloat16) and torch.__version__ in key
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert peak_key(CPU, torch.float32) != key  # a CPU's peak scales with its threads
    finally:
        torch.set_num_threads(threads)


def test_a_busy_machines_figure_is_measured_again_when_quieter() -> None:
    assert quieter_now(measured_at=7.5, load=0.4, cores=2)
    assert not quieter_now(measured_at=7.5, load=3.0, cores=2)  # still busier than its cores
    assert not quieter_now(measured_at=1.2, load=0.5, cores=2)  # about as quiet as then
    assert not quieter_now(measured_at=0.3, load=0.0, cores=2)


def test_the_cache_lives_in_the_user_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert peak_cache_path() == tmp_path / "qwen3-pretrain" / "peak_flops.json"


def test_plot_is_written_with_its_panels(tmp_path: Path) -> None:
    records = [
        {"step": 1, "train_loss": 9.0},
        {"step": 2, "train_loss": 8.0, "val_loss": 8.5, "val_acc": 0.1, "val_ppl": 4900.0},
    ]
    path = tmp_path / "metrics.png"
    write_plot(records, path, title="run")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.png"]  # no temp file left


def test_plots_are_drawn_in_the_background_in_order_and_errors_reach_wait(tmp_path: Path) -> None:
    records = [{"step": 1, "train_loss": 9.0}]
    plots = PlotWriter()
    path = tmp_path / "metrics.png"
    plots.draw(records, path)
    plots.draw([*records, {"step": 2, "train_loss": 8.0}], path)  # waits for the first
    plots.wait()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.png"]
    plots.draw(records, tmp_path / "missing-dir" / "metrics.png")
    with pytest.raises(FileNotFoundError):
        plots.wait()
    plots.wait()  # reported once


@pytest.mark.slow
def test_bench_first_step_prints_medians_and_ratio() -> None:
    res = subprocess.run(
        [sys.executable, "benchmarks/bench_first_step.py", "--quick", "--threads", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [ln.split("|")[1:-1] for ln in res.stdout.splitlines() if ln.startswith("| ")]
    table = {r[0].strip(): r for r in rows[1:]}
    assert set(table) == {"python -c 'import torch'", "train.py trainer.max_steps=1"}
    run = table["train.py trainer.max_steps=1"]
    assert float(run[1]) > float(table["python -c 'import torch'"][1]) > 0
    floor = float(table["python -c 'import torch'"][1])
    assert float(run[3]) == pytest.approx(float(run[1]) / floor, abs=0.05)  # one round
