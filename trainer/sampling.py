"""Text completions from a model and tokenizer (used after training and by ``train.py demo``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import torch

from qwen3 import Qwen3, Sampling, generate, stream_generate
from qwen3.tokenizer import Qwen3Tokenizer


def _prompt_ids(tokenizer: Qwen3Tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens; an empty prompt starts from <|endoftext|> (a document boundary)."""
    return tokenizer.encode(prompt) or [tokenizer.eos_id]


def max_new_for(model: Qwen3, prompt_len: int, wanted: int) -> int:
    """``wanted`` capped so prompt + completion fit the model's context."""
    return max(0, min(wanted, model.config.max_position_embeddings - prompt_len))


def _fitted(
    model: Qwen3,
    tokenizer: Qwen3Tokenizer,
    sampling: Sampling,
    prompt_len: int,
    stop_at_eos: bool,
) -> Sampling:
    """``sampling`` with only as many new tokens as fit the context after the prompt, and
    stopping at <|endoftext|> as well unless ``stop_at_eos`` is off."""
    stops = (*sampling.stop_ids, tokenizer.eos_id) if stop_at_eos else sampling.stop_ids
    wanted = max_new_for(model, prompt_len, sampling.max_new_tokens)
    return replace(sampling, max_new_tokens=wanted, stop_ids=stops)


@torch.no_grad()
def complete(
    model: Qwen3, tokenizer: Qwen3Tokenizer, prompts: list[str], sampling: Sampling
) -> list[str]:
    """One completion per prompt (batched, KV cache) as ``sampling`` says, stopping at
    <|endoftext|> too."""
    ids = [_prompt_ids(tokenizer, p) for p in prompts]
    longest = max(len(i) for i in ids)
    out = generate(model, ids, _fitted(model, tokenizer, sampling, longest, True))
    return [tokenizer.decode(o, skip_special_tokens=True) for o in out]


def stream_text(
    model: Qwen3,
    tokenizer: Qwen3Tokenizer,
    prompt: str,
    sampling: Sampling,
    stop_at_eos: bool = True,
) -> Iterator[str]:
    """Yield pieces of text as tokens are generated: whole characters, through the tokenizer's
    incremental decoder; a character left unfinished when generation ends shows as U+FFFD."""
    ids = _prompt_ids(tokenizer, prompt)
    decoder = tokenizer.stream_decoder(skip_special_tokens=True)
    for tok in stream_generate(
        model, ids, _fitted(model, tokenizer, sampling, len(ids), stop_at_eos)
    ):
        text = decoder.step(tok)
        if text:
            yield text
    tail = decoder.flush()
    if tail:
        yield tail
