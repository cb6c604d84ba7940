"""Qwen3 tokenizer wrapper: byte-level BPE via `tokenizers`, special tokens, Qwen chat format.

A directory saved here holds tokenizer.json + tokenizer_config.json + special_tokens_map.json,
laid out like the released Qwen3 tokenizers, so `transformers.AutoTokenizer` loads it and a
downloaded Qwen3 tokenizer directory loads here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.decoders import DecodeStream
from tokenizers.models import BPE

from qwen3.chat_template import (
    CHAT_TEMPLATE,
    TEMPLATE_INPUTS,
    compile_chat_template,
    read_chat_template,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3 marks the think tags as added but not special: decode(skip_special_tokens=True) keeps them.
CONTROL_TOKENS = SPECIAL_TOKENS[:3]
THINK_TOKENS = SPECIAL_TOKENS[3:]

# The Qwen2/Qwen3 pre-tokenizer split (same string transformers' Qwen2Tokenizer uses).
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_ROLES = ("system", "user", "assistant")


def build_bpe_pipeline() -> Tokenizer:
    """An empty Qwen-style byte-level BPE tokenizer (NFC, Qwen split, byte-level), ready to train."""
    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix=""))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


class StreamDecoder:
    """Text of generated token ids, fed one at a time, in time linear in their number.

    `tokenizers.decoders.DecodeStream` decodes only the ids since its last piece at each step.
    `step` returns the text an id completes: "" while the text ends inside a multi-byte character
    (byte-level BPE splits them across tokens) or the id is a skipped special token. `flush`
    returns what is still held when generation ends, an incomplete character as U+FFFD. The
    pieces add up to `decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._held: list[int] = []  # ids since the last text returned

    def step(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly "")."""
        token_id = int(token_id)
        self._held.append(token_id)
        text = self._stream.step(self._tokenizer, token_id)
        if text is None:
            return ""
        self._held.clear()
        return text

    def flush(self) -> str:
        """The text of the ids still held back; the decoder starts afresh after it."""
        text = self._tokenizer.decode(self._held, skip_special_tokens=self._skip)
        self._held.clear()
        self._stream = DecodeStream(skip_special_tokens=self._skip)
        return text


class Qwen3Tokenizer:
    """Qwen3 tokenizer over a `tokenizers.Tokenizer`: encode/decode, special ids, chat format."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str = CHAT_TEMPLATE) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template  # Jinja, saved with the tokenizer
        ids = [tokenizer.token_to_id(t) for t in CONTROL_TOKENS]
        missing = [t for t, i in zip(CONTROL_TOKENS, ids, strict=True) if i is None]
        if missing:
            raise ValueError(
                f"tokenizer lacks the special tokens {missing}; a Qwen3 tokenizer needs "
                f"{CONTROL_TOKENS} (train one with data.prepare_data or use a Qwen3 tokenizer dir)"
            )
        self.eos_id, self.im_start_id, self.im_end_id = (int(i or 0) for i in ids)

    # ---- loading and saving -------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Qwen3Tokenizer:
        """Load `tokenizer.json` and the chat template from a directory (ours or a downloaded
        Qwen3 one); a directory without a template gets the Qwen3 one."""
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {path}: point at a directory written by "
                f"Qwen3Tokenizer.save() or a Hugging Face Qwen3 tokenizer directory"
            )
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as err:  # the Rust loader raises plain Exception subclasses
            raise ValueError(f"{file} is not a valid tokenizer.json ({err}); re-create it") from err
        return cls(tok, read_chat_template(Path(path)) or CHAT_TEMPLATE)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `path`."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(out / "tokenizer.json"))
        added = self.tokenizer.get_added_tokens_decoder()
        decoder = {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(added.items())
        }
        special_map = self.special_tokens_map()
        config = {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": decoder,
            "bos_token": None,
            "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": False,
            "errors": "replace",
            "model_max_length": 131072,
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
            **special_map,
        }
        for name, obj in (
            ("tokenizer_config.json", dict(sorted(config.items()))),
            ("special_tokens_map.json", special_map),
        ):
            (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    def special_tokens_map(self) -> dict[str, Any]:
        """Named special tokens, as in special_tokens_map.json (chat templates also see them)."""
        return {
            "additional_special_tokens": list(CONTROL_TOKENS[1:]),
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
        }

    # ---- encoding -----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads); no special tokens are added."""
        encodings = self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]  # accepts numpy / torch integers too
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_byte_lengths(self) -> list[int]:
        """Each id's UTF-8 byte length in the text it decodes from (index = id): what exact bits
        per byte divides by. Special (control) tokens count 0, as they stand for no text;
        the think tags, matched literally in text, count their own bytes.

        Decoding one id at a time would turn a token holding part of a multi-byte character into
        U+FFFD, so the length is read from the byte-level string instead: one char per byte.
        """
        lengths = [0] * self.vocab_size
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        added = self.tokenizer.get_added_tokens_decoder()
        for token, i in self.tokenizer.get_vocab(with_added_tokens=False).items():
            if i in added:
                continue
            if not alphabet.issuperset(token):
                raise ValueError(
                    f"token {i} ({token!r}) is not byte-level BPE; "
                    "use a byte-level tokenizer (train one with data.prepare_data)"
                )
            lengths[i] = len(token)
        for i, t in added.items():
            lengths[i] = 0 if t.special else len(t.content.encode("utf-8"))
        return lengths

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """An incremental decoder for ids arriving one at a time (see `StreamDecoder`)."""
        return StreamDecoder(self.tokenizer, skip_special_tokens)

    # ---- chat ---------------------------------------------------------------------------
    @property
    def chat_template_options(self) -> frozenset[str]:
        """Variables of the chat template a caller may set, e.g. Qwen3's `enable_thinking`."""
        _, names = compile_chat_template(self.chat_template)
        return names - TEMPLATE_INPUTS - set(self.special_tokens_map())

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **options: Any,
    ) -> str:
        """Render messages with the chat template saved with this tokenizer, as transformers does.

        `options` are variables of the template. Qwen3's `enable_thinking`: left unset, the model
        may think first; False pre-fills an empty `<think>` block so it answers directly. An option
        the template never reads is refused rather than ignored.
        """
        if not messages:
            raise ValueError("apply_chat_template needs at least one message")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
                raise ValueError(f"message {i} must be a dict with role in {CHAT_ROLES}, got {m!r}")
        unknown = sorted(set(options) - self.chat_template_options)
        if unknown:
            known = ", ".join(sorted(self.chat_template_options)) or "none"
            raise ValueError(
                f"the chat template has no option '{unknown[0]}' (its options: {known})"
            )
        template, _ = compile_chat_template(self.chat_template)
        # As transformers: a field set to None counts as absent (OpenAI clients send content=None).
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return template.render(
                messages=chat,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens_map(),
                **options,
            )
        except jinja2.TemplateError as err:  # raise_exception() in the template: bad messages
            raise ValueError(f"the chat template rejects these messages: {err}") from err


def make_added_tokens() -> tuple[list[AddedToken], list[AddedToken]]:
    """(special, non-special) added tokens as Qwen3 declares them."""
    special = [AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS]
    think = [AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS]
    return special, think
