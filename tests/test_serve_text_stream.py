"""TextStream: token ids to text deltas with a real byte-level BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_serve_support import build_tiny_checkpoint

from qwen3.tokenizer import Qwen3Tokenizer
from serving.text_stream import TextStream


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Qwen3Tokenizer:
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("ts") / "tiny")
    return Qwen3Tokenizer.from_dir(Path(path))


def run(tokenizer: Qwen3Tokenizer, text: str, stops: list[str]) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stops)
    deltas = [stream.push(t) for t in tokenizer.encode(text)]
    deltas.append(stream.flush())
    return [d for d in deltas if d], stream


def test_multibyte_characters_are_never_split(tokenizer: Qwen3Tokenizer) -> None:
    text = "Tom the cat said 猫 and café, ok 🐈!"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # the unseen characters are several byte tokens each
    deltas, stream = run(tokenizer, text, [])
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert not stream.stopped


def test_stop_sequence_across_tokens_is_cut_and_not_sent(tokenizer: Qwen3Tokenizer) -> None:
    deltas, stream = run(tokenizer, "The cat sat on the mat. Then it slept.", ["on the m", "xyz"])
    assert "".join(deltas) == "The cat sat "
    assert stream.stopped
    assert stream.push(tokenizer.encode(" more")[0]) == ""


def test_a_partial_stop_is_held_back_then_released(tokenizer: Qwen3Tokenizer) -> None:
    stream = TextStream(tokenizer, ["cat!"])
    sent = "".join(stream.push(t) for t in tokenizer.encode("The cat"))
    assert sent == "The "  # "cat" could still become "cat!"
    rest = "".join(stream.push(t) for t in tokenizer.encode(" ran"))
    assert sent + rest == "The cat ran"
    assert stream.flush() == "" and not stream.stopped


def test_flush_sends_a_held_back_tail(tokenizer: Qwen3Tokenizer) -> None:
    stream = TextStream(tokenizer, ["Tom!"])
    sent = "".join(stream.push(t) for t in tokenizer.encode("Hi Tom"))
    assert sent + stream.flush() == "Hi Tom"


@pytest.mark.parametrize("stop", ["猫", "🐈", "d 猫", "é,"])
def test_a_multibyte_stop_split_across_tokens(tokenizer: Qwen3Tokenizer, stop: str) -> None:
    text = "Tom the cat said 猫 and café, ok 🐈!"
    deltas, stream = run(tokenizer, text, [stop])
    assert "".join(deltas) == text[: text.find(stop)]
    assert stream.stopped and not any("\ufffd" in d for d in deltas)


def test_a_choice_cut_inside_a_character_keeps_its_bytes(tokenizer: Qwen3Tokenizer) -> None:
    ids = tokenizer.encode("ok 🐈")
    stream = TextStream(tokenizer, ["zz"])
    sent = "".join(stream.push(t) for t in ids[:-1])  # max_tokens ends the choice mid-emoji
    assert sent == "ok "
    assert sent + stream.flush() == tokenizer.decode(ids[:-1]) and stream.tokens == len(ids) - 1
