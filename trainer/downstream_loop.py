"""Downstream tasks inside the training loop (``trainer.eval_tasks``): lm-eval tasks scored on
the training model itself, at evaluation steps, under one process, DDP or FSDP.

The tasks are loaded once, when the run is built (lm-eval is imported only then); each call
scores them with :class:`trainer.lm_eval_model.Qwen3LM`, the wrapper ``train.py eval`` scores a
checkpoint with, so the loop's scores at a step equal ``train.py eval`` of that step's
checkpoint. Every rank takes part (each scores its share of the batches) and every rank gets
the same scores.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
from collections.abc import Iterator

from trainer.build import RunParts
from trainer.config import TrainConfig
from trainer.distributed import DistInfo
from trainer.errors import ConfigError
from trainer.lm_eval_tasks import (
    INSTALL_HINT,
    core_score,
    load_tasks,
    run_tasks,
    scores,
    skipped_line,
)

_BAR = re.compile(r"\d+%\|")  # a tqdm progress bar's line


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's and datasets' progress bars and info logs off while scoring (the run's own
    progress line is what a user watches); anything else written to stderr is passed on."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):  # tqdm writes its bars to sys.stderr
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        kept = [ln for ln in re.split(r"[\r\n]", err.getvalue()) if ln and not _BAR.search(ln)]
        if kept:
            print("\n".join(kept), file=sys.stderr, flush=True)


class DownstreamScorer:
    """Scores ``trainer.eval_tasks`` on the run's live model; returns
    ``{"downstream/<task>/<metric>": value, ...}`` plus ``downstream/core`` for a suite."""

    def __init__(self, cfg: TrainConfig, parts: RunParts, dist: DistInfo) -> None:
        try:
            import datasets

            from trainer.lm_eval_model import Qwen3LM
        except ImportError as e:
            raise ConfigError(
                f"trainer.eval_tasks needs lm-eval, which is not installed ({e}); {INSTALL_HINT}"
            ) from None

        datasets.disable_progress_bars()
        self.cfg, self.dist = cfg, dist
        tasks = cfg.eval_tasks if isinstance(cfg.eval_tasks, list) else [cfg.eval_tasks]
        try:
            with _quiet():
                self.tasks = load_tasks(tasks, skip_unreachable=True)
        except ConfigError as e:  # its key here is trainer.eval_tasks
            raise ConfigError(
                f"trainer.eval_{e}" if str(e).startswith("tasks") else str(e)
            ) from None
        if self.tasks.skipped and dist.is_main:
            print(skipped_line(self.tasks.skipped), file=sys.stderr, flush=True)
        # A forward holds as many tokens as a training micro-batch (without the backward's
        # activations), however the rows are shaped.
        self.lm = Qwen3LM(
            parts.model,
            parts.data.tokenizer,
            cfg.batch_size * cfg.seq_len,
            forward=parts.forward,
            autocast=parts.precision.autocast,
        )

    @property
    def main_metric(self) -> str | None:
        """The key the progress line shows: the CORE score for a suite, else the first task's
        accuracy."""
        if self.tasks.suite is not None:
            return "downstream/core"
        return f"downstream/{self.tasks.names[0]}/acc" if self.tasks.names else None

    def due(self, step: int, evaluating: bool, last: bool) -> bool:
        """Whether this step scores the tasks: at each evaluation (``eval_tasks_every=0``), or
        every ``eval_tasks_every`` steps, and at the last step."""
        if not self.tasks.names:
            return False
        every = self.cfg.eval_tasks_every
        return last or (evaluating if every == 0 else step % every == 0)

    def __call__(self) -> dict[str, float]:
        """The scores of every task now (collective: every rank calls it)."""
        with _quiet():
            results = run_tasks(
                self.lm,
                self.tasks,
                self.cfg.eval_tasks_limit,
                self.cfg.eval_tasks_fewshot,
                # a mean's stderr has a closed form; other aggregations bootstrap, kept short
                bootstrap_iters=1000,
            )
        flat = scores(results)
        row = {f"downstream/{k}": v for k, v in flat.items()}
        core = core_score(flat) if self.tasks.suite is not None else None
        if core is not None:
            row["downstream/core"] = core
        return row
