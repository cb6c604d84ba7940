"""Exact bits per byte: each id's byte length from the tokenizer, and val_bpb summed from the
evaluated targets' own bytes rather than the split's average bytes per token."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_trainer_support import make_trainer, small_run_overrides
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from data import val_batches
from data.tokenizer_training import train_tokenizer
from qwen3 import Qwen3, Qwen3Config
from qwen3.tokenizer import CONTROL_TOKENS, THINK_TOKENS, Qwen3Tokenizer
from trainer.build import resolve_precision
from trainer.evaluation import evaluate

_LATIN = ["the", "night", "sword", "café", "naïve", "über", "rose", "love"]
_CJK = ["日本語", "東京", "漢字", "中文", "한국어", "ありがとう"]
_EMOJI = ["😀", "🚀", "👍🏽", "🇫🇷", "❤️"]


def _docs(n: int, seed: int, words: list[str]) -> list[str]:
    rng = random.Random(seed)
    return [
        "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(3))
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def tok() -> Qwen3Tokenizer:
    # Mixed scripts, so merges join multi-byte characters and some tokens hold a partial one.
    return train_tokenizer(_docs(300, 0, _LATIN + _CJK + _EMOJI), 600)


def test_token_byte_lengths_sum_to_the_utf8_bytes_of_decoded_text(tok: Qwen3Tokenizer) -> None:
    lengths = tok.token_byte_lengths()
    assert len(lengths) == tok.vocab_size
    for t in CONTROL_TOKENS:
        assert lengths[tok.token_to_id(t)] == 0
    for t in THINK_TOKENS:  # not special: matched literally in text, so they count their bytes
        assert lengths[tok.token_to_id(t)] == len(t)
    texts = [
        "Hello 日本語 and 東京!\n\n  indented\ttab\r\nemoji 😀🚀 👍🏽 flag 🇫🇷 ❤️ café naïve",
        "<|im_start|>user\n漢字 ありがとう<|im_end|>\n<think>\nhmm 😀\n</think>\n\nok<|endoftext|>",
        "한국어\n\n\n中文😀😀 über",
    ]
    for text in texts:
        ids = tok.encode(text)
        visible = tok.decode(ids, skip_special_tokens=True)  # control tokens dropped
        assert sum(lengths[i] for i in ids) == len(visible.encode("utf-8"))
        without_controls = text
        for t in CONTROL_TOKENS:
            without_controls = without_controls.replace(t, "")
        assert visible == without_controls
    # Some token holds part of a multi-byte character: decoding it alone would give U+FFFD
    # (3 bytes), which is why lengths come from the byte-level strings.
    partial = [
        i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i]) and lengths[i] not in (0, 3)
    ]
    assert partial


def _tiny_model(vocab_size: int) -> Qwen3:
    torch.manual_seed(0)
    return Qwen3(
        Qwen3Config(
            vocab_size=vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
        )
    )


def test_evaluate_bpb_is_total_nats_over_ln2_over_target_bytes(tok: Qwen3Tokenizer) -> None:
    docs = _docs(40, 1, _LATIN + _CJK + _EMOJI)
    tokens = np.array(
        [i for d in docs for i in [*tok.encode(d), tok.eos_id]], dtype=np.int32
    )  # a val split as the token cache lays it out: documents, each followed by EOS
    model = _tiny_model(tok.vocab_size)
    lengths = tok.token_byte_lengths()
    device = torch.device("cpu")
    precision = resolve_precision("fp32", device)
    table = torch.tensor(lengths, dtype=torch.int64)
    metrics = evaluate(model, tokens, 2, 24, 3, precision, device, table)

    nats, nbytes, count = 0.0, 0, 0
    with torch.no_grad():
        for x, y in val_batches(tokens, 2, 24, 3):
            logits = model(x)  # (B, T, V)
            for b in range(y.shape[0]):
                for t in range(y.shape[1]):
                    target = int(y[b, t])
                    nats += -F.log_softmax(logits[b, t].double(), -1)[target].item()
                    nbytes += lengths[target]
                    count += 1
    assert count == 3 * 2 * 24 and nbytes > count  # multi-byte tokens: more bytes than targets
    assert metrics["val_loss"] == pytest.approx(nats / count, rel=1e-5)
    assert metrics["val_bpb"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)
    # Without a byte table there is no bpb (the other metrics stay).
    assert "val_bpb" not in evaluate(model, tokens, 2, 24, 3, precision, device, None)


def test_exact_bpb_differs_from_the_split_average_form(tmp_path) -> None:
    """Through the trainer as train.py builds it: on a split of ASCII documents, then CJK and
    emoji ones, the one window evaluated (at the start: ASCII) has not the split's bytes per
    token, so the old figure (mean loss / the split's bytes per token) misstates bpb."""
    ascii_docs = _docs(60, 2, ["the", "night", "sword", "rose", "love"])
    wide_docs = _docs(60, 3, _CJK + _EMOJI)
    corpus = tmp_path / "mixed.txt"
    # data.val_docs holds out the first documents: the val split is 6 ASCII, then 6 wide ones.
    corpus.write_text("\n\n".join(ascii_docs[:6] + wide_docs[:6] + ascii_docs + wide_docs) + "\n")
    t = make_trainer(
        [
            *small_run_overrides(tmp_path, corpus),
            "data.val_docs=12",
            "trainer.eval_batches=1",
            "trainer.batch_size=1",
            "trainer.seq_len=16",
        ],
        tmp_path / "run",
    )
    data = t.parts.data
    assert t.parts.token_bytes.device == t.parts.device
    metrics = t.evaluate()
    lengths = data.tokenizer.token_byte_lengths()
    _, y = next(val_batches(data.val, 1, 16, 1))
    window_bytes = sum(lengths[int(i)] for i in y.flatten())
    exact = metrics["val_loss"] * y.numel() / math.log(2) / window_bytes
    assert metrics["val_bpb"] == pytest.approx(exact, rel=1e-6)
    split_average = data.val_bytes / len(data.val)  # what val_bpb divided by before
    assert sum(lengths[int(i)] for i in data.val) == data.val_bytes  # the table agrees with it
    old = metrics["val_loss"] / math.log(2) / split_average
    assert abs(old - metrics["val_bpb"]) / metrics["val_bpb"] > 0.05


def test_a_tokenizer_that_is_not_byte_level_is_refused() -> None:
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "日本": 3}
    tok = Qwen3Tokenizer(Tokenizer(WordLevel(vocab, unk_token="<|endoftext|>")))
    with pytest.raises(ValueError, match="token 3 .* is not byte-level BPE"):
        tok.token_byte_lengths()
