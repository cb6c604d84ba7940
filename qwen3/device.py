"""Choosing the device to run on, and the dtype computations run in there."""

from __future__ import annotations

import functools

import torch


def pick_device(pref: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; any other value is used as given."""
    if pref != "auto":
        if pref.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(
                f"device={pref!r} asked for, but CUDA is not available; use device=auto or cpu."
            )
        if pref == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError(
                "device='mps' asked for, but MPS is not available; use device=auto or cpu."
            )
        return torch.device(pref)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.cache
def cpu_has_native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware: AMX tiles (Intel Sapphire Rapids
    and later) or AVX-512 BF16 dot products (AMD Zen 4 and later, Intel Cooper Lake). There
    oneDNN runs a bf16 matmul at 2x (AVX-512 BF16) to several times (AMX) float32's rate; other
    CPUs emulate it far below (benchmarks/results/muon.md). torch has no public probe; its
    private ones are absent in some builds, and then the answer is no."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(
        bool(probe()) for name in probes if callable(probe := getattr(torch.cpu, name, None))
    )


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype ``t``'s device computes matmuls in now: autocast's when it is on there, else
    ``t``'s own."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype
