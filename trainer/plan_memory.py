"""The memory model behind ``train.py plan``: the bytes one device holds during a training step
of a run, by part, computed from the shapes alone (no tensor is allocated).

Every figure follows the code that allocates it: float32 master weights and gradients, Muon's
momentum and AdamW's two moments in float32 (``optim/``), the activations each decoder block
keeps for backward under ``trainer.activation_checkpointing`` (``qwen3/layers.py``,
``qwen3/checkpointing.py``), the fused loss's chunk (``qwen3/loss.py``), FSDP2's gathered
layers and DDP's gradient buckets (``trainer/distributed.py``). torch has no estimator for
this (torchtitan removed its FSDP memory estimator), hence this file; its figures are checked
against measured peaks in ``benchmarks/bench_plan.py`` (benchmarks/results/plan.md).

A step's peak is the larger of two moments: the end of the forward pass (all saved
activations, the loss chunk and the head's gradient formed in forward) and the optimizer step
(all gradients plus Muon's working memory). Both sit on top of the weights and optimizer state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from optim import batched_muon
from optim.muon_math import matrix_shape
from optim.param_groups import split_parameters, split_rows
from qwen3 import Qwen3, Qwen3Config
from qwen3.loss import chunk_rows_for
from qwen3.projections import _STACK_MAX_NUMEL


@dataclass(frozen=True)
class Setup:
    """What the memory of a step depends on besides the model's shape."""

    micro_batch: int  # sequences per forward pass (trainer.batch_size)
    seq_len: int
    grad_accum: int
    devices: int
    fsdp: bool  # shard weights, gradients and optimizer state over ``devices``
    low_precision: bool  # bf16 autocast (fp32 masters); False: float32 throughout
    on_gpu: bool  # chunk sizes and kernels of an accelerator (else the CPU's)
    checkpointing: str  # none | full | selective
    device_memory: int  # bytes of one device (bounds the loss chunk on a GPU)


@dataclass(frozen=True)
class Counts:
    """Parameter counts (elements) the memory model needs, from the model built on ``meta``."""

    total: int
    muon: int  # matrices Muon updates (momentum: 1 float32 each)
    adamw: int  # the rest (two float32 moments each)
    # Muon's batches (matrices of one shape, stacked): (elements, elements of their Gram
    # matrices: each matrix's smaller side squared, whether they are stacks of matrices)
    muon_batches: tuple[tuple[int, int, bool], ...]
    per_layer: int  # the largest decoder layer's parameters
    root: int  # parameters outside the layers (embedding, head, final norm)
    layer_matmul: int  # the largest layer's matmul weights (q/k/v/o, MLP or experts)
    head: int  # the LM head's elements (V x C)


@dataclass(frozen=True)
class Memory:
    """Bytes per device of each part of a training step, and the three moments whose largest
    is the step's peak."""

    weights: int
    grads: int
    optimizer: int
    activations: int  # saved for backward, all layers, at the end of the forward pass
    loss_chunk: int  # the fused loss's working set (one chunk of logits and its gradient)
    backward_work: int  # one layer recomputed (under checkpointing) and gradients through it
    gathered: int  # FSDP's gathered layers and root, or autocast's bf16 weight copies
    ddp_buckets: int  # DDP's copy of the gradients it all-reduces
    muon_work: int  # Muon's temporaries during the optimizer step
    forward_peak: int  # the end of the forward pass
    backward_peak: int  # the end of the backward pass (all gradients, one layer's work)
    step_peak: int  # the optimizer step

    @property
    def peak(self) -> int:
        return max(self.forward_peak, self.backward_peak, self.step_peak)


