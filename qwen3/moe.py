"""The sparse mixture-of-experts block of Qwen3-MoE and its load-balancing loss.

Same maths as transformers' ``Qwen3MoeSparseMoeBlock``: a router (``gate``, no bias) gives a
softmax over the experts, each token goes to its top-k of them (weights renormalised to sum to 1
when ``norm_topk_prob``), and each expert is a SwiGLU MLP. The experts are two 3-D parameters in
transformers 5's layout (``experts.gate_up_proj`` (E, 2F, C), gate rows then up rows, and
``experts.down_proj`` (E, C, F)), which the grouped matmul takes as they are: no per-forward
stack, so nothing but the parameters themselves and activations is saved for backward, and FSDP
can free what it gathered. Checkpoints keep the released per-expert names
(``experts.{e}.gate_proj.weight``, qwen3.hf), and Muon orthogonalises each expert's gate, up and
down matrices on their own, batched (optim.param_groups).

Dispatch goes by expert: the routed (token, expert) pairs are sorted by expert once, each expert
runs once on its contiguous group (``F.grouped_mm`` on CUDA in bf16 and in compiled bf16 graphs;
otherwise one autograd Function over all experts, ``qwen3.moe_experts``), and each result,
scaled by its routing weight, is added to its token's row. No expert ever sees a token not
routed to it. Counting the rows per expert reads nothing back to the host on the grouped path
(``torch.bincount`` would, and would break a compiled graph).
Shapes: N tokens, k experts per token, E experts, C hidden size, F expert width.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from qwen3.checkpointing import recomputing
from qwen3.config import Qwen3Config
from qwen3.moe_experts import swiglu_experts

ExpertsImplementation = Literal["auto", "grouped_mm", "loop"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts run in: autocast's when it is on for ``x``'s device, else x's."""
    device = x.device.type
    on = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    return torch.get_autocast_dtype(device) if on else x.dtype


def grouped_mm_usable(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``auto`` runs the experts through ``F.grouped_mm`` (feature-detected: older
    torch lacks it): in bfloat16 (what its kernels and its meta function take), on CUDA SM 8.0
    and newer, or on CPU inside a compiled graph, where the loop's row counts would be a graph
    break. Eager CPU keeps :func:`qwen3.moe_experts.swiglu_experts`: the float32 CPU kernel is
    no faster than one ``torch.mm`` per expert at our sizes (benchmarks/results/moe.md)."""
    if not hasattr(F, "grouped_mm") or dtype != torch.bfloat16:
        return False
    if x.is_cuda:
        # get_device_properties, not get_device_capability: Dynamo folds the former to a
        # constant, the latter it would try to put in the graph.
        props = torch.cuda.get_device_properties(x.device)
        return (props.major, props.minor) >= (8, 0)
    return bool(torch.compiler.is_compiling())


def grouped_swiglu(
    xs: torch.Tensor,  # (R, C) routed rows, sorted by expert
    offsets: torch.Tensor,  # (E,) int32: the end of each expert's rows
    gate_up: torch.Tensor,  # (E, 2F, C)
    down: torch.Tensor,  # (E, C, F)
) -> torch.Tensor:  # (R, C)
    """Every expert's SwiGLU on its rows as two grouped matmuls, in the operands' dtype (the
    kernel does not autocast). The weights go in as transposed views of the parameters: the
    kernel saves them for backward as they are, so no copy of them outlives the call."""
    h = F.grouped_mm(xs, gate_up.transpose(1, 2), offs=offsets)  # (R, 2F)
    gate, up = h.chunk(2, dim=-1)
    # The kernel takes only dense gradients: keep the product contiguous for its backward.
    return F.grouped_mm((F.silu(gate) * up).contiguous(), down.transpose(1, 2), offs=offsets)


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many of ``ids`` (any shape, int64) name each expert: (E,) int64, computed on the
    device without reading it back (``torch.bincount`` syncs the host on CUDA to size its
    output, and breaks a compiled graph)."""
    flat = ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )


class Experts(nn.Module):
    """E SwiGLU experts as two 3-D parameters, transformers 5's ``Qwen3MoeExperts`` layout:
    ``gate_up_proj`` (E, 2F, C), each expert's gate rows then its up rows, and ``down_proj``
    (E, C, F). ``implementation`` picks the kernel: ``auto`` (:func:`grouped_mm_usable`),
    ``grouped_mm`` or ``loop`` (:func:`qwen3.moe_experts.swiglu_experts`)."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        e, c, f = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * f, c))
        self.down_proj = nn.Parameter(torch.empty(e, c, f))
        self.implementation: ExpertsImplementation = "auto"
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each expert's matrices as ``nn.Linear`` initialises its weight, U(-1/sqrt(in),
        1/sqrt(in)), for a block used alone; :class:`qwen3.Qwen3` draws its own."""
        for w in (self.gate_up_proj, self.down_proj):
            bound = 1 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)

    def forward(
        self,
        flat: torch.Tensor,  # (N, C)
        weights: torch.Tensor,  # (N, k) routing weights
        ids: torch.Tensor,  # (N, k) expert ids
    ) -> torch.Tensor:  # (N, C), in the compute dtype
        flat_ids = ids.reshape(-1)
        sorted_ids, order = flat_ids.sort(stable=True)  # (N*k,) pairs grouped by expert
        # The end of each expert's rows, read off the sorted ids on the device.
        ends = torch.arange(1, self.num_experts + 1, device=ids.device)
        offsets = torch.searchsorted(sorted_ids, ends)  # (E,)
        dtype = _compute_dtype(flat)
        use_grouped = self.implementation == "grouped_mm" or (
            self.implementation == "auto" and grouped_mm_usable(flat, dtype)
        )
        if not use_grouped:
            # The loop slices each expert's rows by Python ints: one read of the E counts (on CPU
            # no sync; on CUDA outside bf16, one per layer).
            counts = offsets.diff(prepend=offsets.new_zeros(1)).tolist()
            return swiglu_experts(flat, weights, order, counts, self.gate_up_proj, self.down_proj)
        token = order // ids.shape[1]  # (N*k,) each routed row's token
        # index_select, not flat[token]: advanced indexing and its backward (index_put_ with
        # accumulate) cost ~8x more at this size (benchmarks/results/moe.md).
        xs = flat.to(dtype).index_select(0, token)  # (N*k, C)
        # Casts are no-ops when the parameters already are in dtype (FSDP's bf16 gather).
        gate_up, down = self.gate_up_proj.to(dtype), self.down_proj.to(dtype)
        ys = grouped_swiglu(xs, offsets.to(torch.int32), gate_up, down)
        # Each output scaled by its routing weight and added to its token's row (N tiny bmm
        # calls would cost more than the experts' matmuls).
        ys = ys * weights.to(dtype).reshape(-1).index_select(0, order).unsqueeze(-1)
        return ys.new_zeros(flat.shape).index_add_(0, token, ys)


