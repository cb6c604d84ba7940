"""Read and write Hugging Face Qwen3 and Qwen3-MoE directories (config.json + safetensors, sharded
or not). A Qwen3-MoE model holds each layer's experts as two 3-D parameters
(``mlp.experts.gate_up_proj`` (E, 2F, C), ``mlp.experts.down_proj`` (E, C, F), transformers 5's
layout); files keep the released per-expert names (``mlp.experts.{e}.gate_proj.weight``), which
transformers reads and writes too, and the fused names load as well."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.distributed.tensor import DTensor

from qwen3.config import Qwen3Config
from qwen3.model import Qwen3

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _weight_files(path: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it."""
    if (path / INDEX_FILE).exists():
        index = json.loads((path / INDEX_FILE).read_text())
        return {name: path / shard for name, shard in index["weight_map"].items()}
    if (path / SINGLE_FILE).exists():
        with safe_open(str(path / SINGLE_FILE), framework="pt") as f:
            return {name: path / SINGLE_FILE for name in f.keys()}  # noqa: SIM118
    found = sorted(p.name for p in path.iterdir())
    raise FileNotFoundError(
        f"{path} has no {SINGLE_FILE} or {INDEX_FILE} (found: {', '.join(found) or 'nothing'}); "
        "point at a Hugging Face Qwen3 model directory or a checkpoint written by train.py."
    )


