"""The training loop: steps, logging, evaluation, checkpoints, resume, stop on signal."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm  # type: ignore[import-untyped]

from data import BatchSampler
from data.sft_data import SFTData
from trainer.budget import TimeBudget
from trainer.build import RunParts
from trainer.checkpoint import (
    capture_rng,
    check_compatible,
    global_batch,
    load_trainer_state,
    restore_rng,
    tokenizer_hash,
)
from trainer.checkpointer import Checkpointer, DiskFull
from trainer.config import RunConfig
from trainer.distributed import DistInfo
from trainer.evaluation import evaluate_sources
from trainer.metrics import MetricsLog, PlotWriter, WandbLogger, mfu
from trainer.prefetch import BatchPrefetcher
from trainer.progress import Progress
from trainer.sft import evaluate_sft
from trainer.spikes import SpikeMonitor
from trainer.step import train_step
from trainer.step_stats import StepStats, WindowStats
from trainer.stop import StopRequest
from trainer.train_state import load_train_state

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"


def _empty_accum() -> dict[str, float]:
    """Sums over the steps since the last metrics row (saved in checkpoints: exact resume)."""
    return {"loss_sum": 0.0, "loss_count": 0, "grad_norm_sum": 0.0, "steps": 0, "skipped": 0}


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row."""


@dataclass
class Outcome:
    """How the run ended and what it reached."""

    step: int
    stopped_by: str | None  # signal name if interrupted
    final_eval: dict[str, float] = field(default_factory=dict)
    best_metric: str = "val_loss"  # the key `best` follows (trainer.best_metric)
    best_value: float = math.nan  # its best value so far (nan: none yet)
    best_step: int | None = None
    # the downstream main score (downstream/core, or the first task's acc) at each scored step
    downstream: list[tuple[int, float]] = field(default_factory=list)
    downstream_key: str = ""
    tokens_per_s: float = 0.0
    mfu: float = 0.0
    train_seconds: float = 0.0
    budget: str = ""  # what trainer.time_budget decided, when it did


