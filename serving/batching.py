"""The running batch of continuous batching: rows join when their request arrives and leave
when they finish, and every decode step is one forward over all live rows.

A joining request's prompts are prefilled on their own (one left-padded forward: the running
rows wait for that forward, not for the newcomer's whole generation), then appended to the
running KV cache (`KVCache.add_rows`), and the next step decodes them with the others. A finished
or cancelled row is dropped from the cache (`KVCache.drop_rows`) before the next forward, so the
others go on unchanged and no compute goes to rows nobody reads.

Each step's tokens are drawn per group of rows (`batch_key`): unseeded requests with the same
settings draw together from torch's global generator; a seeded request's rows draw from its own
generator, so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch

from qwen3 import KVCache, Qwen3, sample_next
from qwen3.generate import padding_bias
from serving.requests import Choice, GenerationRequest, batch_key


@dataclass(eq=False)
class Row:
    """One choice being decoded, with the request it belongs to."""

    request: GenerationRequest
    choice: Choice
    group: object = field(init=False)  # rows with equal groups draw their tokens in one call

    def __post_init__(self) -> None:
        self.group = batch_key(self.request.sampling) or self.request


class DecodeBatch:
    """The rows being decoded, in cache order, and their KV cache (None while there are none).

    ``vocab_size``: the tokenizer's size; model rows past it (a padded vocabulary) are never drawn.
    """

    def __init__(self, model: Qwen3, vocab_size: int | None = None) -> None:
        self.model = model
        self.rows: list[Row] = []
        self.cache: KVCache | None = None
        self._padding = padding_bias(model.config.vocab_size, vocab_size, model.device)
        self._generators: dict[GenerationRequest, torch.Generator] = {}

    @torch.inference_mode()
    def join(self, rows: Sequence[Row]) -> None:
        """Prefill the rows' prompts and add the rows; the next `sample` draws their first token."""
        if not rows:
            return
        model, device = self.model, self.model.device
        prompts = [row.choice.prompt_ids for row in rows]
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, p in enumerate(prompts):  # left-padded: every row's next token takes one slot
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = True
        # Room for every token a row may still be fed (its last drawn token never is).
        room = max(row.choice.max_tokens for row in rows)
        cache = KVCache(model.config, len(rows), width + room, device=device, dtype=model.dtype)
        model(ids.to(device), cache=cache, attention_mask=mask.to(device), logits_to_keep=1)
        for row in rows:
            seed = row.request.sampling.seed
            if seed is not None and row.request not in self._generators:
                self._generators[row.request] = torch.Generator(device).manual_seed(seed)
        if self.cache is None:
            self.cache = cache
        else:
            self.cache.add_rows(cache)
        self.rows += rows

    @torch.inference_mode()
    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's next token (B,), and the (B, V) logits it was drawn from, before
        temperature, top-k and top-p (the padded vocabulary's rows at -inf)."""
        assert self.cache is not None and self.cache.last_logits is not None
        logits = self.cache.last_logits
        if self._padding is not None:
            logits = logits + self._padding
        groups: dict[object, list[int]] = {}
        for i, row in enumerate(self.rows):
            groups.setdefault(row.group, []).append(i)
        if len(groups) == 1:
            return self._draw(logits, self.rows[0].request), logits
        tokens = torch.empty(len(self.rows), dtype=torch.long, device=logits.device)
        for members in groups.values():
            index = torch.tensor(members, device=logits.device)
            tokens[index] = self._draw(logits[index], self.rows[members[0]].request)
        return tokens, logits

    def _draw(self, logits: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
        return sample_next(logits, request.sampling, self._generators.get(request))

    @torch.inference_mode()
    def advance(self, tokens: torch.Tensor, leaving: Collection[int]) -> None:
        """Drop the rows at the indices ``leaving``, then feed every other row its token from
        ``tokens`` (B,) in one forward, which gives the logits of the next `sample`."""
        assert self.cache is not None
        if leaving:
            keep = [i for i in range(len(self.rows)) if i not in leaving]
            self.rows = [self.rows[i] for i in keep]
            if not self.rows:
                self.cache = None
                self._generators.clear()
                return
            self.cache.drop_rows(sorted(leaving))
            tokens = tokens[torch.tensor(keep, device=tokens.device)]
            live = {row.request for row in self.rows}
            self._generators = {r: g for r, g in self._generators.items() if r in live}
        self.model(tokens[:, None], cache=self.cache)
