"""int8 inference: a trained Qwen3's linear layers with int8 weights, for decoding on a CPU.

``quantize_int8(model)`` replaces every ``nn.Linear`` of the decoder layers and the LM head by
an :class:`Int8Linear`: int8 weights with one float scale per output row, run by torch's own
int8 CPU kernel (fbgemm's dynamically quantized linear, which also quantizes each call's input
to int8). The embedding and the norms keep their float32 weights. A quantized model is for
inference only (``generate``, the server, an evaluation); it cannot be trained or saved back.

Why torch's kernel and not torchao's ``Int8WeightOnlyConfig``: on the AVX2 CPUs this project
targets, torchao's eager int8 weight-only linear converts the whole weight to float for every
call and runs slower than float32 (also under ``torch.compile``), whereas fbgemm's int8 kernel
decodes faster than float32 (figures in benchmarks/results/quantize.md).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from qwen3.model import Qwen3

QUANTIZE_CHOICES = ("int8",)


class Int8Linear(nn.Module):
    """A bias-free or biased linear layer whose weight is stored in int8 (per output row scales)
    and applied by torch's int8 CPU kernel. ``weight`` dequantizes it for the code paths that
    take the matrix itself (the fused loss of ``model(x, targets=y)``, i.e. an evaluation)."""

    def __init__(self, linear: nn.Linear) -> None:
        # Imported here: the trainer's config imports this module, and a training run has no
        # use for torch's quantization modules (they add to its start-up).
        from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
        from torch.ao.quantization.qconfig import per_channel_dynamic_qconfig

        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # from_float reads the scheme from a `qconfig` attribute: int8 weights, a scale per row
        linear.qconfig = per_channel_dynamic_qconfig  # type: ignore[assignment]  # torch's own
        try:
            with warnings.catch_warnings():
                # torch 2.13 marks its quantized tensors deprecated (no faster int8 CPU kernel
                # replaces them yet: see the module docstring); it would warn once per layer.
                warnings.simplefilter("ignore", UserWarning)
                # torch leaves from_float unannotated; it returns the int8 module
                self.int8 = DynamicInt8Linear.from_float(linear)  # type: ignore[no-untyped-call]
        finally:
            del linear.qconfig

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise ValueError(
                "an int8-quantized model cannot be trained; train the float32 model and "
                "quantize a copy for inference (model.eval() runs this one)"
            )
        out: torch.Tensor = self.int8(x)
        return out

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight (out, in)."""
        packed: torch.Tensor = self.int8.weight()
        return packed.dequantize()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def check_int8_supported(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, in one line, a device or dtype that int8 inference cannot run on."""
    if device.type != "cpu":
        raise ValueError(
            f"quantize=int8 runs on the CPU only (torch's int8 kernels are CPU kernels), not on "
            f"{device.type}; use the CPU (device=cpu) or leave quantize out"
        )
    if dtype != torch.float32:
        raise ValueError(
            f"quantize=int8 starts from float32 weights, not {str(dtype).removeprefix('torch.')}; "
            "leave the dtype at float32 or leave quantize out"
        )
    if not {"x86", "fbgemm", "qnnpack"} & set(torch.backends.quantized.supported_engines):
        raise ValueError(
            "quantize=int8: this torch build has no int8 CPU engine "
            f"(supported: {torch.backends.quantized.supported_engines}); leave quantize out"
        )


def quantize_int8(model: Qwen3) -> Qwen3:
    """Quantize ``model`` in place for inference (and return it): see the module docstring.

    Refused with a ``ValueError`` (one line): a model in training mode, one on a GPU or not in
    float32, or a mixture of experts (its experts are 3-D parameters, not ``nn.Linear``)."""
    if model.training:
        raise ValueError(
            "quantize=int8 is for inference: call model.eval() first (an int8 model cannot be "
            "trained)"
        )
    if model.config.num_experts > 0:
        raise ValueError(
            "quantize=int8 supports dense Qwen3 models only, not a mixture of experts; leave "
            "quantize out"
        )
    check_int8_supported(model.device, model.dtype)
    targets: list[tuple[nn.Module, str, nn.Linear]] = [
        (parent, name, child)
        for parent in (model, *model.model.layers.modules())
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    for parent, name, child in targets:
        setattr(parent, name, Int8Linear(child))
    model.eval()
    return model


def quantize(model: Qwen3, method: str | None) -> Qwen3:
    """``model`` quantized as ``method`` says (``int8``), or as it is for None; an unknown
    method is refused in one line."""
    if method is None:
        return model
    if method not in QUANTIZE_CHOICES:
        raise ValueError(unknown_method(method))
    return quantize_int8(model)


def unknown_method(method: Any) -> str:
    """The one-line message for a quantize value that is not one of :data:`QUANTIZE_CHOICES`."""
    return (
        f"quantize={method!r} is not a quantization this project has; choose "
        f"{' or '.join(QUANTIZE_CHOICES)}, or leave quantize out"
    )
