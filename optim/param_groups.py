"""Split a model's trainable parameters into matrices, embeddings and no-decay tensors.

Routing is by tensor identity, so a weight shared between modules (the lm_head tied to
the token embedding) appears exactly once, as an embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

# The router of a mixture-of-experts block, in Hugging Face's Qwen3-MoE names (a dense MLP has no
# ``gate``, its projection is ``gate_proj``); by name, so wrappers' prefixes and FSDP keep it.
ROUTER_SUFFIX = "mlp.gate.weight"
# A mixture-of-experts block's experts as 3-D stacks (transformers 5's names): ``gate_up_proj``
# (E, 2F, C) holds each expert's gate and up matrices, ``down_proj`` (E, C, F) its down matrix.
EXPERTS_INFIX = "mlp.experts."
FUSED_GATE_UP_SUFFIX = "mlp.experts.gate_up_proj"


def split_rows(name: str) -> int:
    """How many matrices Muon orthogonalises on their own in each (rows, cols) slice of the
    matrix parameter ``name``: 2 for a fused gate|up (its gate and up halves, as a dense MLP's
    are two parameters), else 1."""
    return 2 if name.endswith(FUSED_GATE_UP_SUFFIX) else 1


@dataclass
class ParamSplit:
    """Trainable parameters of a model, each in exactly one list, as (name, tensor) pairs.

    matrices: every other 2-D weight, and the 3-D expert stacks of a mixture of experts; in Qwen3
        exactly the q/k/v/o and gate/up/down projections inside the transformer blocks. Muon's
        share under name="muon", which orthogonalises every expert's gate, up and down matrix
        on its own (:func:`split_rows`).
    routers: the router (``mlp.gate``) of each mixture-of-experts block: AdamW, no weight decay.
        A (E, C) matrix of a handful of rows whose softmax picks the experts; Muon's orthogonal
        update would give each expert's row the same norm of change whatever its gradient.
    embeddings: token embedding and output head weights (tied or not).
    no_decay: norm weights, biases and every other 1-D (or 0-D) parameter.
    other: any other parameter of 3 or more dimensions (none in Qwen3); AdamW with weight decay.
    """

    matrices: list[tuple[str, Tensor]] = field(default_factory=list)
    embeddings: list[tuple[str, Tensor]] = field(default_factory=list)
    routers: list[tuple[str, Tensor]] = field(default_factory=list)
    no_decay: list[tuple[str, Tensor]] = field(default_factory=list)
    other: list[tuple[str, Tensor]] = field(default_factory=list)


def _embedding_ids(model: nn.Module) -> set[int]:
    """Identities of every nn.Embedding weight and of the output head's weight.

    The head is found by module name (``lm_head``, at any depth, so wrappers such as DDP's
    ``module.`` or torch.compile's ``_orig_mod.`` prefix keep working) or by HF's
    ``get_output_embeddings()``.
    """
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    heads = [m for name, m in model.named_modules() if name.split(".")[-1] == "lm_head"]
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if callable(get_output_embeddings):
        heads.append(get_output_embeddings())
    for head in heads:
        if isinstance(head, nn.Module) and isinstance(getattr(head, "weight", None), Tensor):
            ids.add(id(head.weight))
    return ids


def split_parameters(model: nn.Module) -> ParamSplit:
    """Route each trainable parameter of ``model`` once (frozen parameters are left out)."""
    embedding_ids = _embedding_ids(model)
    split = ParamSplit()
    seen: set[int] = set()
    # remove_duplicate=False so every name is visited; `seen` keeps the first name of a tied tensor
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        if id(param) in embedding_ids:
            split.embeddings.append((name, param))
        elif name.endswith(ROUTER_SUFFIX):
            split.routers.append((name, param))
        elif param.ndim == 2 or (param.ndim == 3 and EXPERTS_INFIX in name):
            split.matrices.append((name, param))
        elif param.ndim < 2:
            split.no_decay.append((name, param))
        else:
            split.other.append((name, param))
    return split
