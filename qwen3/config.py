"""Qwen3 model configuration: Hugging Face field names, named presets, validation."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Shapes of the released Qwen3 dense models (Hugging Face config.json of each), plus two
# CPU-sized presets of our own. Parameter counts are checked in tests/test_qwen3_config.py.
_OFFICIAL_VOCAB = 151936
PRESETS: dict[str, dict[str, Any]] = {
    # Trains in minutes on 2 CPU cores: ~1.6 M parameters (1 M of them the tied embedding).
    "tiny": dict(
        vocab_size=8192,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        rope_theta=10000.0,
    ),
    # ~29 M parameters: a real small model for a GPU or a patient CPU.
    "small": dict(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=2048,
        rope_theta=10000.0,
    ),
    "qwen3-0.6b": dict(
        vocab_size=_OFFICIAL_VOCAB,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    "qwen3-1.7b": dict(
        vocab_size=_OFFICIAL_VOCAB,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    "qwen3-4b": dict(
        vocab_size=_OFFICIAL_VOCAB,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    "qwen3-8b": dict(
        vocab_size=_OFFICIAL_VOCAB,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    ),
    "qwen3-14b": dict(
        vocab_size=_OFFICIAL_VOCAB,
        hidden_size=5120,
        intermediate_size=17408,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    ),
    "qwen3-32b": dict(
        vocab_size=_OFFICIAL_VOCAB,
        hidden_size=5120,
        intermediate_size=25600,
        num_hidden_layers=64,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    ),
    # Mixture of experts. tiny-moe: tiny with 8 SwiGLU experts of 192 per layer, 2 per token, so
    # its active parameters are tiny's (plus the router's 1 k per layer), its total ~3 M.
    "tiny-moe": dict(
        vocab_size=8192,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=192,
        norm_topk_prob=True,
    ),
    "qwen3-30b-a3b": dict(
        vocab_size=_OFFICIAL_VOCAB,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        norm_topk_prob=True,
    ),
    "qwen3-235b-a22b": dict(
        vocab_size=_OFFICIAL_VOCAB,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=94,
        num_attention_heads=64,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=1536,
        norm_topk_prob=True,
    ),
}

# transformers' Qwen3MoeConfig defaults, for a qwen3_moe config.json that leaves a key out.
_HF_MOE_DEFAULTS: dict[str, Any] = dict(
    num_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=768,
    norm_topk_prob=False,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    router_aux_loss_coef=0.001,
)
_MOE_FIELDS = tuple(_HF_MOE_DEFAULTS)

# Keys of a Hugging Face config.json that carry no shape information for us.
_HF_ONLY_KEYS = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version"}
# SiLU under both of its names in transformers' ACT2FN.
_SILU = ("silu", "swish")


def _rope_variant(rope: Any) -> str | None:
    """What a rope_scaling / rope_parameters entry asks for beyond plain RoPE, or None."""
    if not rope:
        return None
    if not isinstance(rope, dict):
        return repr(rope)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        return f"rope_type={kind!r}"
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        return f"partial_rotary_factor={rope['partial_rotary_factor']!r}"
    return None


def _check_same_maths(d: dict[str, Any]) -> None:
    """Refuse, in one line naming the key, a config.json whose settings would make transformers
    compute something this model does not: loading it would give other numbers without a word.
    Every field of transformers' Qwen3Config is either implemented here or checked below."""
    for key in ("rope_scaling", "rope_parameters"):
        variant = _rope_variant(d.get(key))
        if variant is not None:
            raise ValueError(
                f"config.json sets {key} with {variant}: scaled RoPE is not implemented here, "
                "so this model would compute other numbers; use a model with plain RoPE."
            )
    if d.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(
            f"config.json sets partial_rotary_factor={d['partial_rotary_factor']!r}: RoPE over "
            "part of each head is not implemented here; use a model that rotates whole heads."
        )
    rope = d.get("rope_parameters")
    top, nested = d.get("rope_theta"), rope.get("rope_theta") if isinstance(rope, dict) else None
    if top is not None and nested is not None and float(top) != float(nested):
        raise ValueError(
            f"config.json sets rope_theta={top!r} but rope_parameters.rope_theta={nested!r}; "
            "make the two agree (the weights were trained with one of them)."
        )
    # As transformers reads them: a window only with use_sliding_window, on the layers that
    # layer_types names, or else on those from max_window_layers on.
    window = d.get("sliding_window") if d.get("use_sliding_window") else None
    types = d.get("layer_types")
    if types is None:
        first = d.get("max_window_layers", 28)  # transformers' default
        types = [
            "sliding_attention" if i >= first else "full_attention"
            for i in range(d.get("num_hidden_layers", 0))
        ]
    sliding = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    if window is not None and sliding:
        raise ValueError(
            f"config.json sets use_sliding_window=true: layer {sliding[0]} would attend only "
            f"within sliding_window={window}, which is not implemented here; use a model with "
            "full attention in every layer."
        )
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ValueError(
            f"config.json sets layer_types with {unknown[0]!r}: only full attention is "
            "implemented here; use a model with full attention in every layer."
        )
    quant = d.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise ValueError(
            f"config.json sets quantization_config (quant_method={method!r}): quantized "
            "weights are not implemented here; use the unquantized (bf16 or fp32) release."
        )


