"""Export a checkpoint to GGUF, the file llama.cpp, ollama and LM Studio load.

    python -m qwen3.gguf CKPT OUT.gguf [--dtype f32|f16|bf16|q8_0]

Written with the `gguf` package, as llama.cpp's own `convert_hf_to_gguf.py` writes a Qwen3
(architecture `qwen3`, its tensor names and hyperparameters, the vocabulary as byte-level BPE).
The converter names a BPE pre-tokenizer by hashing a test string's ids, which no freshly
trained vocabulary matches; ours is Qwen2's split, so it is written as `qwen2` once the
tokenizer.json is checked to hold exactly that split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from qwen3.hf import load_pretrained
from qwen3.model import Qwen3
from qwen3.tokenizer import PRETOKENIZE_REGEX, Qwen3Tokenizer

# --dtype: the file type and what its matrices are stored as (1-D tensors and norms stay f32,
# as in llama.cpp's converter).
DTYPES: dict[str, tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
ARCH = gguf.MODEL_ARCH.QWEN3
MOE_ARCH = gguf.MODEL_ARCH.QWEN3MOE


def _arch(model: Qwen3) -> gguf.MODEL_ARCH:
    """``qwen3``, or ``qwen3moe`` for a mixture of experts llama.cpp computes as we do: every
    layer sparse (its qwen3moe graph has no dense MLP) and the top-k weights renormalised (it
    always renormalises them, as the released models ask)."""
    c = model.config
    if c.num_experts == 0:
        return ARCH
    dense = [i for i in range(c.num_hidden_layers) if not c.is_sparse_layer(i)]
    if dense:
        raise ValueError(
            f"layer {dense[0]} of this mixture of experts is dense (mlp_only_layers / "
            "decoder_sparse_step): llama.cpp's qwen3moe has experts in every layer; export a "
            "model whose layers are all sparse, or use the Hugging Face directory"
        )
    if not c.norm_topk_prob:
        raise ValueError(
            "this mixture of experts has norm_topk_prob=false: llama.cpp's qwen3moe always "
            "renormalises the top-k weights, so it would compute other numbers; use the Hugging "
            "Face directory"
        )
    return MOE_ARCH


def check_qwen2_split(tokenizer: Qwen3Tokenizer) -> None:
    """Raise ValueError unless the tokenizer splits text exactly as llama.cpp's `qwen2`
    pre-tokenizer does: NFC (or no) normalization, Qwen2's regex isolated, then byte-level
    without its own regex, a BPE model that applies its merges, a byte-level decoder."""
    spec: dict[str, Any] = json.loads(tokenizer.tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    split = steps[0] if steps else {}
    byte_level = steps[-1] if len(steps) == 2 else {}
    normalizer = (spec.get("normalizer") or {}).get("type")
    model = spec.get("model") or {}
    problems = {
        "pre_tokenizer is not Split then ByteLevel": [s.get("type") for s in steps]
        != ["Split", "ByteLevel"],
        "its Split regex is not Qwen2's": split.get("pattern") != {"Regex": PRETOKENIZE_REGEX},
        "its Split is not 'Isolated' and uninverted": (split.get("behavior"), split.get("invert"))
        != ("Isolated", False),
        "its ByteLevel adds a prefix space or splits again": byte_level.get("add_prefix_space")
        is not False
        or byte_level.get("use_regex") is not False,
        f"normalizer {normalizer} is not NFC": normalizer not in (None, "NFC"),
        "the model is not a BPE that applies its merges": model.get("type") != "BPE"
        or bool(model.get("ignore_merges")),
        "the decoder is not ByteLevel": (spec.get("decoder") or {}).get("type") != "ByteLevel",
    }
    wrong = [what for what, bad in problems.items() if bad]
    if wrong:
        raise ValueError(
            f"the tokenizer is not Qwen2's byte-level BPE ({wrong[0]}), so llama.cpp's 'qwen2' "
            "pre-tokenizer would split text differently; export a checkpoint whose tokenizer was "
            "trained here (data.tokenizer_training) or is a Qwen2/Qwen3 one"
        )


def vocab_entries(tokenizer: Qwen3Tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Each id's token string and type, for all `n_vocab` rows of the embedding: special tokens
    are CONTROL, other added ones (the think tags) USER_DEFINED, ids past the tokenizer UNUSED
    (named as llama.cpp's converter names them)."""
    if tokenizer.vocab_size > n_vocab:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{n_vocab}; export a checkpoint whose tokenizer fits its model"
        )
    by_id = {i: t for t, i in tokenizer.tokenizer.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.tokenizer.get_added_tokens_decoder()
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i not in added:
            types.append(gguf.TokenType.NORMAL)
        elif added[i].special:
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.USER_DEFINED)
    return tokens, types