def _released_parts(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """The per-expert tensors of the released checkpoints that make up the fused expert parameter
    ``name`` of ``shape``, in the order of its rows (expert by expert; within an expert of
    ``gate_up_proj`` its gate rows, then its up rows); [] for any other tensor."""
    prefix, _, proj = name.rpartition(".")
    if not prefix.endswith(".mlp.experts") or len(shape) != 3:
        return []
    e, rows, cols = shape
    if proj == "gate_up_proj":
        kinds = [("gate_proj", rows // 2), ("up_proj", rows // 2)]
    elif proj == "down_proj":
        kinds = [("down_proj", rows)]
    else:
        return []
    return [(f"{prefix}.{i}.{kind}.weight", (n, cols)) for i in range(e) for kind, n in kinds]


def _check_files(
    path: Path, config: Qwen3Config, expected: dict[str, tuple[int, ...]]
) -> tuple[dict[str, Path], dict[str, list[tuple[str, tuple[int, ...]]]]]:
    """Each tensor's file, and the fused expert parameters read from released per-expert
    tensors (their parts); raise ValueError naming what is missing, extra or of the wrong shape
    (from the files' headers: nothing is read)."""
    files = _weight_files(path)
    # Each fused expert parameter is read whole if the files hold it so (transformers 5's fused
    # layout), else from its released per-expert tensors.
    parts = {
        n: ps
        for n, shape in expected.items()
        if n not in files and (ps := _released_parts(n, shape))
    }
    wanted = {n: shape for n, shape in expected.items() if n not in parts}
    wanted.update(part for ps in parts.values() for part in ps)

    missing = sorted(set(wanted) - set(files))
    extra = sorted(set(files) - set(wanted) - {"lm_head.weight"})
    if missing or extra:
        problems = []
        if missing:
            problems.append(
                f"missing tensors: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
            )
        if extra:
            problems.append(
                f"unexpected tensors: {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}"
            )
        raise ValueError(
            f"{path} does not match its config.json ({'; '.join(problems)}); the checkpoint is incomplete "
            "or was written for another architecture."
        )
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in names:
                shape = tuple(f.get_slice(name).get_shape())
                if shape != wanted[name]:
                    raise ValueError(
                        f"{path}: tensor {name} has shape {shape}, but config.json implies "
                        f"{wanted[name]}; the weights and config.json disagree."
                    )
    return files, parts


def _expected(model: Qwen3) -> dict[str, tuple[int, ...]]:
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    return expected


def load_pretrained(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    config: Qwen3Config | None = None,
) -> Qwen3:
    """Build a :class:`Qwen3` from a Hugging Face directory, validating every tensor's name and
    shape. ``config``: build this config instead of the directory's ``config.json`` (e.g. with
    another ``rope_theta`` for continued pretraining); its shapes must fit the weights."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is not a directory: expected a Hugging Face Qwen3 model directory."
        )
    if config is None:
        config = Qwen3Config.from_json_file(path / "config.json")
    with torch.device("meta"):
        model = Qwen3(config)
    expected = _expected(model)
    files, parts = _check_files(path, config, expected)

    target_dtype = dtype
    tensors: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in [n for n in expected if n not in parts] + [
        p for ps in parts.values() for p, _ in ps
    ]:
        by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in names:
                t = f.get_tensor(name)
                if target_dtype is None and t.is_floating_point():
                    target_dtype = t.dtype
                tensors[name] = t
    for name, ps in parts.items():  # the experts' matrices, joined one parameter at a time
        tensors[name] = torch.cat([tensors.pop(p) for p, _ in ps]).view(expected[name])

    model = model.to_empty(device=device or "cpu")
    model.model.rotary_emb.reset()
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.load_state_dict(tensors, strict=False)
    if target_dtype is not None:
        model.to(target_dtype)
    return model.eval()


def _load_group(name: str) -> str:
    """The tensors read together by :func:`load_sharded`: one decoder layer's, else one tensor."""
    layer = _LAYER.match(name)
    return layer.group(0) if layer else name


_LAYER = re.compile(r"model\.layers\.\d+\.")


def load_sharded(model: Qwen3, path: str | Path) -> None:
    """Fill ``model`` (materialised, its weights FSDP2 DTensor shards or plain tensors) from the
    Hugging Face directory ``path``, validated as :func:`load_pretrained` does; each rank reads
    only the slices of each tensor that it holds, converted to the model's dtype, so no rank
    holds the whole model. Collective under a process group: every rank calls it."""
    # DCP's HuggingFaceStorageReader maps each rank's slices to the files' tensors (the names
    # match: the module tree mirrors transformers'); it is DCP's own resharding reader.
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    path = Path(path)
    files, parts = _check_files(path, model.config, _expected(model))
    state: dict[str, Any] = get_model_state_dict(
        model
    )  # the parameters themselves (their shards), filled in place
    groups: dict[str, dict[str, Any]] = {}
    for name, t in state.items():
        if name in files:
            groups.setdefault(_load_group(name), {})[name] = t
    distributed = dist.is_available() and dist.is_initialized()
    reader = HuggingFaceStorageReader(str(path))
    with warnings.catch_warnings():  # one process: DCP says it assumes one, which is meant
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .*single process")
        # Layer by layer: the reader maps the file pages it slices until the call returns, so
        # one call for the whole model would keep each rank's part of every file mapped at once.
        for group in groups.values():
            dcp_load(group, storage_reader=reader, no_dist=not distributed)
    for name, ps in parts.items():
        _load_released_experts(state[name], files, ps)


def _load_released_experts(
    target: torch.Tensor, files: dict[str, Path], parts: list[tuple[str, tuple[int, ...]]]
) -> None:
    """Fill the fused expert parameter ``target`` (or this rank's experts of it) from the
    released per-expert matrices ``parts``, reading only the experts this rank holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, rows, cols = target.shape
    local = target.to_local() if isinstance(target, DTensor) else target
    first = 0
    if isinstance(target, DTensor):
        shape, offset = compute_local_shape_and_global_offset(
            target.shape, target.device_mesh, target.placements
        )
        if tuple(shape[1:]) != (rows, cols):
            raise ValueError(
                f"expert weights of shape {tuple(target.shape)} are sharded into {tuple(shape)}: "
                "only a split along the experts (FSDP's) can be read expert by expert"
            )
        first = offset[0]
    start, stop = first * rows, (first + local.shape[0]) * rows  # in the parts' stacked rows
    blocks: list[torch.Tensor] = []
    with contextlib.ExitStack() as stack:
        opened: dict[Path, Any] = {}
        row = 0
        for part, (n, _) in parts:
            lo, hi = max(start, row), min(stop, row + n)
            if lo < hi:
                if files[part] not in opened:
                    opened[files[part]] = stack.enter_context(
                        safe_open(str(files[part]), framework="pt", device="cpu")
                    )
                blocks.append(opened[files[part]].get_slice(part)[lo - row : hi - row])
            row += n
    if blocks:
        with torch.no_grad():
            local.copy_(torch.cat(blocks).view(local.shape))


# safetensors' dtype codes (its format spec) for the dtypes a Qwen3 state dict holds.
_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def save_pretrained(model: Qwen3, path: str | Path, write: bool = True) -> None:
    """Write ``config.json`` and ``model.safetensors`` (tied head stored once, as transformers does).

    A model sharded with FSDP2 (DTensor weights) is gathered one tensor at a time, so no rank
    ever holds the whole model: every rank must call this (each gather is a collective), and
    only those with ``write`` write the files."""
    path = Path(path)
    tensors = [
        (name, t.detach())
        for name, t in model.state_dict().items()
        if not (model.config.tie_word_embeddings and name == "lm_head.weight")
    ]
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors:
        # A fused expert parameter is written as its released per-expert matrices, in row order.
        for part, shape in _released_parts(name, tuple(t.shape)) or [(name, tuple(t.shape))]:
            size = math.prod(shape) * t.element_size()
            header[part] = {
                "dtype": _SAFETENSORS_DTYPES[t.dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    # safetensors.save_file needs every tensor in memory at once; its documented layout (header
    # length, JSON header, raw bytes in header order) is written here as each tensor arrives.
    tmp = path / f".{SINGLE_FILE}.tmp"  # renamed when whole: a crash never leaves half a file
    if write:
        path.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") if write else contextlib.nullcontext() as f:
        if f is not None:
            f.write(len(encoded).to_bytes(8, "little") + encoded)
        for _, t in tensors:
            whole = t.full_tensor() if isinstance(t, DTensor) else t
            if f is not None:
                f.write(whole.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
    if not write:
        return
    os.replace(tmp, path / SINGLE_FILE)
    write_config(model, path)


def write_config(model: Qwen3, path: Path) -> None:
    """``config.json`` of ``model`` (with its dtype) into ``path``, renamed into place whole."""
    config = model.config.to_dict()
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    tmp = path / ".config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, path / "config.json")
