"""Tokens per second and model FLOPs utilisation (MFU) against a peak FLOP/s figure."""

from __future__ import annotations

import time

import torch

# Dense bf16 tensor-core peaks (FLOP/s) of common GPUs, from the vendors' data sheets.
_GPU_BF16_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024
) -> float:
    """FLOP/s of a square ``n`` x ``n`` matmul on ``device``: the best of a few timed repeats.

    A peak is what the hardware can do, so the fastest repeat counts (a median taken while
    another process shares the cores underestimates it and pushes MFU past 100%).
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 8 if device.type == "cpu" else 50

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.mm(a, b)
    sync()
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 * reps / min(times)


def peak_flops(device: torch.device, dtype: torch.dtype | None, configured: float | None) -> float:
    """``configured`` if set; on a known GPU its data-sheet bf16 peak; else measured once."""
    if configured:
        return float(configured)
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key, value in _GPU_BF16_PEAKS.items():
            if key in name:
                return value
    return measure_matmul_flops(device, dtype or torch.float32)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Fraction of ``peak`` the training step reaches."""
    return tokens_per_s * flops_per_token / peak
