"""Mixed precision: which autocast dtype to use, and a GradScaler for fp16. Weights stay float32."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from trainer.typed_config import ConfigError

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """The resolved ``trainer.precision``: ``name`` is fp32, bf16 or fp16."""

    name: str
    device_type: str
    dtype: torch.dtype | None  # autocast dtype; None = plain float32
    scaler: torch.amp.GradScaler | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward-pass context: autocast to ``dtype``, or nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """``auto``: bf16 on a CUDA GPU that supports it, float32 elsewhere (on CPUs without AMX
    bf16 matmuls run at about half the float32 speed). ``fp16`` needs CUDA and uses a GradScaler."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"trainer.precision=fp16 needs a CUDA GPU (device is {device}); "
            "use trainer.precision=fp32 (or bf16)"
        )
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "trainer.precision=bf16: this GPU has no bfloat16 support; use trainer.precision=fp16"
        )
    scaler = torch.amp.GradScaler("cuda") if name == "fp16" else None
    return Precision(name, device.type, _DTYPES[name], scaler)
