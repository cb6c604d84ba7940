"""The building blocks of a Qwen3 decoder layer, with Hugging Face's parameter names.

RMSNorm (float32 inside), rotary position embeddings, grouped-query attention with per-head
q/k RMSNorm before RoPE, and the SwiGLU MLP. Shapes: B batch, T new tokens, S cached + new
tokens, H query heads, K key/value heads, D head_dim, C hidden size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from qwen3.cache import KVCache
from qwen3.checkpointing import ActivationCheckpointing, run_block
from qwen3.config import Qwen3Config
from qwen3.cpu_attention import causal_attention, use_cpu_attention
from qwen3.device import compute_dtype
from qwen3.documents import AttentionMask, flex_attend
from qwen3.projections import _derived, inference_linear, inference_mode, stacked_linear
from qwen3.swiglu import swiglu

# How many positions of cos/sin to precompute; longer sequences extend the table on demand.
_ROPE_PRECOMPUTE = 4096


def rms_norm_f32(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``F.rms_norm(x, (D,), weight, eps)`` for float32. Under ``torch.inference_mode()`` its
    own steps written out, bit for bit (x * x summed over D, divided by D, plus eps, rsqrt, times
    x, times the weight): on CPU torch runs the function as a composite of about a dozen calls
    (dtype casts, ``mean``, a division by a Python number), which costs the per-token decode
    path more than the arithmetic does (measured in benchmarks/results/generate.md)."""
    if not inference_mode():
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    scale = (x * x).sum(dim=-1, keepdim=True)
    scale.div_(_float_tensor(x.shape[-1], x.device)).add_(eps).rsqrt_()
    out = x * scale
    return out if weight is None else out.mul_(weight)


