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
def cpu_has_bf16_matrix_units() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX, Sapphire Rapids and
    later): there oneDNN runs a bf16 matmul at several times float32's rate, where other CPUs
    emulate it far below. torch has no public probe; its private one is absent in some builds."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if callable(probe) else False


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype ``t``'s device computes matmuls in now: autocast's when it is on there, else
    ``t``'s own."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype
