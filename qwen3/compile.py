"""``torch.compile`` for training: each decoder block as one graph, the fused loss's chunk step,
and a count of the graph breaks of the training forward.

Blocks are compiled one by one (torchtitan's scheme), not the model whole: every layer runs the
same block code, so one compiled graph (and its backward) serves them all and compile time does
not grow with depth; the embedding, the loss loop and FSDP/DDP stay eager around them. Call
:func:`compile_for_training` after :meth:`Qwen3.set_activation_checkpointing` (the checkpointed
region is then inside each block's graph) and before FSDP/DDP wrapping. The compiled function
is kept on its layer (``DecoderLayer.compiled_block``), so parameter names stay Hugging Face's
(no ``_orig_mod.``), FSDP's hooks run around it, and only the training forward runs it:
evaluation (no gradients) and generation (a KV cache) stay eager instead of compiling more graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qwen3.layers import DecoderLayer
from qwen3.loss import compile_chunk
from qwen3.model import Qwen3


def compile_for_training(model: Qwen3, **options: Any) -> None:
    """Compile every decoder block with ``fullgraph=True`` (a graph break is an error, not a
    silent fall back to eager) and the fused loss's chunk step (``qwen3.loss.compile_chunk``).
    ``options`` go to ``torch.compile`` (``backend``, ``mode`` ...). Compilation itself happens
    on the first forward."""
    for layer in model.model.layers:
        assert isinstance(layer, DecoderLayer)
        layer.compiled_block = torch.compile(layer.checkpointed_block, fullgraph=True, **options)
    model.loss_chunk = compile_chunk(**options)


@dataclass(frozen=True)
class GraphBreaks:
    """What ``torch._dynamo.explain`` found in a training forward."""

    graphs: int
    breaks: int
    reasons: list[str]  # one line per break


def graph_breaks(model: Qwen3, input_ids: torch.Tensor, targets: torch.Tensor) -> GraphBreaks:
    """Trace ``model(input_ids, targets=targets)`` (the training forward with its fused loss) with
    ``torch._dynamo.explain`` and count its graphs and breaks, under whatever autocast the caller
    has on; the model runs eagerly meanwhile (explain compiles nothing). A dense model traces as
    one graph: any break is a bug (an inference-only branch reached, a host sync in a block).
    Give it a model that :func:`compile_for_training` has not compiled, in training mode, with
    its activation checkpointing set; its parameters are not changed."""
    torch._dynamo.reset()  # explain must trace afresh, not reuse an earlier compile's cache
    try:
        found = torch._dynamo.explain(model)(input_ids, targets=targets)
    finally:
        torch._dynamo.reset()
    reasons = [str(b.reason).splitlines()[0] for b in found.break_reasons]
    return GraphBreaks(found.graph_count, found.graph_break_count, reasons)
