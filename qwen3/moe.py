"""The sparse mixture-of-experts block of Qwen3-MoE and its load-balancing loss.

Same maths and parameter names as transformers' ``Qwen3MoeSparseMoeBlock``: a router
(``gate``, no bias) gives a softmax over the experts, each token goes to its top-k of them
(weights renormalised to sum to 1 when ``norm_topk_prob``), and each expert is a SwiGLU MLP.
The experts are kept as separate modules (``experts.{i}.gate_proj`` ...), the layout of the
released checkpoints, so a checkpoint is a Hugging Face directory as it stands and Muon
orthogonalises each expert's matrices on their own.

Dispatch goes by expert: the routed (token, expert) pairs are sorted by expert once, each expert
runs once on its contiguous group (on CUDA in bf16 all of them in one ``F.grouped_mm``; elsewhere
one autograd Function over all experts, ``qwen3.moe_experts``), and each result, scaled by its
routing weight, is added to its token's row. No expert ever sees a token not routed to it.
Shapes: N tokens, k experts per token, E experts, C hidden size, F expert width.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from qwen3.config import Qwen3Config
from qwen3.layers import MLP
from qwen3.moe_experts import swiglu_experts


def _grouped_mm_usable(x: torch.Tensor) -> bool:
    """Whether to run the experts through ``F.grouped_mm``: on CUDA in bfloat16 (what its kernels
    take, SM 8.0 and newer), by dtype or by autocast. Its float32 CPU kernel is no faster than
    one ``torch.mm`` per expert at our sizes (2 cores, tiny-moe's width), so the CPU keeps
    :func:`qwen3.moe_experts.swiglu_experts`."""
    if not x.is_cuda or torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    autocast_bf16 = torch.is_autocast_enabled("cuda") and (
        torch.get_autocast_dtype("cuda") == torch.bfloat16
    )
    return x.dtype == torch.bfloat16 or autocast_bf16


def grouped_swiglu(
    xs: torch.Tensor,  # (N*k, C) routed rows, sorted by expert
    counts: torch.Tensor,  # (E,) rows per expert
    experts: Iterable[MLP],
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Every expert's SwiGLU on its rows as two grouped matmuls (``F.grouped_mm``; gate and up
    stacked), equal to the loop over experts in :meth:`SparseMoeBlock.forward`, computed in
    ``dtype`` (the kernel does not autocast). The per-expert weights are stacked on each call:
    the parameters stay one matrix per expert (HF names, Muon per matrix)."""
    mlps = list(experts)
    dtype = dtype or xs.dtype
    offs = counts.cumsum(0).to(torch.int32)
    gate_up = torch.stack([torch.cat((m.gate_proj.weight, m.up_proj.weight)) for m in mlps])
    down = torch.stack([m.down_proj.weight for m in mlps])  # (E, C, F)
    h = F.grouped_mm(xs.to(dtype), gate_up.to(dtype).transpose(1, 2), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    # The kernel takes only dense gradients: keep the product contiguous for its backward.
    return F.grouped_mm((F.silu(gate) * up).contiguous(), down.to(dtype).transpose(1, 2), offs=offs)


class SparseMoeBlock(nn.Module):
    """Router + experts, with transformers' ``Qwen3MoeSparseMoeBlock`` parameter names.

    In a forward with gradients on (training), the router logits are kept in
    ``router_logits`` until :func:`pop_router_logits` takes them for the auxiliary loss.
    """

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.aux_loss_coef = config.router_aux_loss_coef
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            MLP(config, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        self.router_logits: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits (N, E), top-k weights (N, k) in x's dtype and expert ids (N, k)."""
        logits = self.gate(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, C)
        logits, weights, ids = self.route(flat)
        if torch.is_grad_enabled():
            self.router_logits = logits
        flat_ids = ids.reshape(-1)
        order = flat_ids.argsort(stable=True)  # (N*k,) pairs grouped by expert
        counts = torch.bincount(flat_ids, minlength=self.num_experts)
        experts: list[MLP] = list(self.experts)  # type: ignore[arg-type]
        if not _grouped_mm_usable(flat):
            # One host sync for the row counts: each expert's rows are then a plain slice.
            return swiglu_experts(flat, weights, order, counts.tolist(), experts).view(shape)
        token = order // ids.shape[1]  # (N*k,) each routed row's token
        # index_select, not flat[token]: advanced indexing and its backward (index_put_ with
        # accumulate) cost ~8x more at this size (benchmarks/results/moe.md).
        xs = flat.index_select(0, token)  # (N*k, C)
        ys = grouped_swiglu(xs, counts, experts, torch.bfloat16)
        # Each output scaled by its routing weight and added to its token's row (N tiny bmm
        # calls would cost more than the experts' matmuls).
        ys = ys * weights.reshape(-1).index_select(0, order).unsqueeze(-1)
        out = torch.zeros_like(flat).index_add_(0, token, ys)  # (N, C)
        return out.view(shape)


def pop_router_logits(model: nn.Module) -> list[torch.Tensor]:
    """The router logits each sparse block of ``model`` kept in its last forward with gradients
    on, in layer order; the blocks forget them. Empty for a dense model."""
    out = []
    for module in model.modules():
        if isinstance(module, SparseMoeBlock) and module.router_logits is not None:
            out.append(module.router_logits)
            module.router_logits = None
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
        logits = pop_router_logits(self.model)
        if self.block is None or not logits:
            return 0.0
        e, k = self.block.num_experts, self.block.top_k
        aux = load_balancing_loss(logits, e, k)
        stats = torch.stack([aux.detach(), expert_load(logits, e, k).float()])
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


def load_balancing_loss(
    router_logits: list[torch.Tensor], num_experts: int, top_k: int
) -> torch.Tensor:
    """transformers' ``load_balancing_loss_func`` (Switch Transformer, eqs. 4-6) without a padding
    mask: E * sum_e f_e * P_e, where f_e is expert e's share of the top-k assignments and P_e its
    mean router probability, both over the tokens of every layer together."""
    probs = torch.cat([F.softmax(g.float(), dim=-1) for g in router_logits])  # (L*N, E)
    _, selected = torch.topk(probs, top_k, dim=-1)
    counts = torch.bincount(selected.reshape(-1), minlength=num_experts).float()
    tokens_per_expert = counts / probs.shape[0]
    return num_experts * torch.sum(tokens_per_expert * probs.mean(dim=0))


def expert_load(router_logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """The largest expert's share of a layer's routed tokens, averaged over the layers: 1/E when
    perfectly balanced, 1/k (k experts per token) when every token picks the same experts."""
    shares = []
    for g in router_logits:
        ids = torch.topk(g.detach(), top_k, dim=-1).indices.reshape(-1)
        shares.append(torch.bincount(ids, minlength=num_experts).max() / ids.numel())
    return torch.stack(shares).mean()