def model_counts(model: Qwen3, optimizer: str) -> Counts:
    """The parameter counts the memory model needs, from a model (built on ``meta``)."""
    split = split_parameters(model)
    muon = split.matrices if optimizer == "muon" else []
    batches: dict[tuple[int, int, bool], int] = {}  # (rows, cols, stacked) -> elements
    for name, p in muon:
        key = (*matrix_shape(p.shape, split_rows(name)), p.ndim > 2)
        batches[key] = batches.get(key, 0) + p.numel()
    grams = tuple((n, n // (r * c) * min(r, c) ** 2, st) for (r, c, st), n in batches.items())
    layers = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    matmul = max(
        sum(p.numel() for p in layer.parameters() if p.ndim >= 2) for layer in model.model.layers
    )
    total = model.num_params()
    return Counts(
        total=total,
        muon=sum(p.numel() for _, p in muon),
        adamw=total - sum(p.numel() for _, p in muon),
        muon_batches=grams,
        per_layer=max(layers),
        root=total - sum(layers),
        layer_matmul=matmul,
        head=model.lm_head.weight.numel(),
    )


def _layer_activations(cfg: Qwen3Config, layer: int, n: int, s: Setup) -> int:
    """Bytes one decoder layer keeps for backward with no checkpointing, for ``n`` tokens: the
    tensors its ops save (qwen3/layers.py), in the compute dtype (a float32 copy where a norm
    upcasts its input under autocast)."""
    c, h, k, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    a = 2 if s.low_precision else 4
    # Each RMSNorm: its input (float32 under autocast: the upcast copy it saves), the normed
    # value before the weight (autocast only) and the output the projections save.
    norms = 2 * n * c * ((4 + a + a) if s.low_precision else (a + a))
    qkv = n * (h + 2 * k) * d
    qk = n * (h + k) * d
    # Small projections run as one matmul against their stacked weights (qwen3/projections.py):
    # the stack is a copy saved for backward, and q|k|v one output whose slices the norms save.
    stacked_qkv = c * (h + 2 * k) * d <= _STACK_MAX_NUMEL
    stacked_mlp = 2 * c * cfg.intermediate_size <= _STACK_MAX_NUMEL
    copies = a * c * (h + 2 * k) * d * stacked_qkv
    copies += a * 2 * c * cfg.intermediate_size * (stacked_mlp and not cfg.is_sparse_layer(layer))
    if s.low_precision:  # q, k upcast by their norms, normed, rotated; v (or all of q|k|v)
        attn = 4 * qk + 2 * a * qk + a * (qkv if stacked_qkv else n * k * d)
    elif stacked_qkv:  # q|k|v (the norm's input), q|k normed, then rotated
        attn = a * qkv + 2 * a * qk
    else:  # q, k before their norms, v, rotated q and k
        attn = a * qkv + a * qk
    attn += 2 * a * n * h * d + 4 * n * h  # SDPA's output, its reshaped copy for o_proj, lse
    if cfg.is_sparse_layer(layer):
        e, top, f = cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
        routed = n * top
        # router logits and float32 probabilities; per routed row: the gathered input, the
        # gate|up output, silu(gate), the product and the weighted output
        mlp = n * e * (a + 4) + routed * (c * a + 2 * f * a + 2 * f * a + c * a) + n * c * a
    else:
        mlp = 4 * a * n * cfg.intermediate_size  # gate, up, silu(gate), their product
    return norms + attn + mlp + copies


def _layer_saved_selective(cfg: Qwen3Config, layer: int, n: int, s: Setup) -> int:
    """Bytes one layer keeps under selective checkpointing: its input, and the outputs of its
    matmuls and of attention (qwen3/checkpointing.py's saved ops)."""
    c, h, k, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    a = 2 if s.low_precision else 4
    saved = n * c + n * (h + 2 * k) * d + n * h * d + n * c  # input, q|k|v, SDPA out, o_proj
    if cfg.is_sparse_layer(layer):
        top, f = cfg.num_experts_per_tok, cfg.moe_intermediate_size
        saved += n * cfg.num_experts + n * top * (2 * f + c)  # router, experts' matmuls
    else:
        saved += 2 * n * cfg.intermediate_size + n * c  # gate, up, down
    return a * saved + 4 * n * h


def activation_bytes(cfg: Qwen3Config, s: Setup) -> tuple[int, int]:
    """Bytes saved for backward over all layers at the end of the forward pass, and the
    largest one-layer working set of the backward pass on top of them (a recomputed layer
    under checkpointing, and the gradients flowing through it)."""
    n = s.micro_batch * s.seq_len
    a = 2 if s.low_precision else 4
    layers = range(cfg.num_hidden_layers)
    full = [_layer_activations(cfg, i, n, s) for i in layers]
    # Backward through one layer: the activation gradients (x, and the MLP's widest tensors)
    width = max(cfg.intermediate_size, cfg.num_experts_per_tok * cfg.moe_intermediate_size)
    grads = a * n * (2 * cfg.hidden_size + 3 * width)
    if s.checkpointing == "full":
        return a * n * cfg.hidden_size * len(full), max(full) + grads
    if s.checkpointing == "selective":
        return sum(_layer_saved_selective(cfg, i, n, s) for i in layers), max(full) + grads
    embed = a * n * cfg.hidden_size  # the embedding output entering layer 0
    return sum(full) + embed, grads


def loss_chunk_bytes(cfg: Qwen3Config, vocab: int, s: Setup) -> int:
    """The fused loss's working set while it runs in forward (qwen3/loss.py): one chunk's
    logits in float32 and their log-softmax, while the previous chunk's probabilities (and
    under autocast their bf16 copy) are still held, and the hidden states' gradient."""
    n = s.micro_batch * s.seq_len
    device = "cuda" if s.on_gpu else "cpu"
    rows = min(n, chunk_rows_for(vocab, device, s.device_memory if s.on_gpu else None))
    previous = (4 + (2 if s.low_precision else 0)) if n > rows else 0
    per_row = vocab * (4 + 4 + previous)
    grad_h = n * cfg.hidden_size * (2 if s.low_precision else 4)
    head_copy = 2 * vocab * cfg.hidden_size if s.low_precision and not s.fsdp else 0
    return rows * per_row + grad_h + head_copy


def muon_work_bytes(c: Counts, s: Setup, nesterov: bool) -> int:
    """Muon's temporaries in a step (optim/batched_muon.py): each shape's batch runs in chunks
    of at most ``optim.batched_muon.CHUNK_BYTES`` of float32 matrices, at most three in flight.
    The chunk being iterated holds its Nesterov update (float32), its stack, and the iterates
    and Gram matrices in the iteration's dtype (bf16 on a GPU, float32 on CPU); the two before
    it hold their results until applied, under FSDP with ShardedMuon's send, receive and
    return buffers for row-sharded matrices (optim/sharded_muon.py)."""
    shard = s.devices if s.fsdp else 1
    ns = 2 if s.on_gpu else 4
    most = batched_muon.CHUNK_BYTES // 4  # elements of one chunk (read here: tests patch it)
    chunks: list[tuple[float, float, bool]] = []  # (elements, Gram elements, exchanged)
    for elements, gram, stacked in c.muon_batches:
        here = elements / shard
        n = max(1, math.ceil(here / most))
        chunks += [(here / n, gram / shard / n, s.fsdp and not stacked)] * min(n, 3)
    held = sorted(e * ns * (4 if exchanged else 1) for e, _, exchanged in chunks)
    working = max((e * (4 * nesterov + 4 + 2 * ns) + 2 * ns * g for e, g, _ in chunks), default=0)
    return int(sum(held[-2:]) + working)


def memory(
    cfg: Qwen3Config, c: Counts, vocab: int, s: Setup, optimizer: str, nesterov: bool
) -> Memory:
    """The bytes one device holds in a training step of ``cfg`` set up as ``s``."""
    shard = s.devices if s.fsdp else 1
    weights = 4 * math.ceil(c.total / shard)
    grads = 4 * math.ceil(c.total / shard)
    muon = c.muon if optimizer == "muon" else 0
    opt = 4 * math.ceil(muon / shard) + 8 * math.ceil((c.total - muon) / shard)
    saved, backward = activation_bytes(cfg, s)
    chunk = loss_chunk_bytes(cfg, vocab, s)
    pb = 2 if s.low_precision else 4  # bytes of a gathered (computing) parameter
    sharded = s.fsdp and s.devices > 1
    embed = vocab * cfg.hidden_size
    if sharded:
        # the root (embedding, head) stays gathered from forward to backward, two layers are
        # gathered at a time (one prefetched); in backward a layer's and the root's unsharded
        # gradients, in the compute dtype and float32 for the reduce-scatter
        gathered = pb * c.root + 2 * pb * c.per_layer
        backward_extra = gathered + (pb + 4) * max(c.per_layer, c.root)
    else:
        # autocast's bf16 copy of each matmul weight, kept for backward unless recomputed
        copies = c.layer_matmul * (cfg.num_hidden_layers if s.checkpointing == "none" else 1)
        gathered = 2 * copies if s.low_precision else 0
        # a tied embedding's dense gradient, added to the head's that the loss formed
        backward_extra = 4 * embed if cfg.tie_word_embeddings else 0
    head_grad = 4 * math.ceil(c.head / shard)  # formed by the loss in forward
    ddp = grads if s.devices > 1 and not s.fsdp else 0  # DDP's gradient buckets
    base = weights + opt
    early = (grads + ddp) if s.grad_accum > 1 else head_grad  # a later micro-batch's forward
    forward_peak = base + early + saved + chunk + gathered
    backward_peak = base + grads + ddp + backward + backward_extra
    work = muon_work_bytes(c, s, nesterov) if optimizer == "muon" else 0
    step_peak = base + grads + ddp + work
    return Memory(
        weights,
        grads,
        opt,
        saved,
        chunk,
        backward,
        gathered,
        ddp,
        work,
        forward_peak,
        backward_peak,
        step_peak,
    )


def step_memory(
    cfg: Qwen3Config, s: Setup, optimizer: str = "muon", nesterov: bool = True
) -> Memory:
    """:func:`memory` of ``cfg`` (its own vocabulary), counted on a model built on ``meta``."""
    with torch.device("meta"):
        model = Qwen3(cfg)
    return memory(cfg, model_counts(model, optimizer), cfg.vocab_size, s, optimizer, nesterov)
