"""lm-evaluation-harness's model interface over a live Qwen3 model: one wrapper for
``train.py eval`` (a checkpoint loaded here) and the downstream tasks scored inside the training
loop (the training model itself, sharded or replicated, no copy).

lm-eval's ``TemplateLM`` turns each request into context and continuation tokens exactly as its
Hugging Face backend does (the whole text encoded, the context's tokens split off); this class
scores them. Under torchrun every rank holds every request: each scores every world-th batch and
the scores are gathered to every rank, so lm-eval, told it runs as one process, computes the same
metrics everywhere (and ``best`` decides alike on every rank). Every rank runs the same number of
forwards (a rank short of a batch repeats one and discards it): FSDP gathers each block's weights
from all ranks in every forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lm_eval import utils as lm_utils  # type: ignore[import-untyped]  # lm-eval ships no type hints
from lm_eval.api.model import TemplateLM  # type: ignore[import-untyped]  # lm-eval ships no type hints
from torch import nn

from qwen3 import Qwen3, Sampling
from qwen3.tokenizer import Qwen3Tokenizer
from trainer.distributed import all_ranks, group_rank_world, is_sharded
from trainer.generation import complete

# (context, continuation) strings (None for rolling windows), context ids, continuation ids
Request = tuple[tuple[str, str] | None, list[int], list[int]]
Scored = tuple[float, bool]  # summed log-probability of the continuation, whether it is greedy


class Qwen3LM(TemplateLM):  # type: ignore[misc]  # lm-eval's base class is untyped
    """A Qwen3 model as lm-eval's ``LM``: log-likelihoods (also rolling, for perplexity tasks)
    and greedy generation.

    ``forward`` is what computes logits (the model, or its DDP wrapper); ``model`` the module
    itself (generation). ``batch_tokens`` bounds the padded tokens of one forward: rows of
    similar length are batched together, as many as fit. ``autocast`` is the forward's
    precision context (the run's)."""

    def __init__(
        self,
        model: Qwen3,
        tokenizer: Qwen3Tokenizer,
        batch_tokens: int,
        forward: nn.Module | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager[object]] | None = None,
    ) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.forward = forward if forward is not None else model
        self.batch_tokens = batch_tokens
        self.autocast = autocast or contextlib.nullcontext
        self.max_length = model.config.max_position_embeddings

    # ---- what lm-eval asks of a model ----------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return "qwen3-pretrain"

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **_: Any
    ) -> list[int]:
        return self.tokenizer.encode(string)  # no BOS: a Qwen3 tokenizer adds none

    def tok_decode(self, tokens: list[int], **_: Any) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests: list[Request], **_: Any) -> list[Scored]:
        """Each request's continuation log-probability and greediness; inputs longer than the
        model's context keep their last ``max_length`` tokens (as lm-eval's HF backend)."""
        rows = [(ctx + cont)[-(self.max_length + 1) :] for _, ctx, cont in requests]
        conts = [len(cont) for _, _, cont in requests]
        widths = [len(r) - 1 for r in rows]  # input tokens of each row
        batches = list(self._batches(sorted(range(len(rows)), key=lambda i: -widths[i]), widths))
        rank, world = group_rank_world()
        mine = batches[rank::world]
        rounds = -(-len(batches) // world)  # forwards per rank: the most any rank has
        scored: dict[int, Scored] = {}
        with self._scoring():
            for r in range(rounds):
                batch = mine[r] if r < len(mine) else batches[0]
                out = self._score_batch([rows[i] for i in batch], [conts[i] for i in batch])
                if r < len(mine):
                    scored.update(zip(batch, out, strict=True))
        merged: dict[int, Scored] = {}
        for part in all_ranks(scored):
            merged.update(part)
        return [merged[i] for i in range(len(rows))]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each whole text's log-likelihood, in disjoint windows of the model's context (each
        window conditioned on the token before it), as lm-eval's HF backend computes it."""
        windows: list[Request] = []
        owner: list[int] = []
        for n, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[n] += logp
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy completions, cut at the first of each request's ``until`` strings. Every rank
        generates every request (a sharded model decodes a fixed number of tokens, so that all
        ranks run the same forwards)."""
        out: list[str] = []
        with self._scoring():
            for req in requests:
                context, kwargs = req.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                wanted = int(kwargs.get("max_gen_toks", 256))
                sampling = Sampling(max_new_tokens=wanted, temperature=0.0)
                (text,) = complete(
                    self.model, self.tokenizer, [context], sampling, is_sharded(self.model)
                )
                for stop in until:
                    text = text.split(stop)[0]
                out.append(text)
        return out

    # ---- scoring -------------------------------------------------------------------------------
    def _batches(self, order: list[int], widths: list[int]) -> Iterator[list[int]]:
        """Consecutive requests of ``order`` (longest first) as batches of at most
        ``batch_tokens`` padded tokens (at least one row each)."""
        batch: list[int] = []
        for i in order:
            if batch and (len(batch) + 1) * widths[batch[0]] > self.batch_tokens:
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    @contextlib.contextmanager
    def _scoring(self) -> Iterator[None]:
        """Evaluation mode without gradients, then back to what the model was (training)."""
        was_training = self.forward.training
        self.forward.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.forward.train(was_training)

    def _score_batch(self, rows: list[list[int]], conts: list[int]) -> list[Scored]:
        """Right-padded rows in one forward; only the positions from the earliest continuation
        on get logits (``logits_to_keep``), so a batch never holds (B, T, V) logits of its
        contexts."""
        device = self.model.device
        width = max(len(r) for r in rows) - 1
        x = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
        for b, row in enumerate(rows):
            x[b, : len(row) - 1] = torch.tensor(row[:-1])
        first = min(len(r) - 1 - c for r, c in zip(rows, conts, strict=True))  # earliest logit
        with self.autocast():
            logits = self.forward(x.to(device), logits_to_keep=width - first)  # (B, kept, V)
        out: list[Scored] = []
        for b, (row, c) in enumerate(zip(rows, conts, strict=True)):
            if c == 0:  # nothing to score
                out.append((0.0, True))
                continue
            start = len(row) - 1 - c - first
            logp = torch.log_softmax(logits[b, start : start + c].float(), dim=-1)  # (c, V)
            target = torch.tensor(row[-c:], device=logp.device)
            greedy = bool((logp.argmax(-1) == target).all())
            out.append((float(logp.gather(1, target[:, None]).sum()), greedy))
        return out
