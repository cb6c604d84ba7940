"""Autoregressive sampling with a KV cache: greedy, temperature, top-k, top-p, stop ids, batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from qwen3.cache import KVCache
from qwen3.model import Qwen3


def sample_next(
    logits: torch.Tensor,  # (B, V)
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row: argmax at temperature 0, else sample the filtered softmax."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0 (0 means greedy).")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}: must be in (0, 1].")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k}: must be >= 1 (or None for no limit).")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate_steps(
    model: Qwen3,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_ids: Iterable[int] = (),
    seed: int | None = None,
    cache: KVCache | None = None,
) -> Iterator[list[int | None]]:
    """Yield, step by step, one new token per prompt (None for a row that has already stopped).

    Prompts of different lengths are left-padded and masked. With ``cache`` given, the prompts are
    appended to the sequences already in it (they may be empty: generation then continues from
    the cache's last logits). A row stops at one of ``eos_ids`` (not yielded) or at the limit.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0.")
    device = model.device
    b = len(prompts)
    if b == 0:
        return
    eos = set(eos_ids)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    longest = max(len(p) for p in prompts)
    if cache is None:
        if longest == 0:
            raise ValueError("Every prompt is empty: give at least one token to start from.")
        cache = KVCache(model.config, b, longest + max_new_tokens, device=device, dtype=model.dtype)
    elif cache.length + longest + max_new_tokens > cache.max_len:
        raise ValueError(
            f"KVCache too small: {cache.length} cached + {longest} new + {max_new_tokens} to generate "
            f"> max_len={cache.max_len}."
        )
    if longest > 0:
        ids, mask = _left_pad(prompts, 0, device)
        model(ids, cache=cache, attention_mask=mask, logits_to_keep=1)
    elif cache.last_logits is None:
        raise ValueError("The cache is empty and so are the prompts: nothing to continue from.")
    assert cache.last_logits is not None
    logits = cache.last_logits
    # Stop bookkeeping in Python: one read-back per step (the tokens), no small device ops.
    done = [False] * b
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        tokens: list[int] = nxt.tolist()
        done = [d or t in eos for t, d in zip(tokens, done, strict=True)]
        yield [None if d else t for t, d in zip(tokens, done, strict=True)]
        if all(done) or step == max_new_tokens - 1:
            break
        # Finished rows keep decoding (their tokens are dropped): masking them would force the
        # slower explicit-mask attention path on every remaining step.
        logits = model(nxt[:, None], cache=cache)[:, -1]


def generate(
    model: Qwen3,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_ids: Iterable[int] = (),
    seed: int | None = None,
    cache: KVCache | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (stop token excluded). ``temperature=0`` is greedy."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in generate_steps(
        model, prompts, max_new_tokens, temperature, top_k, top_p, eos_ids, seed, cache
    ):
        for row, tok in zip(out, step, strict=True):
            if tok is not None:
                row.append(tok)
    return out


def stream_generate(
    model: Qwen3,
    prompt: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_ids: Iterable[int] = (),
    seed: int | None = None,
    cache: KVCache | None = None,
) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are generated."""
    for step in generate_steps(
        model, [prompt], max_new_tokens, temperature, top_k, top_p, eos_ids, seed, cache
    ):
        if step[0] is None:
            return
        yield step[0]
