"""Attention that stays inside documents: several documents packed in one row attend each only
to itself, with RoPE positions restarting at every document start.

``document_ids`` (B, T) int says which document each token belongs to (the same id = the same
document; ids never decrease along a row). From it come

- the per-token positions (0 at each document start), gathered from the RoPE tables, and
- the attention mask: block-diagonal causal. Where FlexAttention can run it (CUDA, torch's
  ``torch.nn.attention.flex_attention``, no attention dropout) it is a ``BlockMask``, whose
  kernel skips the blocks between documents; everywhere else (the CPU, where FlexAttention has
  no backward) it is a boolean (B, 1, T, T) mask for SDPA, True = may attend.

A packed row then computes exactly what its documents compute run one by one (to float
rounding: ``tests/test_documents.py``). Without ``document_ids`` none of this runs: the model
takes its plain causal path unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# FlexAttention is in every supported torch (2.11+, public since 2.5); whether it can run is
# decided per device (flex_usable).
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# A mask for one forward: SDPA's boolean (B, 1, T, S) tensor, or FlexAttention's block mask.
AttentionMask = torch.Tensor | BlockMask

_COMPILED_FLEX: list[Callable[..., torch.Tensor]] = []


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position inside its document, (B, T) int64: 0 where a document starts."""
    b, t = document_ids.shape
    index = torch.arange(t, device=document_ids.device).expand(b, t)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    # The index of the latest document start at or before each token.
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask, (B, 1, T, T) bool: query i may see key j <= i of its own
    document."""
    t = document_ids.shape[1]
    same = document_ids[:, None, :, None] == document_ids[:, None, None, :]  # (B, 1, T, T)
    causal = torch.ones(t, t, dtype=torch.bool, device=document_ids.device).tril()
    return same & causal


def flex_usable(device: torch.device, dropout: float) -> bool:
    """Whether the document mask should be a FlexAttention block mask: on CUDA, where its kernel
    trains (torch has no CPU backward for it), and without attention dropout (it has none)."""
    return device.type == "cuda" and dropout == 0.0


def document_block_mask(document_ids: torch.Tensor) -> BlockMask:
    """The block-diagonal causal mask as a FlexAttention ``BlockMask`` (one per batch row)."""
    b, t = document_ids.shape

    def same_document_causal(
        batch: torch.Tensor, head: torch.Tensor, q: torch.Tensor, kv: torch.Tensor
    ) -> torch.Tensor:
        return (document_ids[batch, q] == document_ids[batch, kv]) & (q >= kv)

    return create_block_mask(same_document_causal, b, None, t, t, device=document_ids.device)


def document_attention(
    document_ids: torch.Tensor, dropout: float = 0.0
) -> tuple[torch.Tensor, AttentionMask]:
    """Positions (B, T) and the mask for a packed forward (see the module docstring)."""
    if document_ids.dim() != 2 or document_ids.dtype.is_floating_point:
        raise ValueError(
            f"document_ids must be a (B, T) integer tensor, got {tuple(document_ids.shape)} "
            f"{document_ids.dtype}"
        )
    positions = document_positions(document_ids)
    if flex_usable(document_ids.device, dropout):
        return positions, document_block_mask(document_ids)
    return positions, document_causal_mask(document_ids)


def flex_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask
) -> torch.Tensor:
    """FlexAttention of (B, H|K|K, T, D) q, k, v under ``block_mask``; grouped key/value heads
    are taken as they are. Compiled once: eager FlexAttention is a slow reference that
    materialises the scores (inside a compiled block Dynamo inlines it either way)."""
    if not _COMPILED_FLEX:
        _COMPILED_FLEX.append(torch.compile(flex_attention, dynamic=False))
    gqa = q.shape[1] != k.shape[1]
    out: torch.Tensor = _COMPILED_FLEX[0](q, k, v, block_mask=block_mask, enable_gqa=gqa)
    return out