_FLOATS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _float_tensor(value: int, device: torch.device) -> torch.Tensor:
    """``value`` as a 0-d float32 tensor, made once: an operand that is a Python number costs a
    small tensor per call on the CPU."""
    key = (value, device)
    if key not in _FLOATS:
        _FLOATS[key] = torch.tensor(float(value), device=device)
    return _FLOATS[key]


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 and cast back, then scaled (as in transformers).

    The output has the input's dtype: the weight is cast to it first (a float32 weight times a
    bf16 input would promote to float32, and q/k would reach attention in float32 under
    autocast). With a weight of the input's dtype this is transformers' product exactly."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # Same products in the same order as below, one call instead of four.
            return rms_norm_f32(x, self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight.to(x.dtype) * normed.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Precomputed RoPE tables (non-persistent buffers), in the rotate-half layout of transformers."""

    cos: torch.Tensor  # (P, D) float32
    sin: torch.Tensor

    def __init__(self, head_dim: int, theta: float, max_positions: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        cos, sin = self._table(min(max_positions, _ROPE_PRECOMPUTE))
        self.register_buffer("cos", cos, persistent=False)  # (P, D)
        self.register_buffer("sin", sin, persistent=False)

    def _table(
        self, n: int, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
        inv_freq = 1.0 / (self.theta ** (exponents / self.head_dim))
        pos = torch.arange(n, dtype=torch.int64, device=device).float()
        freqs = torch.outer(pos, inv_freq)  # (n, D/2)
        cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1)
        # rotate_half's sign folded into the table: rope(x) = x * cos + roll(x, D/2) * sin.
        sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)
        return cos, sin

    def _ensure(self, n: int) -> None:
        # Recompute when too short, or when model.to(dtype) / to_empty() changed the float32 table.
        if n > self.cos.shape[0] or self.cos.dtype != torch.float32:
            size = max(n, self.cos.shape[0] if n <= self.cos.shape[0] else 2 * self.cos.shape[0])
            self.cos, self.sin = self._table(size, device=self.cos.device)

    def reset(self) -> None:
        """Recompute the tables in place (after ``to_empty()`` left them uninitialised)."""
        self.cos, self.sin = self._table(self.cos.shape[0], device=self.cos.device)

    def forward(
        self,
        seq_len: int,
        position_ids: torch.Tensor | None,
        start: int = 0,
        max_position: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin, (T, 1, D) for positions start..start+T or (B, T, 1, D) for
        ``position_ids``, to broadcast over (B, T, heads, D). ``max_position``: a known upper
        bound of ``position_ids`` (saves reading it back from the device)."""
        if position_ids is None:
            self._ensure(start + seq_len)
            end = start + seq_len
            return self.cos[start:end, None], self.sin[start:end, None]
        bound = int(position_ids.max()) if max_position is None else max_position
        self._ensure(bound + 1)
        return self.cos[position_ids].unsqueeze(2), self.sin[position_ids].unsqueeze(2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys (..., D) by the angles of the tables, in x's dtype.

    Equal to transformers' ``x * cos + rotate_half(x) * sin``: rotating the halves is a roll by
    D/2 whose sign lives in our ``sin`` table.
    """
    rolled = x.roll(x.shape[-1] // 2, dims=-1)
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.addcmul(x * cos, rolled, sin)


def sdpa_native_gqa(device_type: str, dtype: torch.dtype, has_mask: bool, head_dim: int) -> bool:
    """Whether SDPA should get the grouped key/value heads as they are (``enable_gqa=True``) rather
    than repeated to the query heads.

    On CUDA only the flash kernel honours ``enable_gqa`` (torch 2.13's dispatch: the
    memory-efficient kernel requires equal head counts, and cuDNN is tried first only where flash
    would also run). Flash needs fp16/bf16, no explicit mask, and a head_dim that is a multiple of 8
    up to 256; any other call with ``enable_gqa`` lands on the O(T^2)-memory math kernel, so there
    the heads are repeated and the memory-efficient kernel (float32 and masks included) runs.
    Flash also needs an Ampere or newer GPU; on older ones every GQA call should repeat the heads,
    which this function does not check (the framework's CUDA target is Ampere+). On CPU, torch's
    flash kernel takes grouped heads in any dtype and with a mask, so they go as they are (also on
    MPS, as before)."""
    if device_type != "cuda":
        return True
    half = dtype in (torch.float16, torch.bfloat16)
    return half and not has_mask and head_dim % 8 == 0 and head_dim <= 256


class Attention(nn.Module):
    """Grouped-query causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, config: Qwen3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout  # on the attention weights, in training only
        bias = config.attention_bias
        c, hd = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(c, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(c, self.n_kv * hd, bias=bias)
        self.v_proj = nn.Linear(c, self.n_kv * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, c, bias=bias)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        # bf16 training on a CPU runs qwen3.cpu_attention's Function at short sequences, except
        # under selective checkpointing (qwen3.model.set_activation_checkpointing clears this),
        # which saves SDPA's output by op and would recompute the Function's softmax instead.
        self.hand_backward = True

    def _qk_norm(self, qk: torch.Tensor) -> torch.Tensor:
        """``q_norm`` on the first H heads and ``k_norm`` on the last K of (B, T, H + K, D): one
        normalisation, then one product with the two weights stacked per head. Same products in
        the same order as the two modules, in half the kernels."""
        qn, kn = self.q_norm, self.k_norm

        def build() -> tuple[torch.Tensor | None, ...]:  # (H + K, D)
            d = self.head_dim
            return (torch.cat((qn.weight.expand(self.n_heads, d), kn.weight.expand(self.n_kv, d))),)

        (weight,) = _derived(self, "_qk_weight", [qn.weight, kn.weight], build)
        assert weight is not None
        if qk.dtype == torch.float32 and weight.dtype == torch.float32:
            return rms_norm_f32(qk, None, qn.eps) * weight
        normed = F.rms_norm(qk.float(), (qk.shape[-1],), eps=qn.eps).to(qk.dtype)
        return weight.to(qk.dtype) * normed  # RMSNorm's low-precision path (dtype kept)

    def _project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (B, H|K|K, T, D), q and k normed and rotated."""
        b, t, _ = x.shape
        h, kv, d = self.n_heads, self.n_kv, self.head_dim
        # One matmul for q, k and v where the stack is small (stacked weights; the parameters
        # stay separate, so names, Muon's per-matrix updates and the HF layout are untouched).
        # q and k are adjacent in its output, so their per-head norm and RoPE run once over that
        # (B, T, H + K, D) view.
        qkv = stacked_linear(self, x, (self.q_proj, self.k_proj, self.v_proj))
        if qkv is not None:
            qk = apply_rope(self._qk_norm(qkv[..., : (h + kv) * d].view(b, t, h + kv, d)), cos, sin)
            q, k = qk[:, :, :h], qk[:, :, h:]
            v = qkv[..., (h + kv) * d :].view(b, t, kv, d)
        else:  # three matmuls, each output used where it is (never concatenated)
            q = apply_rope(self.q_norm(self.q_proj(x).view(b, t, h, d)), cos, sin)
            k = apply_rope(self.k_norm(self.k_proj(x).view(b, t, kv, d)), cos, sin)
            v = self.v_proj(x).view(b, t, kv, d)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        mask: AttentionMask | None = None,  # (B, 1, T, S) bool, True = may attend; or a BlockMask
    ) -> torch.Tensor:
        b, t, _ = x.shape
        h, kv, d = self.n_heads, self.n_kv, self.head_dim
        q, k, v = self._project(x, cos, sin)  # (B, H|K, T, D)
        if isinstance(mask, BlockMask):  # documents packed in a row, on CUDA (qwen3.documents)
            out = flex_attend(q, k, v, mask).transpose(1, 2).reshape(b, t, h * d)
            return inference_linear(out, self.o_proj)
        p = self.dropout if self.training else 0.0
        plain_causal = cache is None and mask is None and p == 0.0 and t > 1
        if plain_causal and self.hand_backward and use_cpu_attention(q, k, v):
            # bf16 training on a CPU: two batched matmuls and a softmax beat torch's flash kernel
            out = causal_attention(q, k, v).transpose(1, 2).reshape(b, t, h * d)
            return inference_linear(out, self.o_proj)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, D)
        # The dtype SDPA computes in (autocast's, if on), not whatever q arrived in.
        gqa = h == kv or sdpa_native_gqa(q.device.type, compute_dtype(q), mask is not None, d)
        if not gqa:  # a kernel that ignores enable_gqa would run: give it equal head counts
            k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
        if mask is None:
            # Training or a single-sequence prefill: plain causal. A one-token decode step with an
            # unpadded cache attends to everything before it, so no mask at all.
            causal = k.shape[2] == t
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=p, is_causal=causal and t > 1, enable_gqa=gqa
            )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=gqa
            )
        out = out.transpose(1, 2).reshape(b, t, h * d)
        return inference_linear(out, self.o_proj)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), ``intermediate_size`` wide unless ``width`` says
    otherwise (a mixture-of-experts expert is ``moe_intermediate_size`` wide)."""

    def __init__(self, config: Qwen3Config, width: int | None = None) -> None:
        super().__init__()
        c, f = config.hidden_size, width or config.intermediate_size
        self.gate_proj = nn.Linear(c, f, bias=False)
        self.up_proj = nn.Linear(c, f, bias=False)
        self.down_proj = nn.Linear(f, c, bias=False)
        # Eager training runs qwen3.swiglu's Function, except under selective checkpointing
        # (qwen3.model.set_activation_checkpointing clears this): that saves the matmuls'
        # outputs by op, which the Function's buffers would hide, so it would recompute them.
        self.hand_backward = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projections = (self.gate_proj, self.up_proj, self.down_proj)
        if (
            not torch.compiler.is_compiling()  # compiled graphs fuse the element-wise ops
            and self.hand_backward
            and torch.is_grad_enabled()
            and all(type(lin) is nn.Linear for lin in projections)  # not int8 (qwen3.quantize)
        ):
            return swiglu(x, *(lin.weight for lin in projections))
        gate_up = stacked_linear(self, x, (self.gate_proj, self.up_proj))
        if gate_up is None:  # two matmuls, their outputs used where they are
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); the MLP is a sparse
    mixture of experts on the layers ``config.is_sparse_layer`` names."""

    def __init__(self, config: Qwen3Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp: nn.Module
        if config.is_sparse_layer(layer_idx):
            from qwen3.moe import SparseMoeBlock  # qwen3.moe builds its experts from MLP

            self.mlp = SparseMoeBlock(config)
        else:
            self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Set by Qwen3.set_activation_checkpointing (a training choice, not part of the config).
        self.activation_checkpointing: ActivationCheckpointing = "none"
        # Set by qwen3.compile.compile_for_training: checkpointed_block compiled, which the
        # training forward (gradients on, no cache; a document mask or none) runs instead; evaluation and
        # generation stay eager (a decode step's growing cache would recompile every token).
        self.compiled_block: Callable[..., torch.Tensor] | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        mask: AttentionMask | None = None,
    ) -> torch.Tensor:
        if self.compiled_block is not None and cache is None and torch.is_grad_enabled():
            # The training forward; a document mask (qwen3.documents) is one more graph input.
            return self.compiled_block(x, cos, sin, None, mask)
        return self.checkpointed_block(x, cos, sin, cache, mask)

    def checkpointed_block(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        mask: AttentionMask | None,
    ) -> torch.Tensor:
        """The block under its activation checkpointing (what compile traces as one graph)."""
        return run_block(self._block, self.activation_checkpointing, x, cos, sin, cache, mask)

    def _block(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        mask: AttentionMask | None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))