class SparseMoeBlock(nn.Module):
    """Router + experts, with transformers' ``Qwen3MoeSparseMoeBlock`` parameter names.

    In a forward with gradients on (training), the router's choice is kept in ``routing`` until
    :func:`pop_routings` takes it for the auxiliary loss (not in activation checkpointing's
    recompute, :func:`qwen3.checkpointing.recomputing`).
    """

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.aux_loss_coef = config.router_aux_loss_coef
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(config)
        self.routing: Routing | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities (N, E) in float32, top-k weights (N, k) in x's dtype and expert
        ids (N, k)."""
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, C)
        probs, weights, ids = self.route(flat)
        # Kept for the auxiliary loss from the forward only: a checkpointed block's recompute
        # in backward would leave its probabilities (and their graph) held until the next one.
        if torch.is_grad_enabled() and (torch.compiler.is_compiling() or not recomputing()):
            self.routing = Routing(probs, ids)
        return self.experts(flat, weights, ids).view(shape)


class Routing(NamedTuple):
    """A training forward's routing, for the load-balancing loss and the experts' load: what the
    router computed anyway (softmax and top-k), not computed again from its logits."""

    probs: torch.Tensor  # (N, E) float32 router probabilities, in the autograd graph
    ids: torch.Tensor  # (N, k) the experts each token went to


def pop_routings(model: nn.Module) -> list[Routing]:
    """The routing each sparse block of ``model`` kept in its last forward with gradients on, in
    layer order; the blocks forget them. Empty for a dense model."""
    out = []
    for module in model.modules():
        if isinstance(module, SparseMoeBlock) and module.routing is not None:
            out.append(module.routing)
            module.routing = None
    return out


class RouterLosses:
    """The load-balancing loss of each training forward of ``model`` (wrapped or not), and its
    mean and the experts' load over one optimizer step, for the metrics. A dense model adds 0."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
        self.block = blocks[0] if blocks else None
        self.sums: torch.Tensor | None = None  # (aux loss, expert load), summed, detached
        self.count = 0

    def take(self) -> torch.Tensor | float:
        """``router_aux_loss_coef`` x the auxiliary loss of the forward just run, to add to its
        loss before backward (transformers' total loss); 0.0 for a dense model."""
        routings = pop_routings(self.model)
        if self.block is None or not routings:
            return 0.0
        e = self.block.num_experts
        aux = load_balancing_loss(routings, e)
        stats = torch.stack([aux.detach(), expert_load(routings, e).float()])
        self.sums = stats if self.sums is None else self.sums + stats
        self.count += 1
        return self.block.aux_loss_coef * aux

    def means(self) -> dict[str, float]:
        """``aux_loss`` and ``expert_load`` averaged over the forwards taken (one host sync);
        empty for a dense model."""
        if self.sums is None:
            return {}
        aux, load = (self.sums / self.count).tolist()
        return {"aux_loss": aux, "expert_load": load}


def load_balancing_loss(routings: list[Routing], num_experts: int) -> torch.Tensor:
    """transformers' ``load_balancing_loss_func`` (Switch Transformer, eqs. 4-6) without a padding
    mask: E * sum_e f_e * P_e, where f_e is expert e's share of the top-k assignments and P_e its
    mean router probability, both over the tokens of every layer together. transformers takes
    the logits and computes softmax and top-k again; the router's own are the same values."""
    tokens = sum(r.probs.shape[0] for r in routings)
    counts = torch.stack([expert_counts(r.ids, num_experts) for r in routings]).sum(dim=0)
    mean_probs = torch.stack([r.probs.sum(dim=0) for r in routings]).sum(dim=0) / tokens
    return num_experts * torch.sum(counts / tokens * mean_probs)


def expert_load(routings: list[Routing], num_experts: int) -> torch.Tensor:
    """The largest expert's share of a layer's routed tokens, averaged over the layers: 1/E when
    perfectly balanced, 1/k (k experts per token) when every token picks the same experts."""
    shares = [expert_counts(r.ids, num_experts).max() / r.ids.numel() for r in routings]
    return torch.stack(shares).mean()
