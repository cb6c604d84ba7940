"""The Qwen3 causal language model: embedding, decoder layers, final norm, (tied) LM head."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from qwen3.cache import KVCache
from qwen3.checkpointing import MODES, ActivationCheckpointing
from qwen3.config import Qwen3Config
from qwen3.device import compute_dtype
from qwen3.documents import AttentionMask, document_attention
from qwen3.layers import MLP, DecoderLayer, RMSNorm, RotaryEmbedding
from qwen3.loss import ChunkFn, linear_cross_entropy, linear_cross_entropy_stats
from qwen3.moe import Experts
from qwen3.projections import inference_linear


class Qwen3Backbone(nn.Module):
    """Token embedding, the decoder layers and the final norm (``model.*`` in Hugging Face names)."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention_dropout = config.attention_dropout
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.rope_theta, config.max_position_embeddings
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,  # (B, T), 1 = real token, 0 = padding
        document_ids: torch.Tensor | None = None,  # (B, T), packed documents (qwen3.documents)
    ) -> torch.Tensor:
        # Under autocast the residual stream is in the compute dtype, as under FSDP's bf16
        # parameters: every block then takes and returns that dtype (one numerics for both).
        x = self.embed_tokens(input_ids)  # (B, T, C)
        x = x.to(compute_dtype(x))
        t = input_ids.shape[1]
        mask: AttentionMask | None = None
        positions: torch.Tensor | None
        if cache is None:
            if attention_mask is not None:
                raise ValueError(
                    "attention_mask (padding) is only supported together with a KVCache."
                )
            if document_ids is None:
                cos, sin = self.rotary_emb(t, None)
            else:  # positions restart at each document; attention stays inside it
                dropout = self.attention_dropout if self.training else 0.0
                positions, mask = document_attention(document_ids, dropout)
                cos, sin = self.rotary_emb(t, positions, max_position=t - 1)
        elif document_ids is not None:
            raise ValueError("document_ids (packed documents) are for training, not a KVCache.")
        else:
            if attention_mask is None:
                positions, mask = cache.begin_dense(t)
            else:
                positions, mask = cache.begin(attention_mask.bool())
            # A position never exceeds its slot index, so the table size is known without a sync.
            cos, sin = self.rotary_emb(
                t, positions, start=cache.length, max_position=cache.length + t - 1
            )
        for layer in self.layers:
            x = layer(x, cos, sin, cache, mask)
        return self.norm(x)