class Trainer:
    """Runs the loop of one run directory; only rank 0 writes files."""

    def __init__(
        self,
        cfg: RunConfig,
        parts: RunParts,
        run_dir: Path,
        dist: DistInfo,
        config_yaml: str,
        wandb: WandbLogger | None,
        peak_flops: float,
    ) -> None:
        self.cfg, self.parts, self.run_dir, self.dist = cfg, parts, run_dir, dist
        self.config_yaml, self.wandb, self.peak = config_yaml, wandb, peak_flops
        self.metrics = MetricsLog(run_dir / METRICS_FILE)
        self.plots = PlotWriter()  # rank 0 draws; run_training waits for the last plot
        self.tok_hash = tokenizer_hash(parts.data.tokenizer)
        self.flops_per_token = parts.model.estimate_flops(cfg.trainer.seq_len)
        self.tokens_per_step = (
            cfg.trainer.batch_size * cfg.trainer.grad_accum * cfg.trainer.seq_len * dist.world_size
        )
        self.step = 0
        self.best_value = math.nan  # of trainer.best_metric; nan until an evaluation logs it
        self.best_step: int | None = None
        self.bad_in_row = 0
        self.accum = _empty_accum()
        self.train_seconds = 0.0
        self.window = {"seconds": 0.0, "tokens": 0}
        # Step results stay on the device until a log step reads them (trainer/step_stats.py);
        # the time of the steps between two reads is measured from one read to the next.
        self.stats = StepStats(parts.device, cfg.trainer.max_bad_steps, dist.world_size)
        self.spikes_seen = 0  # loss spikes the last read of the step statistics counted
        self.window_start = time.perf_counter()
        self.batches = BatchPrefetcher(parts.sampler, parts.device)
        t = cfg.trainer
        self.batch = global_batch(t.batch_size, t.grad_accum, dist.world_size, t.seq_len)
        self.spikes = SpikeMonitor(t.spike_window, t.spike_zscore) if t.spike_detection else None
        self.checkpoints = Checkpointer(
            run_dir, parts, dist, config_yaml, t.keep_last, asynchronous=t.async_save
        )
        self.budget_note = ""
        self.precision_note = ""  # set by resume_from when the checkpoint computed otherwise
        self.time_budget = (
            TimeBudget(t.time_budget, cfg.optim.warmup_steps, t.max_steps, parts.device)
            if isinstance(t.time_budget, float)
            else None
        )

    # ---- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``trainer_state.pt``: everything but the weights and the optimizers' own state (those
        are per-rank shards in ``train_state/``)."""
        p = self.parts
        return {
            "step": self.step,
            "schedules": p.optimizers.schedule_state_dict(),
            "scaler": p.precision.scaler.state_dict() if p.precision.scaler else None,
            # what trainer.precision resolved to: `auto` may choose otherwise on another machine
            "precision": p.precision.name,
            "sampler": p.sampler.state_dict(),
            "rng": capture_rng(),
            "best_metric": self.cfg.trainer.best_metric,
            "best_value": self.best_value,
            "best_step": self.best_step,
            "bad_in_row": self.bad_in_row,
            "log_accum": dict(self.accum),
            "global_batch": self.batch,
            "tokenizer_hash": self.tok_hash,
            "data_fingerprint": p.data.fingerprint,
            "spikes": self.spikes.state_dict() if self.spikes is not None else None,
            # the length trainer.time_budget chose: a resumed run keeps its schedule
            "time_budget_steps": self.time_budget.decided if self.time_budget else None,
        }

    def resume_from(self, ckpt_dir: Path) -> None:
        """Load a checkpoint's weights and state (each rank reads its own shards, whatever the
        number of processes that saved it); refuse one from a different setup."""
        state = load_trainer_state(ckpt_dir)
        p = self.parts
        check_compatible(ckpt_dir, state, p.model.config, self.tok_hash, self.batch)
        load_train_state(p.model, p.optimizers, ckpt_dir)
        p.optimizers.load_schedule_state_dict(state["schedules"])
        if p.precision.scaler is not None and state.get("scaler"):
            p.precision.scaler.load_state_dict(state["scaler"])
        saved = state.get("precision")  # absent from checkpoints written before it was kept
        if saved and saved != p.precision.name:
            self.precision_note = (
                f"note: {ckpt_dir} trained in {saved}; this run computes in {p.precision.name} "
                f"(trainer.precision={self.cfg.trainer.precision} on this machine): losses will "
                f"not continue bit for bit; pass trainer.precision={saved} to keep it"
            )
        p.sampler.load_state_dict(state["sampler"])
        restore_rng(state["rng"])
        self.step = int(state["step"])
        self._resume_best(state)
        self.bad_in_row = int(state["bad_in_row"])
        self.stats.resume(self.bad_in_row)
        self.accum = {**_empty_accum(), **state["log_accum"]}
        if self.spikes is not None and state.get("spikes"):
            self.spikes.load_state_dict(state["spikes"])
        decided = state.get("time_budget_steps")
        if self.time_budget is not None and decided:
            self.time_budget.decided = int(decided)
            self._set_length(int(decided))
            self.budget_note = (
                f"trainer.max_steps={decided:,}, as trainer.time_budget="
                f"{self.time_budget.budget:g} s set it before the resume"
            )
        self.checkpoints.last_saved = self.step
        if self.dist.is_main:
            self.metrics.truncate_after(self.step)

    def _resume_best(self, state: dict[str, Any]) -> None:
        """The best value so far, if the checkpoint followed the same metric (one written
        before ``trainer.best_metric`` existed followed val loss; its infinity meant none yet)."""
        metric = state.get("best_metric", "val_loss")
        value = float(state.get("best_value", state.get("best_val_loss", math.nan)))
        if metric != self.cfg.trainer.best_metric:
            if self.dist.is_main:
                print(
                    f"best followed {metric} until step {self.step}; from here it follows "
                    f"{self.cfg.trainer.best_metric} (trainer.best_metric)"
                )
            return
        self.best_value = value if math.isfinite(value) else math.nan
        self.best_step = state["best_step"]

    def _improves(self, row: dict[str, Any]) -> bool:
        """Whether this evaluation's ``trainer.best_metric`` beats the best so far (only ever a
        finite value), and if so, record it."""
        t = self.cfg.trainer
        value = row.get(t.best_metric)
        if not isinstance(value, float) or not math.isfinite(value):
            return False
        best = self.best_value
        better = math.isnan(best) or (value > best if t.best_higher else value < best)
        if better:
            self.best_value, self.best_step = value, self.step
        return better

    def save(self, improved: bool, final: bool = True) -> None:
        """Save a checkpoint of the current step (collective; :class:`Checkpointer`)."""
        self.checkpoints.save(self.step, self.state_dict, improved, final)

    # ---- pieces of a step -------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        t = self.cfg.trainer
        p = self.parts
        if isinstance(p.data, SFTData):  # held-out conversations: the assistant's tokens
            return evaluate_sft(
                p.forward,
                p.data,
                t.batch_size,
                t.seq_len,
                t.eval_batches,
                p.precision,
                p.device,
                p.token_bytes,
            )
        assert isinstance(p.sampler, BatchSampler)  # a token split's windows
        return evaluate_sources(
            p.forward,
            p.data.sources,
            t.batch_size,
            t.seq_len,
            t.eval_batches,
            p.precision,
            p.device,
            p.token_bytes,
            p.sampler.packing,
        )

    def _record(self) -> dict[str, Any]:
        """The row for this step from the steps since the last row (then reset)."""
        a = self.accum
        tps = self.window["tokens"] / self.window["seconds"] if self.window["seconds"] else 0.0
        lrs = self.parts.optimizers.lrs()
        row: dict[str, Any] = {
            "step": self.step,
            "train_loss": a["loss_sum"] / a["loss_count"] if a["loss_count"] else math.nan,
            "grad_norm": a["grad_norm_sum"] / a["steps"] if a["steps"] else math.nan,
            "lr": next(iter(lrs.values())),
            **lrs,
            "tokens_per_s": tps,
            "mfu": mfu(tps, self.flops_per_token, self.peak),
            "tokens": self.step * self.tokens_per_step,
        }
        for name in ("aux_loss", "expert_load"):
            if f"{name}_sum" in a and a["steps"]:
                row[name] = a[f"{name}_sum"] / a["steps"]
        if a["skipped"]:
            row["skipped_steps"] = a["skipped"]
        self.accum = _empty_accum()
        self.window = {"seconds": 0.0, "tokens": 0}
        return row

    def _report_spikes(self, row: dict[str, Any]) -> None:
        """One line per loss spike since the last row; the row gets their count and the largest
        z-score (``loss_spikes``, ``loss_spike``). The monitor's records are read from the device
        only when the step statistics counted a spike (a log step reads the device once)."""
        if self.spikes is None:
            return
        if not self.spikes_seen:
            self.spikes.drop()
            return
        found = self.spikes.take()
        row["loss_spikes"] = len(found)
        row["loss_spike"] = max(s.zscore for s in found)
        if not self.dist.is_main:
            return
        action = "update skipped" if self.cfg.trainer.spike_action == "skip" else "kept"
        for s in found:
            tqdm.write(
                f"step {s.step}: loss spike {s.loss:.4f} ({s.zscore:.1f} std above the mean "
                f"{s.mean:.4f} of recent steps); {action}"
            )

    def _write(self, row: dict[str, Any], plot: bool) -> None:
        if not self.dist.is_main:
            return
        self.metrics.append(row)
        if self.wandb is not None:
            self.wandb.log(row)
        if plot:
            self.plots.draw(self.metrics.read(), self.run_dir / PLOT_FILE, self.cfg.run_name)

    def _set_length(self, max_steps: int, bar: Progress | None = None) -> None:
        """Make the run ``max_steps`` long from here on (its schedules, its progress line)."""
        self.cfg.trainer.max_steps = max_steps
        self.parts.optimizers.set_max_steps(max_steps)
        if bar is not None:
            bar.set_total(max_steps)

    def _fit_time_budget(self, bar: Progress) -> None:
        """At the time budget's decision step, cut the run to what fits (trainer/budget.py)."""
        assert self.time_budget is not None
        before = self.cfg.trainer.max_steps
        steps = self.time_budget.after_step(self.step)
        if steps is None:
            return
        self._set_length(steps, bar)
        self.budget_note = self.time_budget.note(before)
        if self.dist.is_main:
            tqdm.write(self.budget_note)

    # ---- the loop ---------------------------------------------------------------------------
    def _train_one_step(self) -> None:
        """Queue step ``self.step + 1``; its results stay on the device (no host wait)."""
        t, p = self.cfg.trainer, self.parts
        batch = self.batches.get(self.step)  # sampler.sample(self.step), usually already copied
        ahead = self.step + 1
        prefetch = (lambda: self.batches.prefetch(ahead)) if ahead < t.max_steps else None
        res = train_step(
            p.forward,
            p.optimizers,
            batch.x,
            batch.y,
            t.grad_accum,
            p.precision,
            t.clip,
            prefetch,
            spikes=self.spikes,
            skip_spikes=t.spike_action == "skip",
            step=self.step + 1,
            document_ids=batch.document_ids,  # data.document_mask: packed documents
        )
        self.stats.add(res)
        self.step += 1
        self.window["tokens"] += self.tokens_per_step

    def _read_steps(self, stop_requested: bool) -> bool:
        """On a log step: read the steps since the last one (every rank together, one
        collective), add them to the row's sums, and stop if training diverged. Returns whether
        any rank was asked to stop."""
        w: WindowStats = self.stats.read(stop_requested)
        elapsed = time.perf_counter() - self.window_start  # the device has finished the steps
        self.train_seconds += elapsed
        self.window["seconds"] += elapsed
        a, world = self.accum, w.world
        a["loss_sum"] += w.loss_sum
        a["loss_count"] += int(w.loss_count)
        a["grad_norm_sum"] += w.grad_norm_sum / world
        a["steps"] += round(w.steps / world)
        a["skipped"] += round(w.skipped / world)
        if w.moe:  # a mixture of experts' aux loss and load
            for name in ("aux_loss", "expert_load"):
                a[f"{name}_sum"] = a.get(f"{name}_sum", 0.0) + getattr(w, f"{name}_sum") / world
        self.bad_in_row = w.bad_in_row
        if w.bad and self.dist.is_main:
            tqdm.write(
                f"step {self.step}: {round(w.bad / world)} step(s) since the last log had a "
                "non-finite gradient; their updates were skipped"
            )
        self.spikes_seen = round(w.spikes / world)
        if w.diverged:
            self._write(self._record(), plot=True)
            raise TrainingDiverged(
                f"{self.cfg.trainer.max_bad_steps} non-finite steps in a row (or loss spikes "
                f"skipped; seen at step {self.step}): training diverged. The last good "
                f"checkpoints are intact in {self.run_dir} (latest, best). Lower "
                "optim.lr/optim.adamw_lr or keep trainer.clip on (or set "
                "trainer.spike_action=log if the loss moved to a new level), then resume=PATH "
                "from a checkpoint before the divergence."
            )
        return w.stop

    def _log_eval_save(self, stop_requested: bool, outcome: Outcome, bar: Progress) -> bool:
        """After a step: on a log step read the steps, write a metrics row, evaluate, save, as
        the cadences say. Returns whether to stop: one process stops after the step a signal
        came in; several agree on the log step after it, where they read the device anyway."""
        t = self.cfg.trainer
        last = self.step == t.max_steps
        do_eval = bool(last or (t.eval_every and self.step % t.eval_every == 0))
        tasks = self.parts.downstream
        do_tasks = tasks is not None and tasks.due(self.step, do_eval, last)
        stop_here = stop_requested and not self.dist.is_distributed
        if not (do_eval or do_tasks or stop_here or self.step % t.log_every == 0):
            return False
        stopping = self._read_steps(stop_requested)
        row = self._record()
        self._report_spikes(row)
        bar.log(row)
        improved = False
        if do_eval:
            ev = self.evaluate()
            row.update(ev)
            outcome.final_eval = ev
            bpb = f", bpb {ev['val_bpb']:.3f}" if "val_bpb" in ev else ""
            if self.dist.is_main:
                tqdm.write(
                    f"step {self.step}: train loss {row['train_loss']:.4f}, val loss "
                    f"{ev['val_loss']:.4f}, acc {ev['val_acc']:.3f}, "
                    f"ppl {ev['val_ppl']:.1f}{bpb}"
                )
        if do_tasks and tasks is not None:
            row.update(self._score_tasks(outcome, bar))
        if do_eval or do_tasks:
            improved = self._improves(row)  # best only ever moves to a better, finite value
        self._write(row, plot=bool(do_eval or do_tasks))
        periodic = t.save_every and self.step % t.save_every == 0
        if (improved or last or stopping or periodic) and self.checkpoints.last_saved != self.step:
            self.save(improved, final=bool(last or stopping))
        self.window_start = time.perf_counter()  # evaluations and saves are not training time
        return stopping

    def _score_tasks(self, outcome: Outcome, bar: Progress) -> dict[str, float]:
        """The downstream tasks' scores now (every rank), with one line on rank 0; the progress
        line shows the main one from here on."""
        tasks = self.parts.downstream
        assert tasks is not None
        scores = tasks()
        key = tasks.main_metric
        if key in scores:
            outcome.downstream.append((self.step, scores[key]))
            outcome.downstream_key = key
            bar.keep(key.removeprefix("downstream/"), f"{scores[key]:.3f}")
            if self.dist.is_main:
                tqdm.write(f"step {self.step}: {key} {scores[key]:.4f}")
        return scores

    def fit(self) -> Outcome:
        """Train from ``self.step`` to ``trainer.max_steps``, or until SIGINT/SIGTERM."""
        t = self.cfg.trainer
        outcome = Outcome(step=self.step, stopped_by=None)
        start_step = self.step
        bar = Progress(t.max_steps, self.step, self.dist.is_main, self.parts.device)
        stopping = False
        self.window_start = time.perf_counter()
        if self.time_budget is not None:
            self.time_budget.start(self.step)
        with StopRequest() as stop:
            try:
                while self.step < t.max_steps and not stopping:
                    self._train_one_step()
                    bar.update(1)
                    if self.time_budget is not None:
                        self._fit_time_budget(bar)
                    stopping = self._log_eval_save(stop.requested, outcome, bar)
                    self.checkpoints.poll()
            except Exception as err:  # a failing run still publishes the save it started
                if not isinstance(err, DiskFull):
                    self.checkpoints.finish()
                raise
            self.checkpoints.finish()
            outcome.stopped_by = stop.signal_name or ("signal (another rank)" if stopping else None)
        bar.close()
        outcome.step = self.step
        outcome.best_value, outcome.best_step = self.best_value, self.best_step
        outcome.best_metric = t.best_metric
        outcome.train_seconds = self.train_seconds
        outcome.budget = self.budget_note
        if self.train_seconds:
            outcome.tokens_per_s = (
                (self.step - start_step) * self.tokens_per_step / self.train_seconds
            )
            outcome.mfu = mfu(outcome.tokens_per_s, self.flops_per_token, self.peak)
        return outcome
