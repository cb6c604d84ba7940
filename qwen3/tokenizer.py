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

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3 marks the think tags as added but not special: decode(skip_special_tokens=True) keeps them.
CONTROL_TOKENS = SPECIAL_TOKENS[:3]
THINK_TOKENS = SPECIAL_TOKENS[3:]

# The Qwen2/Qwen3 pre-tokenizer split (same string transformers' Qwen2Tokenizer uses).
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Jinja twin of Qwen3Tokenizer.apply_chat_template (the Qwen3 template without tool calls);
# tests check that transformers' apply_chat_template renders the identical string.
CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(found=false, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}"
    "{%- if message.role == 'user' and not ns.found %}"
    "{%- set ns.found = true %}"
    "{%- set ns.last_query_index = (messages|length - 1) - loop.index0 %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- set content = message.content if message.content is string else '' %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning = '' %}"
    "{%- if message.reasoning_content is string %}"
    "{%- set reasoning = message.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}"
    "{{- '<|im_start|>assistant\\n' + content }}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
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


def _split_thinking(message: dict[str, Any]) -> tuple[str, str]:
    """(reasoning, content) of an assistant message, as the Qwen3 template reads them."""
    content = message.get("content")
    content = content if isinstance(content, str) else ""
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str):
        return reasoning, content
    if "</think>" in content:
        head, _, _ = content.partition("</think>")
        reasoning = head.rstrip("\n").split("<think>")[-1].lstrip("\n")
        return reasoning, content.split("</think>")[-1].lstrip("\n")
    return "", content


class Qwen3Tokenizer:
    """Qwen3 tokenizer over a `tokenizers.Tokenizer`: encode/decode, special ids, chat format."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
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
        """Load `tokenizer.json` from a directory (ours or a downloaded Qwen3 one)."""
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
        return cls(tok)

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
        extra = [t for t in CONTROL_TOKENS[1:] if self.token_to_id(t) is not None]
        config = {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": decoder,
            "additional_special_tokens": extra,
            "bos_token": None,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|endoftext|>",
            "errors": "replace",
            "model_max_length": 131072,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        }
        special_map = {
            "additional_special_tokens": extra,
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
        }
        for name, obj in (
            ("tokenizer_config.json", config),
            ("special_tokens_map.json", special_map),
        ):
            (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

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

    # ---- chat ---------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
    ) -> str:
        """Render messages in the Qwen3 chat format, as the saved Jinja template does.

        Turns are `<|im_start|>{role}\\n{content}<|im_end|>\\n`. Assistant turns after the last
        user message keep their reasoning in a `<think>` block (from `reasoning_content` or a
        `<think>...</think>` prefix); earlier ones drop it. With `add_generation_prompt` the
        assistant turn is opened, and with `enable_thinking=False` an empty think block is
        pre-filled so the model answers directly.
        """
        if not messages:
            raise ValueError("apply_chat_template needs at least one message")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
                raise ValueError(f"message {i} must be a dict with role in {CHAT_ROLES}, got {m!r}")
        last_query = len(messages) - 1
        for i in range(len(messages) - 1, -1, -1):
            if messages[i]["role"] == "user":
                last_query = i
                break
        parts = []
        for i, m in enumerate(messages):
            role = m["role"]
            content = m.get("content") if isinstance(m.get("content"), str) else ""
            if role == "user" or role == "system":
                parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
                continue
            reasoning, content = _split_thinking(m)
            if i > last_query and (i == len(messages) - 1 or reasoning):
                think = reasoning.strip("\n")
                content = content.lstrip("\n")
                parts.append(f"<|im_start|>assistant\n<think>\n{think}\n</think>\n\n{content}")
            else:
                parts.append(f"<|im_start|>assistant\n{content}")
            parts.append("<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
            if not enable_thinking:
                parts.append("<think>\n\n</think>\n\n")
        return "".join(parts)


def make_added_tokens() -> tuple[list[AddedToken], list[AddedToken]]:
    """(special, non-special) added tokens as Qwen3 declares them."""
    special = [AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS]
    think = [AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS]
    return special, think
