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

    Prompts of different lengths are left-padded and masked. A row stops at one of ``eos_ids``
    (not yielded) or at the limit.

    A ``cache`` given by the caller holds the conversation so far, and every call extends it:

    - The prompts are appended after everything already in it. A row whose prompt is empty
      continues from its last logits, so empty prompts go on exactly where one longer call would
      have gone.
    - At every yield the cache holds the prompts and every token yielded so far, so the caller
      may also stop iterating early.
    - A row that stopped at a stop id holds that id as well (a chat turn ends with its
      ``<|im_end|>``), and nothing after it: the tokens it keeps decoding while other rows of the
      batch go on are taken out of its sequence once the generator finishes or is closed, and its
      last logits are those after the stop id. A turn appended to it thus continues exactly the
      text prompt + returned tokens + stop id + turn.
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
    empty = [i for i, p in enumerate(prompts) if not p]
    keep = cache is not None  # the caller's cache: it must end up holding every token returned
    if cache is None:
        if empty:
            raise ValueError(
                f"prompt {empty[0]} is empty: without a cache every prompt needs at least one token."
            )
        cache = KVCache(model.config, b, longest + max_new_tokens, device=device, dtype=model.dtype)
    elif cache.length + longest + max_new_tokens > cache.max_len:
        raise ValueError(
            f"KVCache too small: {cache.length} cached + {longest} new + {max_new_tokens} to generate "
            f"> max_len={cache.max_len}."
        )
    previous = cache.last_logits
    if empty and previous is None:
        raise ValueError(
            f"prompt {empty[0]} is empty and the cache holds nothing to continue from: "
            "give at least one token."
        )
    if longest > 0:
        ids, mask = _left_pad(prompts, 0, device)
        model(ids, cache=cache, attention_mask=mask, logits_to_keep=1)
        if empty:
            assert previous is not None and cache.last_logits is not None
            # A row given nothing new continues from its own last logits, not from its padding.
            nothing_new = torch.tensor([not p for p in prompts], device=device)
            cache.last_logits = torch.where(nothing_new[:, None], previous, cache.last_logits)
    assert cache.last_logits is not None
    logits = cache.last_logits
    # Stop bookkeeping in Python: one read-back per step (the tokens), no small device ops.
    done = [False] * b
    stopped: dict[int, tuple[int, torch.Tensor]] = {}  # row -> (slot of its stop id, logits after)
    try:
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            tokens: list[int] = nxt.tolist()
            newly = [i for i, t in enumerate(tokens) if t in eos and not done[i]]
            done = [d or t in eos for t, d in zip(tokens, done, strict=True)]
            last = all(done) or step == max_new_tokens - 1
            if keep:
                # Fed before they are handed out, so the caller's cache holds whatever it was given.
                logits = model(nxt[:, None], cache=cache)[:, -1]
                for i in newly:
                    stopped[i] = (cache.length - 1, logits[i])
            yield [None if d else t for t, d in zip(tokens, done, strict=True)]
            if last:
                break
            if not keep:
                logits = model(nxt[:, None], cache=cache)[:, -1]
    finally:
        if keep:
            _forget_after_stops(cache, stopped)


def _forget_after_stops(cache: KVCache, stopped: dict[int, tuple[int, torch.Tensor]]) -> None:
    """Take what stopped rows decoded after their stop id out of the cache.

    Finished rows keep decoding along with the others until the call ends, because masking them
    at once would force the slower explicit-mask attention path on every remaining step.
    """
    late = {row: v for row, v in stopped.items() if v[0] + 1 < cache.length}
    if not late:
        return
    for row, (slot, _) in late.items():
        cache.discard(row, slot + 1)
    assert cache.last_logits is not None
    last_logits = cache.last_logits.clone()
    last_logits[list(late)] = torch.stack([after for _, after in late.values()])
    cache.last_logits = last_logits


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
    """New tokens for each prompt (stop token excluded). ``temperature=0`` is greedy.

    With ``cache``, the prompts continue the conversation it holds, which afterwards also holds
    the tokens returned (see :func:`generate_steps`).
    """
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
    """Yield the new tokens of one prompt as they are generated (``cache``: as in generate_steps)."""
    for step in generate_steps(
        model, [prompt], max_new_tokens, temperature, top_k, top_p, eos_ids, seed, cache
    ):
        # A stop yields None as the last step: run the steps out, so the cache is settled.
        if step[0] is not None:
            yield step[0]
