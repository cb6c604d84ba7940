"""FSDP2 (``torch.distributed.fsdp.fully_shard``): shard a Qwen3 across ranks, and gather it back.

Each decoder layer is its own shard group (all-gathered just before it runs, freed after) and
the root holds the rest (the embedding, tied to the LM head, and the final norm). Parameters
become DTensors sharded along their first dimension; optimizers step on the local shards.
Checkpoints stay ordinary Hugging Face directories: the full weights and optimizer state are
gathered to rank 0 on the CPU when saving, and every rank reads the full state and keeps its
own shard when resuming.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard

from optim import OptimizerSet
from qwen3 import Qwen3

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
_SCATTER = StateDictOptions(full_state_dict=True)


def shard_model(model: Qwen3, device: torch.device) -> None:
    """Shard ``model`` in place: one FSDP group per decoder layer, plus the root."""
    mesh_device = "cuda" if device.type == "cuda" else "cpu"
    mesh = torch.distributed.device_mesh.init_device_mesh(
        mesh_device, (torch.distributed.get_world_size(),)
    )
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_model_copy(model: Qwen3, is_main: bool) -> Qwen3 | None:
    """The whole model as a plain module on rank 0's CPU (None elsewhere). Collective: every
    rank must call it."""
    state = get_model_state_dict(model, options=_GATHER)
    if not is_main:
        return None
    with torch.device("meta"):
        plain = Qwen3(model.config)
    plain.to_empty(device="cpu")
    plain.model.rotary_emb.reset()
    if model.config.tie_word_embeddings:
        plain.lm_head.weight = plain.model.embed_tokens.weight
    plain.load_state_dict(state, strict=False)
    missing = {n for n, _ in plain.named_parameters()} - set(state)
    if missing:
        raise RuntimeError(f"gathered state dict lacks {sorted(missing)[:3]}")
    return plain


def load_full_weights(model: Qwen3, full: dict[str, Any]) -> None:
    """Copy a full (unsharded) state dict into the sharded ``model``; each rank keeps its shard."""
    set_model_state_dict(model, full, options=_SCATTER)


def full_optimizer_state(model: Qwen3, optimizers: OptimizerSet) -> dict[str, Any]:
    """:meth:`OptimizerSet.state_dict` with each optimizer's state gathered whole (keyed by
    parameter name) to rank 0's CPU. Collective."""
    state = optimizers.state_dict()
    state["optimizers"] = [
        get_optimizer_state_dict(model, opt, options=_GATHER) for opt in optimizers.optimizers
    ]
    return state


def load_full_optimizer_state(
    model: Qwen3, optimizers: OptimizerSet, state: dict[str, Any]
) -> None:
    """Restore what :func:`full_optimizer_state` saved; each rank keeps its shard of it."""
    if list(state.get("names", [])) != optimizers.names:
        optimizers.load_state_dict(state)  # raises its clear mismatch message
    for opt, opt_state in zip(optimizers.optimizers, state["optimizers"], strict=True):
        set_optimizer_state_dict(model, opt, opt_state, options=_SCATTER)
    # Steps, schedulers and the Muon momentum schedule through the usual path; the optimizers
    # get their own (just restored) state back.
    optimizers.load_state_dict(
        {**state, "optimizers": [opt.state_dict() for opt in optimizers.optimizers]}
    )