class Qwen3(nn.Module):
    """A Qwen3 causal LM whose ``state_dict`` uses Hugging Face's ``Qwen3ForCausalLM`` names
    (``Qwen3MoeForCausalLM``'s for a mixture of experts, ``config.num_experts > 0``: qwen3.moe).

    Initialisation (for training from scratch, as in the reference): every linear and embedding
    weight is drawn from N(0, initializer_range=0.02); the two projections that write into the
    residual stream (``o_proj`` and ``down_proj``) are further scaled by 1/sqrt(2 * num_layers) so
    the residual variance does not grow with depth (GPT-2); norms start at 1, biases at 0. The
    tied LM head shares the embedding, so logits start small (no huge N(0, 1) logits, whose
    denormal softmax tails slow CPUs down).

    Build large presets without memory on the meta device: ``with torch.device("meta"): Qwen3(cfg)``.

    Speed: ``model(x, targets=y)`` fuses the LM head with the loss (``qwen3.loss``), so the
    (B*T, V) logits are never materialised. For training, ``qwen3.compile.compile_for_training``
    compiles each decoder block as one graph and the loss's chunk step (``trainer.compile=true``;
    figures in benchmarks/results/compile.md); ``torch.compile(model)`` also traces it whole.
    """

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3Backbone(config)
        # The loss's chunk step when compiled (qwen3.compile.compile_for_training), else None.
        self.loss_chunk: ChunkFn | None = None
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initialise every weight as the class docstring describes (on the meta device
        there are no values to set: skipping saves a minute on the largest MoE presets).

        Each weight is drawn whole on the CPU from the global RNG, module by module, so the
        values depend on the seed alone: not on the device, and not on FSDP sharding, where a
        parameter keeps its own rows of the whole draw and only one whole tensor exists at a
        time (:meth:`materialize`)."""
        if self.device.type == "meta":
            return
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scaled = name.endswith(("o_proj", "down_proj"))
                _draw_normal(module.weight, residual_std if scaled else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Experts):  # each expert's matrices, as Linear's above
                _draw_normal(module.gate_up_proj, std)
                _draw_normal(module.down_proj, residual_std)
            elif isinstance(module, nn.Embedding):
                _draw_normal(module.weight, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def materialize(self, device: torch.device | str, init: bool = True) -> None:
        """Give a model built on the meta device (``with torch.device("meta")``) its storage on
        ``device`` and initialise it (:meth:`reset_parameters`; ``init=False`` leaves the
        weights unset, for a caller that reads them next: :func:`qwen3.hf.load_sharded`). After
        FSDP's ``fully_shard`` each rank allocates and fills only its own shards, so no rank ever
        holds the whole float32 model."""
        self.to_empty(device=device)
        if self.config.tie_word_embeddings:  # to_empty gives a plain module's tied head a copy
            self.lm_head.weight = self.model.embed_tokens.weight
        self.model.rotary_emb.reset()
        if init:
            self.reset_parameters()

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) int64
        targets: torch.Tensor | None = None,  # (B, T) int64, -100 = ignore
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,  # (B, T), with a cache: 0 marks left padding
        logits_to_keep: int = 0,
        token_stats: bool = False,
        document_ids: torch.Tensor | None = None,  # (B, T) int, packed documents
    ) -> torch.Tensor:
        """Logits (B, T, V), or with ``targets`` the mean next-token cross-entropy (a scalar).

        ``token_stats=True`` (with ``targets``, for evaluation) returns (B, T, 2) float32 instead:
        each position's cross-entropy and 1.0 where the argmax is its target, computed chunk by
        chunk like the loss (``qwen3.loss.linear_cross_entropy_stats``), never as (B, T, V) logits.

        With a ``cache`` the new tokens are appended to it (their keys/values stored, positions
        continuing each row's own count) and the cache remembers the last logits.
        ``logits_to_keep=n`` (as in transformers) returns only the last n positions' logits
        (B, n, V), so a prefill does not pay for the LM head over the whole prompt; 0 keeps all.

        ``document_ids`` (no cache): the row holds several documents (equal ids = one document,
        ids never decreasing along a row); each attends only to itself and its positions start
        at 0, so the row computes what its documents compute run alone (``qwen3.documents``).
        The targets decide which predictions count (a boundary's is the caller's choice).
        """
        hidden = self.model(input_ids, cache, attention_mask, document_ids)  # (B, T, C)
        if targets is not None and token_stats:
            return linear_cross_entropy_stats(hidden, self.lm_head.weight, targets)
        if targets is not None:
            # Fused head + loss: the (B*T, V) logits and their gradient are never materialised.
            return linear_cross_entropy(
                hidden, self.lm_head.weight, targets, ignore_index=-100, chunk_fn=self.loss_chunk
            )
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = inference_linear(hidden, self.lm_head)  # (B, T or logits_to_keep, V)
        if cache is not None:
            cache.commit(logits[:, -1])
        return logits

    def set_activation_checkpointing(self, mode: ActivationCheckpointing) -> None:
        """Checkpoint every decoder block's activations as ``mode`` says (``qwen3.checkpointing``):
        ``none``, ``full`` or ``selective``. Call before wrapping for FSDP/DDP or compiling."""
        if mode not in MODES:
            raise ValueError(f"activation checkpointing {mode!r} is not one of {', '.join(MODES)}")
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)
            layer.activation_checkpointing = mode
            layer.self_attn.hand_backward = mode != "selective"
            if isinstance(layer.mlp, MLP):
                layer.mlp.hand_backward = mode != "selective"

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Number of distinct parameters (a tied head counts once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def estimate_flops(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at context ``seq_len``.

        6 per weight of every matmul, the LM head included even when tied to the embedding (the
        embedding lookup itself is free), plus the attention scores and mixing:
        12 * layers * heads * head_dim * seq_len (PaLM's convention, not halved for causality).
        In a mixture-of-experts layer a token runs through k of the E experts: k/E of their weights.
        """
        c = self.config
        matmul_params: float = sum(
            m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear)
        )
        for m in self.modules():
            if isinstance(m, Experts):
                experts = m.gate_up_proj.numel() + m.down_proj.numel()
                matmul_params += experts * c.num_experts_per_tok / c.num_experts
        attention = 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len
        return 6.0 * matmul_params + attention

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Qwen3:
        """Load a Hugging Face Qwen3 directory (``config.json`` + safetensors, sharded or not)."""
        from qwen3.hf import load_pretrained

        return load_pretrained(path, device=device, dtype=dtype)

    def save_pretrained(self, path: str | Path, write: bool = True) -> None:
        """Write ``config.json`` + ``model.safetensors`` that ``transformers`` loads as
        Qwen3ForCausalLM (Qwen3MoeForCausalLM for a mixture of experts). Sharded with FSDP2:
        every rank calls it, the one with ``write`` writes (:func:`qwen3.hf.save_pretrained`)."""
        from qwen3.hf import save_pretrained

        save_pretrained(self, path, write)


def _draw_normal(param: torch.Tensor, std: float) -> None:
    """``param`` ~ N(0, std), drawn whole on the CPU (so the same seed gives the same weights on
    every device); a DTensor shard keeps its own part of the whole draw."""
    whole = nn.init.normal_(torch.empty(param.shape, dtype=param.dtype), mean=0.0, std=std)
    if isinstance(param, DTensor):
        mine = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(mine.to_local())
    else:
        param.copy_(whole)
