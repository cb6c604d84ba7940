"""int8 inference (qwen3.quantize): logits close to float32, KV-cache generation, evaluation,
the demo and the server with int8 weights, and the one-line refusals of what it cannot do."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from test_serve_support import build_tiny_checkpoint, run_serve

from qwen3 import Qwen3, Qwen3Config, Sampling, generate
from qwen3.quantize import Int8Linear, quantize, quantize_int8
from serving.launch import serve_in_subprocess
from trainer.cli import QUANTIZE_IN_TRAINING, run_subcommand, unknown_override

# Small, but wide enough that per-row int8 weights keep the logits close (an int8 weight's
# rounding error is at most half a step of its row's 255 levels).
CONFIG = Qwen3Config(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=256,
)


@pytest.fixture(scope="module")
def fp32() -> Qwen3:
    torch.manual_seed(0)
    model = Qwen3(CONFIG).eval()
    # Scale the (tied) embedding and head up: logits spanning tens of nats, not hundredths.
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
    return model


@pytest.fixture(scope="module")
def int8(fp32: Qwen3) -> Qwen3:
    return quantize_int8(copy.deepcopy(fp32))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("quantize") / "tiny")


def test_every_linear_is_int8_and_the_logits_stay_close(fp32: Qwen3, int8: Qwen3) -> None:
    linears = [m for m in int8.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == []
    assert sum(isinstance(m, Int8Linear) for m in int8.modules()) == 2 * 7 + 1  # 7 a layer + head
    assert int8.model.embed_tokens.weight.dtype == torch.float32  # the lookup stays float
    ids = torch.randint(0, CONFIG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, out = fp32(ids), int8(ids)
    # Tolerance: 3% of the largest logit; measured 0.6% (int8 weights and int8 inputs per call).
    scale = ref.abs().max()
    assert (out - ref).abs().max() <= 0.03 * scale
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_greedy_generation_with_the_kv_cache_matches_full_recompute(int8: Qwen3) -> None:
    prompt = [5, 17, 3, 99, 42]
    cached = generate(int8, [prompt], Sampling(12, temperature=0))[0]
    assert len(cached) == 12
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(12):  # no cache: the whole sequence each step
            ids = torch.cat([ids, int8(ids)[:, -1:].argmax(-1)], dim=1)
    assert cached == ids[0, len(prompt) :].tolist()
    # A batch of two prompts of different lengths (left padding, masked) runs too.
    both = generate(int8, [prompt, [7, 8]], Sampling(6, temperature=0))
    assert both[0] == cached[:6]


def test_the_evaluation_loss_of_int8_is_within_a_percent(fp32: Qwen3, int8: Qwen3) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, CONFIG.vocab_size, (2, 32), generator=g)
    y = torch.randint(0, CONFIG.vocab_size, (2, 32), generator=g)
    with torch.no_grad():
        ref, out = fp32(x, targets=y), int8(x, targets=y)
        stats = int8(x, targets=y, token_stats=True)
    assert abs(out - ref) <= 0.01 * ref
    assert torch.allclose(stats[..., 0].mean(), out)


def test_demo_with_int8(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [f"ckpt={tiny}", 'prompts=["Once upon"]', "temperature=0", "max_new_tokens=6"]
    assert run_subcommand("demo", [*args, "quantize=int8"]) == 0
    out = capsys.readouterr().out
    assert "M parameters, int8)" in out and "Once upon" in out


def test_the_server_with_int8_answers_a_completion(tiny: Path) -> None:
    with serve_in_subprocess(tiny, "--quantize", "int8") as url:
        body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] in ("length", "stop") and isinstance(choice["text"], str)
    assert response.json()["usage"]["completion_tokens"] >= 1


def test_refusals_are_one_line(fp32: Qwen3, int8: Qwen3) -> None:
    with pytest.raises(ValueError, match=r"^quantize='int4' is not .* choose int8, or leave"):
        quantize(copy.deepcopy(fp32), "int4")
    assert quantize(fp32, None) is fp32
    training = copy.deepcopy(fp32).train()
    with pytest.raises(ValueError, match=r"is for inference: call model\.eval\(\) first"):
        quantize_int8(training)
    with pytest.raises(ValueError, match="starts from float32 weights, not bfloat16"):
        quantize_int8(copy.deepcopy(fp32).to(torch.bfloat16))
    with torch.device("meta"):
        moe = Qwen3(Qwen3Config.from_preset("tiny-moe"))
    with pytest.raises(ValueError, match="dense Qwen3 models only"):
        quantize_int8(moe.eval())
    trained = copy.deepcopy(int8).train()
    with pytest.raises(ValueError, match="int8-quantized model cannot be trained"):
        trained(torch.tensor([[1, 2]]), targets=torch.tensor([[2, 3]]))
    # Training runs have no quantize key: the one line says where it belongs.
    assert unknown_override(["model=tiny", "quantize=int8"]) == QUANTIZE_IN_TRAINING
    assert unknown_override(["+quantize=int8"]) == QUANTIZE_IN_TRAINING


def test_cli_refusals_are_one_line(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_subcommand("demo", [f"ckpt={tiny}", "quantize=int4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "quantize='int4' is not" in err and "\n" not in err
    res = run_serve("--ckpt", str(tiny), "--quantize", "int8", "--dtype", "bfloat16")
    assert res.returncode == 2
    assert "error: --quantize int8 starts from float32 weights, not bfloat16" in res.stderr
    res = run_serve("--ckpt", str(tiny), "--quantize", "int8", "--device", "cuda")
    assert res.returncode == 2 and "runs on the CPU only" in res.stderr
    res = run_serve("--ckpt", str(tiny), "--quantize", "int4")
    assert res.returncode == 2 and "invalid choice: 'int4'" in res.stderr


@pytest.mark.slow
def test_bench_quantize_prints_the_three_weights_and_their_ratios() -> None:
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quantize.py"
    args = [sys.executable, str(bench), "--quick", "--threads", "1"]
    res = subprocess.run(args, cwd=bench.parents[1], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [ln.split("|")[1:-1] for ln in res.stdout.splitlines() if ln.startswith("| tiny")]
    assert [r[1].strip() for r in rows] == ["fp32", "bf16", "int8"]
    assert rows[0][3].strip() == "1.00x" and all(float(r[4]) > 0 for r in rows)
