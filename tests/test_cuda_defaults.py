"""CUDA defaults decided on any machine: TF32 matmuls, which SDPA calls get grouped KV heads as
they are, and the server's default dtype. Each decision is a function of device, dtype and
shapes, so it is tested here on CPU; benchmarks/gpu_check.py runs them on a GPU."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend

import qwen3.layers
from qwen3 import Qwen3, Qwen3Config
from qwen3.layers import sdpa_native_gqa
from serving.served_model import serving_dtype
from tests.test_trainer_support import compose_run_config
from trainer.build import apply_runtime_settings


@pytest.mark.parametrize(
    ("device", "dtype", "mask", "head_dim", "native"),
    [
        ("cuda", torch.bfloat16, False, 128, True),  # flash: takes grouped heads
        ("cuda", torch.float16, False, 64, True),
        ("cuda", torch.float32, False, 128, False),  # flash has no fp32: efficient kernel
        ("cuda", torch.bfloat16, True, 128, False),  # flash takes no mask (padded batches)
        ("cuda", torch.bfloat16, False, 512, False),  # beyond flash's head_dim limit
        ("cuda", torch.bfloat16, False, 100, False),  # not a multiple of 8
        ("cpu", torch.float32, True, 128, True),  # CPU flash: any dtype, masks too
        ("cpu", torch.bfloat16, False, 16, True),
    ],
)
def test_sdpa_gets_grouped_heads_only_where_a_kernel_honours_them(
    device: str, dtype: torch.dtype, mask: bool, head_dim: int, native: bool
) -> None:
    assert sdpa_native_gqa(device, dtype, mask, head_dim) is native


def test_cpu_sdpa_runs_its_flash_kernel_for_grouped_heads() -> None:
    """What the CPU branch relies on, asked of torch's own dispatcher: fp32, causal or masked,
    grouped heads go to the fused kernel, not the math one."""
    q, k = torch.randn(2, 4, 32, 16), torch.randn(2, 2, 32, 16)
    mask = torch.ones(2, 1, 32, 32, dtype=torch.bool)
    for kwargs in ({"is_causal": True}, {"attn_mask": mask}):
        choice = torch._fused_sdp_choice(q, k, k, enable_gqa=True, **kwargs)
        assert SDPBackend(choice) == SDPBackend.FLASH_ATTENTION


def test_repeated_kv_heads_give_the_native_gqa_output(monkeypatch) -> None:
    """The repeat path (what CUDA fp32 or masked calls take) equals the grouped one, with a
    padding mask (a KV-cache prefill) and without (training)."""
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
    )
    model = Qwen3(config).eval()
    ids = torch.randint(0, 97, (2, 12))
    pad = torch.ones(2, 12, dtype=torch.long)
    pad[1, :3] = 0  # left padding: the masked SDPA call
    from qwen3.cache import KVCache

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            cache = KVCache(config, batch_size=2, max_len=16)
            return model(ids), model(ids, cache=cache, attention_mask=pad)

    grouped = run()
    monkeypatch.setattr(qwen3.layers, "sdpa_native_gqa", lambda *a: False)
    repeated = run()
    for a, b in zip(grouped, repeated, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("tf32", "expected"), [(True, "high"), (False, "highest")])
def test_tf32_on_cuda_follows_trainer_tf32(tf32: bool, expected: str) -> None:
    before = torch.get_float32_matmul_precision()
    cfg = compose_run_config([f"trainer.tf32={str(tf32).lower()}"])
    try:
        torch.set_float32_matmul_precision("medium")
        apply_runtime_settings(cfg, torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == "medium"  # CPU: left alone
        apply_runtime_settings(cfg, torch.device("cuda"))  # only sets a flag: no GPU needed
        assert torch.get_float32_matmul_precision() == expected
    finally:
        torch.set_float32_matmul_precision(before)


def test_server_defaults_to_bf16_on_cuda_and_keeps_an_explicit_choice() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert serving_dtype(None, cuda, bf16_supported=True) == torch.bfloat16
    assert serving_dtype(None, cuda, bf16_supported=False) is None  # as saved
    assert serving_dtype(None, cpu, bf16_supported=True) is None
    assert serving_dtype("float32", cuda, bf16_supported=True) == torch.float32
    assert serving_dtype("float16", cpu, bf16_supported=False) == torch.float16
