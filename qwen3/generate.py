"""Autoregressive sampling with a KV cache: greedy, temperature, top-k, top-p, stop ids, batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from qwen3.cache import KVCache
from qwen3.model import Qwen3

# The seeds torch.Generator.manual_seed takes (a negative one counts modulo 2**64).
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1


@dataclass(frozen=True)
class Sampling:
    """How to generate: how many new tokens at most, how each is picked, where a row stops, and
    the seed. Frozen and hashable; every value is checked on construction.

    The one sampling-settings type: ``generate`` takes it, the trainer's ``sample`` section and
    the ``demo``/``interactive`` options subclass it (adding their own keys), and each request to
    the server maps onto one (equal settings without a seed may share a batch).
    """

    # How errors name the fields: a config section that subclasses this sets its own ("sample.").
    key_prefix: ClassVar[str] = ""

    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None  # keep only the k likeliest tokens; None: no limit
    top_p: float | None = None  # keep the likeliest tokens holding this much probability; None: all
    stop_ids: tuple[int, ...] = ()  # a row stops at any of these, which is not returned
    seed: int | None = None  # None: torch's global generator

    def __post_init__(self) -> None:
        self._check_whole("max_new_tokens", self.max_new_tokens, 0, "120")
        if not isinstance(self.temperature, int | float) or self.temperature < 0:
            self._fail("temperature", self.temperature, "must be >= 0 (0 = greedy)", "0.8")
        if self.top_k is not None:
            self._check_whole("top_k", self.top_k, 1, "50")
        if self.top_p is not None and not (
            isinstance(self.top_p, int | float) and 0 < self.top_p <= 1
        ):
            self._fail("top_p", self.top_p, "must lie in (0, 1]", "0.9")
        stops = self.stop_ids
        if isinstance(stops, str) or not isinstance(stops, Iterable):
            self._fail("stop_ids", stops, "must be a list of token ids", "[0]")
        object.__setattr__(self, "stop_ids", tuple(stops))  # any iterable given: stored hashable
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.stop_ids):
            self._fail("stop_ids", stops, "must be a list of token ids (whole numbers >= 0)", "[0]")
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not MIN_SEED <= self.seed <= MAX_SEED
        ):
            self._fail("seed", self.seed, "must be a whole number from -2**63 to 2**64-1", "0")

    def _fail(self, name: str, value: Any, problem: str, example: str) -> None:
        key = self.key_prefix + name
        raise ValueError(f"{key}={value!r} {problem}; set e.g. {key}={example}")

    def _check_whole(self, name: str, value: Any, low: int, example: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            self._fail(name, value, f"must be a whole number >= {low}", example)


# Logits divided by a temperature this small can overflow float32 (inf - inf = nan in the softmax);
# sampling that cold is argmax anyway (float32 rounds the likeliest token's probability to 1 once
# the temperature is far below the gap to the next logit).
GREEDY_BELOW = 1e-20


def sample_next(
    logits: torch.Tensor,  # (B, V)
    sampling: Sampling,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row as ``sampling`` says: argmax at temperature 0, else sample the
    softmax filtered by top_k and top_p (its other fields are the caller's: ``generator`` is the
    one seeded with its seed)."""
    temperature, top_k, top_p = sampling.temperature, sampling.top_k, sampling.top_p
    if temperature < GREEDY_BELOW:  # 0, or so cold that the scaled logits could overflow
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
        drop[..., 0] = False  # explicitly: a top_p that rounds to 0 in float32 would drop it too
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
    sampling: Sampling,
    cache: KVCache | None = None,
    on_logits: Callable[[torch.Tensor], None] | None = None,
    vocab_size: int | None = None,
) -> Iterator[list[int | None]]:
    """Yield, step by step, one new token per prompt (None for a row that has already stopped).

    Prompts of different lengths are left-padded and masked. A row stops at one of
    ``sampling.stop_ids`` (not yielded) or after ``sampling.max_new_tokens``.

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

    ``on_logits``, when given, is called at every step with the logits (B, V) the step's tokens
    are drawn from, before temperature, top-k and top-p (the server's log-probabilities).

    ``vocab_size``: the tokenizer's size, when the model has more embedding rows (a padded
    vocabulary): the ids from it on are never sampled, their logits are -inf (also in
    ``on_logits``). None: every row is a token.
    """
    max_new_tokens = sampling.max_new_tokens
    device = model.device
    b = len(prompts)
    if b == 0:
        return
    eos = set(sampling.stop_ids)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
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
    padding = padding_bias(model.config.vocab_size, vocab_size, device)  # (V,) or None
    # Stop bookkeeping in Python: one read-back per step (the tokens), no small device ops.
    done = [False] * b
    stopped: dict[int, tuple[int, torch.Tensor]] = {}  # row -> (slot of its stop id, logits after)
    try:
        for step in range(max_new_tokens):
            if padding is not None:
                logits = logits + padding  # the padding rows' ids: never drawn
            if on_logits is not None:
                on_logits(logits)
            nxt = sample_next(logits, sampling, generator)  # (B,)
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


def padding_bias(rows: int, vocab_size: int | None, device: torch.device) -> torch.Tensor | None:
    """(rows,) zeros with -inf from ``vocab_size`` on: added to logits, it takes the model's
    padding rows out of every softmax. None when there are none."""
    if vocab_size is None or vocab_size >= rows:
        return None
    bias = torch.zeros(rows, device=device)
    bias[vocab_size:] = float("-inf")
    return bias


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
    sampling: Sampling,
    cache: KVCache | None = None,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """New tokens for each prompt, as ``sampling`` says (stop token excluded).

    With ``cache``, the prompts continue the conversation it holds, which afterwards also holds
    the tokens returned; ``vocab_size``: ids from it on are never sampled (see
    :func:`generate_steps`).
    """
    out: list[list[int]] = [[] for _ in prompts]
    for step in generate_steps(model, prompts, sampling, cache, vocab_size=vocab_size):
        for row, tok in zip(out, step, strict=True):
            if tok is not None:
                row.append(tok)
    return out


def stream_generate(
    model: Qwen3,
    prompt: Sequence[int],
    sampling: Sampling,
    cache: KVCache | None = None,
    vocab_size: int | None = None,
) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are generated (``cache``, ``vocab_size``: as
    in generate_steps)."""
    for step in generate_steps(model, [prompt], sampling, cache, vocab_size=vocab_size):
        # A stop yields None as the last step: run the steps out, so the cache is settled.
        if step[0] is not None:
            yield step[0]
