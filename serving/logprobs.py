"""Log-probabilities for the API: scoring a prompt, scoring each generated token, naming tokens.

They are the model's own distribution, log_softmax of the raw logits in float32, before
temperature, top-k and top-p reshape it for sampling (as OpenAI and vLLM report them), so the
same text scores the same whatever the request's sampling settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from qwen3 import Qwen3
from qwen3.generate import padding_bias
from qwen3.tokenizer import Qwen3Tokenizer

# Prompt positions whose logits are formed at once: the (chunk, vocab) float32 block stays small
# (150 MB at Qwen3's 151,936 tokens) however long the prompt.
SCORE_CHUNK = 256

Alternatives = tuple[tuple[int, float], ...]  # the likeliest (token id, logprob), best first


@dataclass(frozen=True)
class TokenLogprob:
    """One token of a choice with its log-probability, its likeliest alternatives, and where its
    text starts in the choice's text (the echoed prompt included)."""

    token: int
    logprob: float | None  # None: a prompt's first token, which nothing before it predicts
    top: Alternatives
    offset: int


def _rows_scores(
    logprobs: torch.Tensor, targets: torch.Tensor, top: int
) -> list[tuple[float, Alternatives]]:
    """(N, V) float32 logprobs and the N chosen ids -> each one's logprob and top alternatives."""
    chosen = logprobs.gather(-1, targets[:, None]).squeeze(-1).tolist()
    if top == 0:
        return [(c, ()) for c in chosen]
    values, ids = logprobs.topk(top, dim=-1)
    pairs = zip(ids.tolist(), values.tolist(), strict=True)
    return [(c, tuple(zip(i, v, strict=True))) for c, (i, v) in zip(chosen, pairs, strict=True)]


@torch.inference_mode()
def score_prompts(
    model: Qwen3, prompts: Sequence[Sequence[int]], top: int, vocab_size: int | None = None
) -> list[list[tuple[float, Alternatives]]]:
    """For each prompt, the logprob of every token after the first given those before it, with
    the `top` likeliest alternatives at each position. ``vocab_size``: the tokenizer's size; the
    model's rows past it (padding) are no tokens and get no probability.

    One forward over the right-padded batch: attention is causal, so padding after a prompt
    changes nothing before it. The LM head runs in chunks of positions (`SCORE_CHUNK`).
    """
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, : len(p)] = torch.tensor(list(p), dtype=torch.long)
    hidden = model.model(ids.to(model.device))  # (B, T, C)
    padding = padding_bias(model.config.vocab_size, vocab_size, model.device)
    out = []
    for row, p in enumerate(prompts):
        targets = ids[row, 1 : len(p)].to(model.device)
        scores: list[tuple[float, Alternatives]] = []
        for start in range(0, len(p) - 1, SCORE_CHUNK):
            end = min(start + SCORE_CHUNK, len(p) - 1)
            logits = model.lm_head(hidden[row, start:end])  # (n, V)
            if padding is not None:
                logits = logits + padding
            scores += _rows_scores(logits.float().log_softmax(-1), targets[start:end], top)
        out.append(scores)
    return out


@torch.inference_mode()
def score_step(
    logits: torch.Tensor,  # (B, V): the step's logits, before any sampling filter
    rows: Sequence[int],
    tokens: Sequence[int],  # the token each of `rows` got
    top: int,
) -> list[tuple[float, Alternatives]]:
    """The logprob of each row's new token and its `top` likeliest alternatives."""
    index = torch.tensor(list(rows), device=logits.device)
    targets = torch.tensor(list(tokens), device=logits.device)
    return _rows_scores(logits[index].float().log_softmax(-1), targets, top)


@lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's char -> byte table (GPT-2's `bytes_to_unicode`, inverted).

    `tokenizers` applies this table but does not expose it, and decoding one token at a time
    turns part of a multi-byte character into U+FFFD, which would lose the token's bytes.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in chars)
    chars.update((b, chr(256 + n)) for n, b in enumerate(extra))
    return {c: b for b, c in chars.items()}


class TokenNames:
    """Each token's text and UTF-8 bytes as the API reports them: a token holding only part of
    a character is shown as `bytes:\\xe4\\xbd`, as OpenAI does, so no two tokens share a name."""

    def __init__(self, tokenizer: Qwen3Tokenizer) -> None:
        self._tokenizer = tokenizer.tokenizer
        self._added = {i: t.content for i, t in self._tokenizer.get_added_tokens_decoder().items()}
        self._known: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        """(text, bytes) of one token id."""
        known = self._known.get(token)
        if known is None:
            if token in self._added:
                raw = self._added[token].encode("utf-8")
            else:
                piece = self._tokenizer.id_to_token(token) or ""
                raw = bytes(_byte_of_char()[c] for c in piece)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            known = self._known[token] = (text, list(raw))
        return known