@dataclass
class Qwen3Config:
    """Shape and numerics of a Qwen3 model, with the field names of Hugging Face's ``Qwen3Config``
    (and ``Qwen3MoeConfig``'s for a mixture of experts: ``num_experts > 0``).

    ``attention_dropout`` drops attention weights in training mode only, as transformers does.
    Settings of a ``config.json`` that this model does not implement (scaled RoPE, sliding
    windows, quantization) are refused by :meth:`from_dict`, never ignored.
    """

    vocab_size: int = 8192  # embedding rows (the tokenizer's size, padded to a multiple of 64)
    hidden_size: int = 128  # width of the residual stream
    intermediate_size: int = 384  # width of each dense SwiGLU MLP
    num_hidden_layers: int = 3  # decoder blocks
    num_attention_heads: int = 4  # query heads per block
    num_key_value_heads: int = 2  # key/value heads (grouped-query attention shares each)
    head_dim: int = 32  # channels per attention head
    max_position_embeddings: int = 1024  # longest context the model is built for
    rope_theta: float = 10000.0  # RoPE base frequency
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm
    tie_word_embeddings: bool = True  # the LM head shares the embedding's weights
    attention_bias: bool = False  # biases on the q/k/v/o projections
    attention_dropout: float = 0.0  # dropout on attention weights, in training mode only
    hidden_act: str = "silu"  # the MLP's activation (SwiGLU: silu only)
    initializer_range: float = 0.02  # std of the normal initialisation of weights
    bos_token_id: int | None = None  # null: taken from the tokenizer
    eos_token_id: int | None = None  # null: taken from the tokenizer (<|endoftext|>)
    pad_token_id: int | None = None  # null: taken from the tokenizer
    # Mixture of experts (transformers' Qwen3MoeConfig names); num_experts=0 is the dense model.
    # Layer i is sparse unless i is in mlp_only_layers or (i + 1) % decoder_sparse_step != 0.
    num_experts: int = 0  # experts per sparse MLP; 0 = the dense model
    num_experts_per_tok: int = 2  # experts each token is routed to
    moe_intermediate_size: int = 192  # width of each expert's SwiGLU MLP
    norm_topk_prob: bool = True  # renormalise the chosen experts' router weights to sum to 1
    decoder_sparse_step: int = 1  # every this-many-th layer is sparse
    mlp_only_layers: list[int] = field(default_factory=list)  # layer indices kept dense
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss (0 = off)
    # Fields we do not interpret but carry through a Hugging Face config.json untouched.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Qwen3Config.{name}={value!r}: must be a positive integer.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Qwen3Config.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}: grouped-query attention shares each "
                "kv head among a whole number of query heads; pick num_key_value_heads dividing it."
            )
        if self.head_dim % 2:
            raise ValueError(
                f"Qwen3Config.head_dim={self.head_dim} is odd: RoPE rotates pairs of channels; "
                "use an even head_dim (64 or 128 are usual)."
            )
        if self.rope_theta <= 0:
            raise ValueError(
                f"Qwen3Config.rope_theta={self.rope_theta}: must be > 0 (10000 or 1e6)."
            )
        if self.rms_norm_eps <= 0:
            raise ValueError(
                f"Qwen3Config.rms_norm_eps={self.rms_norm_eps}: must be > 0 (e.g. 1e-6)."
            )
        if self.hidden_act not in _SILU:
            raise ValueError(
                f"Qwen3Config.hidden_act={self.hidden_act!r}: Qwen3 uses SwiGLU; only 'silu' is supported."
            )
        p = self.attention_dropout
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p < 1:
            raise ValueError(
                f"Qwen3Config.attention_dropout={p!r}: must lie in [0, 1) (0.0 = off, as in "
                "pretraining; 0.1 is usual when it is on)."
            )
        self._check_moe()

    def _check_moe(self) -> None:
        e, k = self.num_experts, self.num_experts_per_tok
        if isinstance(e, bool) or not isinstance(e, int) or e < 0:
            raise ValueError(
                f"Qwen3Config.num_experts={e!r}: must be an integer >= 0 (0 = dense model)."
            )
        if e == 0:
            return
        for name in ("num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(
                    f"Qwen3Config.{name}={value!r}: must be a positive integer in a mixture-of-"
                    f"experts model (num_experts={e}); set it, or num_experts=0 for a dense model."
                )
        if k > e:
            raise ValueError(
                f"Qwen3Config.num_experts_per_tok={k} exceeds num_experts={e}: each token is "
                "routed to that many distinct experts; set num_experts_per_tok <= num_experts."
            )
        n = self.num_hidden_layers
        bad = [i for i in self.mlp_only_layers if not (isinstance(i, int) and 0 <= i < n)]
        if bad:
            raise ValueError(
                f"Qwen3Config.mlp_only_layers has {bad[0]!r}, not a layer index of this "
                f"{n}-layer model; list indices in 0..{n - 1}."
            )
        c = self.router_aux_loss_coef
        if isinstance(c, bool) or not isinstance(c, int | float) or c < 0:
            raise ValueError(
                f"Qwen3Config.router_aux_loss_coef={c!r}: must be >= 0 (0.001 as released; 0 "
                "turns the load-balancing loss off)."
            )

    @property
    def is_moe(self) -> bool:
        """Whether any layer is a sparse mixture-of-experts block."""
        return any(self.is_sparse_layer(i) for i in range(self.num_hidden_layers))

    def is_sparse_layer(self, layer_idx: int) -> bool:
        """transformers' Qwen3MoeDecoderLayer rule for whether layer ``layer_idx`` is sparse."""
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Qwen3Config:
        """The named preset (``tiny``, ``small``, ``qwen3-0.6b`` ... ``qwen3-32b``, ``tiny-moe``,
        ``qwen3-30b-a3b``, ``qwen3-235b-a22b``), with overrides."""
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"Unknown Qwen3 preset {name!r}. Known presets: {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[key], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dictionary: ``Qwen3ForCausalLM``, or with experts
        (``num_experts > 0``) ``Qwen3MoeForCausalLM``."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d = {**self.extra, **d}
        if self.num_experts > 0:
            d.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe")
            d["mlp_only_layers"] = list(self.mlp_only_layers)
        else:
            for name in _MOE_FIELDS:
                d.pop(name)
            d.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3")
        d["torch_dtype"] = "float32"
        d.setdefault("use_cache", True)
        d.setdefault("rope_scaling", None)
        d.setdefault("sliding_window", None)
        d.setdefault("use_sliding_window", False)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Qwen3Config:
        """Build from a Hugging Face ``config.json`` dictionary; unknown keys are kept in ``extra``."""
        model_type = d.get("model_type", "qwen3")
        if model_type not in ("qwen3", "qwen3_moe"):
            raise ValueError(
                f"config.json has model_type={model_type!r}, not 'qwen3' or 'qwen3_moe': this "
                "loader reads Qwen3 models only."
            )
        _check_same_maths(d)
        if model_type == "qwen3_moe":
            d = {**_HF_MOE_DEFAULTS, **d}
            # transformers 5 writes num_experts under its attribute_map name.
            if "num_local_experts" in d:
                d["num_experts"] = d.pop("num_local_experts")
        else:  # a dense config.json's stray MoE keys would not make transformers' Qwen3 sparse
            d = {k: v for k, v in d.items() if k not in _MOE_FIELDS}
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k not in _HF_ONLY_KEYS}
        if (
            known.get("head_dim") is None
            and "hidden_size" in known
            and "num_attention_heads" in known
        ):
            known["head_dim"] = known["hidden_size"] // known["num_attention_heads"]
        if known.get("num_key_value_heads") is None and "num_attention_heads" in known:
            known["num_key_value_heads"] = known["num_attention_heads"]
        # transformers 5 moves rope_theta under rope_parameters.
        rope = extra.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in known:
            known["rope_theta"] = rope["rope_theta"]
        for int_field in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(known.get(int_field), list):
                extra[f"{int_field}_list"] = known[int_field]
                known[int_field] = known[int_field][0]
        return cls(**known, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | Path) -> Qwen3Config:
        """Read a Hugging Face ``config.json``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path} not found: a Qwen3 model directory needs a config.json."
            ) from None
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path} is not valid JSON ({e}); re-save or re-download it."
            ) from None
        return cls.from_dict(data)

    @property
    def kv_groups(self) -> int:
        """How many query heads share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads


# Embedding rows are padded to a multiple of this when the project trains the tokenizer: matmul
# kernels tile the vocabulary dimension in multiples of 64 (nanoGPT, Megatron's padded vocab).
VOCAB_MULTIPLE = 64


def padded_vocab_size(n_tokens: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """``n_tokens`` rounded up to a multiple of ``multiple``."""
    return -(-n_tokens // multiple) * multiple
