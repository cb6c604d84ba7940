"""Load a checkpoint directory into the model, tokenizer and facts the server reports about it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen3 import Qwen3, pick_device
from qwen3.quantize import quantize as quantize_model
from qwen3.tokenizer import Qwen3Tokenizer
from trainer.errors import CheckpointError
from trainer.run_layout import check_checkpoint, display_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ServedModel:
    """A loaded model with its tokenizer, id and limits."""

    model: Qwen3
    tokenizer: Qwen3Tokenizer
    name: str
    path: Path
    context_length: int
    num_params: int
    created: int

    @property
    def device(self) -> str:
        return str(self.model.device)

    @property
    def dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")


def serving_dtype(
    requested: str | None, device: torch.device, bf16_supported: bool
) -> torch.dtype | None:
    """The dtype to load weights in: the one asked for; else bfloat16 on a CUDA GPU that supports
    it (half the memory and bandwidth of float32 per decoded token, tensor-core matmuls and the
    flash attention kernel); else None, meaning as saved (float32 CPU matmuls are the fast ones)."""
    if requested is not None:
        return DTYPES[requested]
    if device.type == "cuda" and bf16_supported:
        return torch.bfloat16
    return None


def quantize_device_note(quantize: str | None, device: str, best: torch.device) -> str | None:
    """What to tell a user whose `--quantize` moves an `auto` device off an accelerator
    (``best``: the device `auto` picks without it); None when nothing moves."""
    if not quantize or device != "auto" or best.type == "cpu":
        return None
    return (
        f"note: --quantize {quantize} serves on the CPU (torch's int8 kernels are CPU kernels), "
        f"not on the {best.type} device this machine has; drop --quantize to serve there "
        "(bfloat16 on a CUDA GPU), or pass --device cpu to silence this note"
    )


def load_served_model(
    path: Path,
    device: str = "auto",
    dtype: str | None = None,
    name: str | None = None,
    quantize: str | None = None,
) -> ServedModel:
    """Load `path` (already resolved) for serving, quantized as `quantize` says (`int8`, on the
    CPU; qwen3.quantize); CheckpointError says what is wrong with it."""
    check_checkpoint(path)
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if quantize and device == "auto":
        device = "cpu"  # int8 kernels are CPU kernels
    try:
        torch_device = pick_device(device)
    except RuntimeError as err:
        raise CheckpointError(str(err)) from err
    try:
        tokenizer = Qwen3Tokenizer.from_dir(path)
        bf16 = torch_device.type == "cuda" and torch.cuda.is_bf16_supported()
        model = Qwen3.from_pretrained(
            path, device=torch_device, dtype=serving_dtype(dtype, torch_device, bf16)
        )
    # The files passed check_checkpoint; what qwen3's loaders still raise for a bad file is
    # OSError/ValueError/KeyError. RuntimeError (CUDA out of memory among them) keeps its traceback.
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"cannot load {path} as a Qwen3 model: {err}") from err
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size}; save the tokenizer the model was trained with beside it"
        )
    model.eval()
    num_params = model.num_params()  # before quantizing packs the linear weights away
    try:
        model = quantize_model(model, quantize)
    except ValueError as err:  # a model int8 does not support (a mixture of experts)
        raise CheckpointError(f"--quantize {quantize}: {err}") from None
    return ServedModel(
        model=model,
        tokenizer=tokenizer,
        name=name or display_name(path),
        path=path,
        context_length=model.config.max_position_embeddings,
        num_params=num_params,
        created=int((path / "config.json").stat().st_mtime or time.time()),
    )
