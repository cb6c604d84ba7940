"""GGUF export read back with gguf's own GGUFReader: keys, tensor names and shapes, tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import pre_tokenizers

from data.tokenizer_training import train_tokenizer
from qwen3 import Qwen3, Qwen3Config, Qwen3Tokenizer
from qwen3.gguf import export_gguf, main
from qwen3.hf import save_pretrained

CORPUS = [
    "The little fox ran over the hill, and the children laughed. 小狐狸跑过了山。",
    "Once upon a time there was a king who loved numbers like 1234 and 56.",
    "She said: 'we'll go tomorrow!' He didn't know what to say.\n\nThe end.",
] * 40


@pytest.fixture(scope="module")
def tokenizer() -> Qwen3Tokenizer:
    return train_tokenizer(CORPUS, 420)


def _checkpoint(path: Path, tokenizer: Qwen3Tokenizer, **overrides: object) -> Qwen3:
    torch.manual_seed(0)
    shape: dict[str, object] = dict(
        vocab_size=448,  # more rows than tokens: the rest are written as unused tokens
        hidden_size=64,
        intermediate_size=96,  # down_proj rows of 96: q8_0's blocks of 32 fit
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
    )
    model = Qwen3(Qwen3Config(**{**shape, **overrides}))  # type: ignore[arg-type]
    save_pretrained(model, path)
    tokenizer.save(path)
    return model


def _field(reader: gguf.GGUFReader, key: str) -> object:
    return reader.fields[key].contents()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_f32_file_holds_qwen3_weights_and_hyperparameters(tokenizer, tmp_path, tied) -> None:
    model = _checkpoint(tmp_path / "ckpt", tokenizer, tie_word_embeddings=tied)
    reader = gguf.GGUFReader(export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf"))

    expected = {
        "general.architecture": "qwen3",
        "general.file_type": gguf.LlamaFileType.ALL_F32,
        "qwen3.block_count": 2,
        "qwen3.context_length": 256,
        "qwen3.embedding_length": 64,
        "qwen3.feed_forward_length": 96,
        "qwen3.attention.head_count": 4,
        "qwen3.attention.head_count_kv": 2,
        "qwen3.attention.key_length": 16,
        "qwen3.attention.value_length": 16,
        "qwen3.rope.freq_base": 1e6,
    }
    assert {k: _field(reader, k) for k in expected} == expected
    assert _field(reader, "qwen3.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert not any("rope.scaling" in k for k in reader.fields)

    # Every tensor under its llama.cpp name, numpy-ordered shape as ours, the same numbers.
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, 2)
    ours = {
        names.get_name(k, try_suffixes=(".weight",)): v
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }
    written = {t.name: t for t in reader.tensors}
    assert set(written) == set(ours)
    assert ("output.weight" in written) is not tied  # tied: llama.cpp reuses token_embd
    assert {"blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= set(written)
    for name, tensor in written.items():
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, name
        assert list(reversed(tensor.shape.tolist())) == list(ours[name].shape), name
        np.testing.assert_array_equal(tensor.data, ours[name].numpy(), err_msg=name)


def test_tokenizer_fields(tokenizer, tmp_path) -> None:
    _checkpoint(tmp_path / "ckpt", tokenizer)
    reader = gguf.GGUFReader(export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf"))

    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "qwen2"
    tokens, types = (
        _field(reader, "tokenizer.ggml.tokens"),
        _field(reader, "tokenizer.ggml.token_type"),
    )
    assert isinstance(tokens, list) and isinstance(types, list)
    assert len(tokens) == len(types) == 448
    vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    assert all(tokens[i] == t for t, i in vocab.items())
    assert tokens[447] == "[PAD447]" and types[447] == gguf.TokenType.UNUSED
    eos, im_start, im_end = (vocab[t] for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    assert {types[i] for i in (eos, im_start, im_end)} == {gguf.TokenType.CONTROL}
    assert types[vocab["<think>"]] == types[vocab["</think>"]] == gguf.TokenType.USER_DEFINED
    assert types[vocab["Ġthe"]] == gguf.TokenType.NORMAL
    merges = json.loads(tokenizer.tokenizer.to_str())["model"]["merges"]
    assert _field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in merges]
    assert _field(reader, "tokenizer.ggml.eos_token_id") == eos
    assert _field(reader, "tokenizer.ggml.bos_token_id") == eos  # as Qwen3's releases
    assert _field(reader, "tokenizer.ggml.padding_token_id") == eos
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    assert _field(reader, "tokenizer.chat_template") == tokenizer.chat_template


@pytest.mark.parametrize(
    ("dtype", "matrix_type", "tol"),
    [
        ("f16", gguf.GGMLQuantizationType.F16, 1e-3),
        ("bf16", gguf.GGMLQuantizationType.BF16, 1e-2),
        ("q8_0", gguf.GGMLQuantizationType.Q8_0, 1e-2),
    ],
)
def test_smaller_dtypes_keep_norms_f32(tokenizer, tmp_path, dtype, matrix_type, tol) -> None:
    # intermediate_size 80: down_proj's rows of 80 are no whole number of q8_0 blocks (32).
    model = _checkpoint(tmp_path / "ckpt", tokenizer, intermediate_size=80)
    reader = gguf.GGUFReader(export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", dtype))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, 2)
    ours = {names.get_name(k, try_suffixes=(".weight",)): v for k, v in model.state_dict().items()}
    for t in reader.tensors:
        if t.name.endswith("norm.weight"):
            want = gguf.GGMLQuantizationType.F32
        elif dtype == "q8_0" and t.name.endswith("ffn_down.weight"):
            want = gguf.GGMLQuantizationType.F16  # the converter's fallback
        else:
            want = matrix_type
        assert t.tensor_type == want, t.name
        back = gguf.quants.dequantize(t.data, t.tensor_type)
        np.testing.assert_allclose(back, ours[t.name].numpy(), atol=tol, err_msg=t.name)


def test_other_pre_tokenizer_is_refused_in_one_line(tokenizer, tmp_path, capsys) -> None:
    _checkpoint(tmp_path / "ckpt", tokenizer)
    # GPT-2's split (ByteLevel with its own regex) is not Qwen2's: llama.cpp would tokenize
    # differently under 'qwen2'.
    gpt2 = Qwen3Tokenizer.from_dir(tmp_path / "ckpt")
    gpt2.tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    gpt2.save(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="not Split then ByteLevel"):
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "ckpt"), str(tmp_path / "m.gguf")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not Qwen2's byte-level BPE" in err and "export a" in err
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written


def test_other_split_regex_is_refused(tokenizer, tmp_path) -> None:
    _checkpoint(tmp_path / "ckpt", tokenizer)
    spec = json.loads((tmp_path / "ckpt" / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}+|\s+|."
    (tmp_path / "ckpt" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="its Split regex is not Qwen2's"):
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")


def test_tokenizer_larger_than_the_model_is_refused(tokenizer, tmp_path) -> None:
    _checkpoint(tmp_path / "ckpt", tokenizer, vocab_size=300)
    with pytest.raises(ValueError, match="the model's vocab_size is 300"):
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")


def test_command_line_writes_the_file(tokenizer, tmp_path, capsys) -> None:
    _checkpoint(tmp_path / "ckpt", tokenizer)
    out = tmp_path / "m.gguf"
    main([str(tmp_path / "ckpt"), str(out), "--dtype", "q8_0"])
    assert "wrote" in capsys.readouterr().err
    assert _field(gguf.GGUFReader(out), "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "ckpt"), str(tmp_path / "no-such-dir" / "m.gguf")])
    assert exit_info.value.code == 2
    assert "no-such-dir is not a directory" in capsys.readouterr().err
