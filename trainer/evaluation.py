"""Validation metrics: loss, next-token accuracy, perplexity and bits per byte."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from data import Batch, SourceData, val_samples
from data.packing import Packing
from trainer.build import Precision
from trainer.distributed import group_rank_world, sum_across_ranks

IGNORE_INDEX = -100  # a target the loss skips (qwen3's fused loss, as F.cross_entropy)


def evaluate(
    model: nn.Module,
    val_tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    num_batches: int,
    precision: Precision,
    device: torch.device,
    token_bytes: torch.Tensor | None,
    packing: Packing | None = None,
) -> dict[str, float]:
    """Mean token-level metrics over the first ``num_batches`` deterministic val batches of a
    token split, packed as ``packing`` says (:func:`evaluate_batches`)."""
    batches = list(val_samples(val_tokens, batch_size, seq_len, num_batches, packing))
    return evaluate_batches(model, batches, precision, device, token_bytes)


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    batches: Sequence[Batch],
    precision: Precision,
    device: torch.device,
    token_bytes: torch.Tensor | None,
) -> dict[str, float]:
    """Mean metrics over the targets of ``batches`` (with document ids: packed documents);
    targets of -100 (SFT's non-assistant tokens) are not counted.

    Under torchrun each rank evaluates every ``world_size``-th batch and the sums are added up
    across ranks, so the figures are those of one process at 1/world_size of the work. Every rank
    runs the same number of forwards (a rank short of a batch repeats one and discards it), as
    FSDP and DDP forwards take part in collectives.

    ``val_bpb`` = the targets' summed loss in bits / their summed UTF-8 bytes, each target's bytes
    read from ``token_bytes`` ((V,) on ``device``, the tokenizer's byte length per id, 0 for
    special tokens), so tokenizers compare. It is exact for the windows evaluated: a split-wide
    average bytes per token would misstate it whenever those windows' tokens are longer or
    shorter than the split's average.

    ``packing`` (the run's): with ``bos`` the val rows are whole documents too, and with the
    document mask each is evaluated on its own (``data.sampler.val_samples``).
    """
    was_training = model.training
    model.eval()
    rank, world_size = group_rank_world()
    mine = batches[rank::world_size]
    rounds = -(-len(batches) // world_size)  # forwards per rank: the most any rank has
    # loss, correct, count, bytes: summed on the device and read once at the end (one sync)
    # float64 keeps counts exact; MPS has no float64
    sums = torch.zeros(
        4, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device
    )
    for i in range(rounds):
        batch = (mine[i] if i < len(mine) else batches[0]).to(device)
        x, y, docs = batch.x, batch.y, batch.document_ids
        with precision.autocast():
            # (B, T, 2): each position's loss and hit, from the chunked head (no (B*T, V) logits)
            if docs is None:
                stats: torch.Tensor = model(x, targets=y, token_stats=True)
            else:
                stats = model(x, targets=y, token_stats=True, document_ids=docs)
        if i >= len(mine):
            continue  # only keeps this rank in step with the others
        counted = y != IGNORE_INDEX
        sums[:2] += stats.flatten(0, 1).to(sums.dtype).sum(0)  # ignored targets hold 0 and 0
        sums[2] += counted.sum()
        if token_bytes is not None:
            sums[3] += (token_bytes[y.clamp(min=0)] * counted).sum()
    model.train(was_training)
    loss_sum, correct, count, nbytes = sum_across_ranks(sums.tolist())
    if count == 0:
        raise ValueError(
            "the validation batches hold no target to score; lower trainer.seq_len or hold "
            "out more text"
        )
    loss = loss_sum / count
    metrics = {
        "val_loss": loss,
        "val_acc": correct / count,
        "val_ppl": math.exp(loss) if loss < 700 else math.inf,
    }
    if nbytes:  # no table, or windows of special tokens alone: no text to measure against
        metrics["val_bpb"] = loss_sum / math.log(2) / nbytes
    return metrics


def evaluate_sources(
    model: nn.Module,
    sources: list[SourceData],
    batch_size: int,
    seq_len: int,
    num_batches: int,
    precision: Precision,
    device: torch.device,
    token_bytes: torch.Tensor | None,
    packing: Packing | None = None,
) -> dict[str, float]:
    """:func:`evaluate` on one source's val split; for a mixture, on each source's, reported as
    ``val_loss/<label>`` (and ``val_acc``, ``val_bpb``), with ``val_loss``, ``val_acc`` and
    ``val_bpb`` the weight-averaged totals (so ``best`` follows the mixture the run trains on)
    and ``val_ppl`` their exponential."""

    def score(val: np.ndarray) -> dict[str, float]:
        args = (batch_size, seq_len, num_batches, precision, device, token_bytes, packing)
        return evaluate(model, val, *args)

    if len(sources) == 1:
        return score(sources[0].val)
    metrics: dict[str, float] = {}
    totals: dict[str, list[tuple[float, float]]] = {}
    for source in sources:
        ev = score(source.val)
        for key in ("val_loss", "val_acc", "val_bpb"):
            if key in ev:
                metrics[f"{key}/{source.label}"] = ev[key]
                totals.setdefault(key, []).append((source.weight, ev[key]))
    for key, pairs in totals.items():
        weight = sum(w for w, _ in pairs)
        if weight > 0:
            metrics[key] = sum(w * v for w, v in pairs) / weight
    loss = metrics["val_loss"]
    metrics["val_ppl"] = math.exp(loss) if loss < 700 else math.inf
    return metrics
