"""Text completions from a model and tokenizer (used after training and by ``train.py demo``)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from qwen3 import Qwen3, generate, stream_generate
from qwen3.tokenizer import Qwen3Tokenizer
from trainer.config import SampleConfig


def _prompt_ids(tokenizer: Qwen3Tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens; an empty prompt starts from <|endoftext|> (a document boundary)."""
    return tokenizer.encode(prompt) or [tokenizer.eos_id]


def max_new_for(model: Qwen3, prompt_len: int, wanted: int) -> int:
    """``wanted`` capped so prompt + completion fit the model's context."""
    return max(0, min(wanted, model.config.max_position_embeddings - prompt_len))


@torch.no_grad()
def complete(
    model: Qwen3, tokenizer: Qwen3Tokenizer, prompts: list[str], cfg: SampleConfig, seed: int = 0
) -> list[str]:
    """One completion per prompt (batched, KV cache), stopping at <|endoftext|>."""
    ids = [_prompt_ids(tokenizer, p) for p in prompts]
    longest = max(len(i) for i in ids)
    out = generate(
        model,
        ids,
        max_new_tokens=max_new_for(model, longest, cfg.max_new_tokens),
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        eos_ids=(tokenizer.eos_id,),
        seed=seed,
    )
    return [tokenizer.decode(o, skip_special_tokens=True) for o in out]


def stream_text(
    model: Qwen3,
    tokenizer: Qwen3Tokenizer,
    prompt: str,
    cfg: SampleConfig,
    seed: int | None = None,
    stop_at_eos: bool = True,
) -> Iterator[str]:
    """Yield pieces of text as tokens are generated: whole characters, through the tokenizer's
    incremental decoder; a character left unfinished when generation ends shows as U+FFFD."""
    ids = _prompt_ids(tokenizer, prompt)
    decoder = tokenizer.stream_decoder(skip_special_tokens=True)
    for tok in stream_generate(
        model,
        ids,
        max_new_tokens=max_new_for(model, len(ids), cfg.max_new_tokens),
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        eos_ids=(tokenizer.eos_id,) if stop_at_eos else (),
        seed=seed,
    ):
        text = decoder.step(tok)
        if text:
            yield text
    tail = decoder.flush()
    if tail:
        yield tail
