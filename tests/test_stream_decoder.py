"""Incremental decoding (qwen3.tokenizer.StreamDecoder) and the CLI's streamed text that uses it."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from test_serve_support import TEXT

from data.tokenizer_training import train_tokenizer
from qwen3 import Qwen3, Qwen3Config
from qwen3.tokenizer import Qwen3Tokenizer
from trainer.config import SampleConfig
from trainer.generation import complete, stream_text

WIDE = "Tom the cat said 猫 and café, ok 🐈! 日本語 😀"


@pytest.fixture(scope="module")
def tok() -> Qwen3Tokenizer:
    return train_tokenizer(TEXT.splitlines() * 4, vocab_size=320)


def test_pieces_are_whole_characters_and_add_up_to_decode(tok: Qwen3Tokenizer) -> None:
    ids = tok.encode(WIDE)
    decoder = tok.stream_decoder()
    pieces = [decoder.step(i) for i in ids]
    assert "" in pieces  # the unseen characters are several byte tokens each
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == WIDE and decoder.flush() == ""


@pytest.mark.parametrize("skip", [True, False])
def test_any_ids_add_up_to_decode(tok: Qwen3Tokenizer, skip: bool) -> None:
    """Random ids (stray bytes, special tokens) as an untrained model emits them."""
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 30))]
        decoder = tok.stream_decoder(skip_special_tokens=skip)
        text = "".join(decoder.step(i) for i in ids) + decoder.flush()
        assert text == tok.decode(ids, skip_special_tokens=skip)


def test_flush_returns_an_incomplete_character_and_starts_afresh(tok: Qwen3Tokenizer) -> None:
    ids = tok.encode("ok 🐈")
    decoder = tok.stream_decoder()
    assert "".join(decoder.step(i) for i in ids[:-1]) == "ok "
    assert decoder.flush() == tok.decode(ids[:-1])[3:] == "\ufffd"
    assert "".join(decoder.step(i) for i in tok.encode("Tom")) == "Tom"


def scripted_model(chain: list[int], vocab_size: int) -> Qwen3:
    """A real Qwen3 whose greedy continuation of chain[i] is chain[i + 1].

    The blocks' output projections are zero, so the last hidden state is the token's embedding:
    one-hot for each token of the chain, mapped by lm_head onto the next one.
    """
    assert len(set(chain)) == len(chain), "each token of the chain must have one successor"
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = Qwen3(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "embed_tokens.weight")):
                p.zero_()
        model.lm_head.weight.zero_()
        for i, (here, after) in enumerate(itertools.pairwise(chain)):
            model.model.embed_tokens.weight[here, i] = 1.0
            model.lm_head.weight[after, i] = 10.0
    return model


def test_cli_stream_matches_the_whole_text_when_cut_mid_character(tok: Qwen3Tokenizer) -> None:
    answer = tok.encode(" 猫🐈")
    assert len(answer) >= 5  # the characters are split into byte tokens
    model = scripted_model([tok.encode("Tom")[-1], *answer], tok.vocab_size)
    cfg = SampleConfig(prompts=[], max_new_tokens=len(answer) - 2, temperature=0, top_k=None)
    pieces = list(stream_text(model, tok, "Tom", cfg))
    whole = complete(model, tok, ["Tom"], cfg)[0]
    assert whole == tok.decode(answer[:-2]) and whole.endswith("\ufffd")
    assert "".join(pieces) == whole  # the unfinished emoji is shown, not dropped
    assert not any("\ufffd" in p for p in pieces[:-1])
    full = SampleConfig(prompts=[], max_new_tokens=len(answer), temperature=0, top_k=None)
    assert list(stream_text(model, tok, "Tom", full)) == [" ", "猫", "🐈"]