def _add_hyperparameters(writer: gguf.GGUFWriter, model: Qwen3, name: str, dtype: str) -> None:
    c = model.config
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    if c.num_experts:
        writer.add_expert_count(c.num_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    # Plain RoPE only (Qwen3Config refuses scaled variants), so no rope-scaling keys.
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_file_type(DTYPES[dtype][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(
    writer: gguf.GGUFWriter, ckpt: Path, tokenizer: Qwen3Tokenizer, n_vocab: int
) -> None:
    tokens, types = vocab_entries(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre("qwen2")  # export_gguf has checked that the split is Qwen2's
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Merges and eos/pad ids as the converter reads them from the directory's files.
    special = gguf.SpecialVocab(ckpt, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise ValueError(f"{ckpt}/tokenizer.json has no BPE merges; re-save the tokenizer")
    # Qwen3's releases name <|endoftext|> as bos too, never prepended.
    special.special_token_ids.setdefault("bos", tokenizer.eos_id)
    special.special_token_ids.setdefault("eos", tokenizer.eos_id)
    special.special_token_ids.setdefault("pad", tokenizer.eos_id)
    special.add_special_token["bos"] = False
    special.chat_template = tokenizer.chat_template  # the one template, wherever it was saved
    special.add_to_gguf(writer, quiet=True)


def _storage_type(name: str, data: np.ndarray, dtype: str) -> gguf.GGMLQuantizationType:
    # As llama.cpp's converter: vectors and norms stay f32, matrices take the chosen type.
    if data.ndim <= 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    return DTYPES[dtype][1]


def _gguf_tensors(model: Qwen3) -> Iterator[tuple[str, torch.Tensor]]:
    """The state dict under Hugging Face names, each sparse layer's experts as one (E, out, in)
    tensor per projection named ``...mlp.experts.{proj}.weight``, as llama.cpp's converter writes
    them (the fused gate|up parameter split into its gate and up halves), after every other
    tensor, layer by layer."""
    experts: list[tuple[str, torch.Tensor]] = []
    for hf_name, tensor in model.state_dict().items():
        prefix, _, proj = hf_name.rpartition(".")  # model.layers.{i}.mlp.experts.{proj}
        if not prefix.endswith(".mlp.experts"):
            yield hf_name, tensor
        elif proj == "gate_up_proj":
            gate, up = (half.contiguous() for half in tensor.chunk(2, dim=1))
            experts += [(f"{prefix}.gate_proj.weight", gate), (f"{prefix}.up_proj.weight", up)]
        else:
            experts.append((f"{prefix}.{proj}.weight", tensor))
    yield from experts


def _add_tensors(writer: gguf.GGUFWriter, model: Qwen3, dtype: str) -> None:
    names = gguf.get_tensor_name_map(_arch(model), model.config.num_hidden_layers)
    for hf_name, tensor in _gguf_tensors(model):
        if model.config.tie_word_embeddings and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise KeyError(f"no GGUF name for tensor {hf_name}")
        data = tensor.detach().to("cpu", torch.float32).numpy()
        qtype = _storage_type(name, data, dtype)
        try:
            stored = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # q8_0 needs rows in blocks of 32; the converter falls back too
            qtype = gguf.GGMLQuantizationType.F16
            stored = gguf.quants.quantize(data, qtype)
        writer.add_tensor(name, stored, raw_dtype=qtype)


def export_gguf(
    ckpt: str | os.PathLike[str], out: str | os.PathLike[str], dtype: str = "f32"
) -> Path:
    """Write the checkpoint directory `ckpt` (config.json, safetensors, tokenizer files) as a
    GGUF file at `out`; the file appears only once complete."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}; pick one of them")
    ckpt, out = Path(ckpt), Path(out)
    tokenizer = Qwen3Tokenizer.from_dir(ckpt)
    check_qwen2_split(tokenizer)  # before reading any weights
    model = load_pretrained(ckpt)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[_arch(model)])
    try:
        _add_hyperparameters(writer, model, ckpt.resolve().name, dtype)
        _add_tokenizer(writer, ckpt, tokenizer, model.config.vocab_size)
        _add_tensors(writer, model, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m qwen3.gguf",
        description="Write a checkpoint as a GGUF file for llama.cpp, ollama or LM Studio.",
    )
    parser.add_argument("ckpt", type=Path, help="checkpoint directory (e.g. checkpoints/RUN/best)")
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    parser.add_argument("--dtype", choices=list(DTYPES), default="f32", help="matrix storage")
    args = parser.parse_args(argv)
    if not args.out.parent.is_dir():
        parser.error(f"{args.out.parent} is not a directory; create it or choose another OUT")
    try:
        path = export_gguf(args.ckpt, args.out, args.dtype)
    except (FileNotFoundError, ValueError) as err:  # a wrong directory or tokenizer: one line
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.dtype})", file=sys.stderr)


if __name__ == "__main__":
    main()
