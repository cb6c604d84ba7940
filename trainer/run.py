"""One training run, from a typed config to the printed summary: check what can be checked
without data, build the parts, resume, train, report, and print samples."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from data.errors import DataError
from trainer.build import (
    RunParts,
    apply_runtime_settings,
    build_parts,
    check_optimizer_config,
    resolve_device,
)
from trainer.checkpoint import check_setup_matches
from trainer.checkpointer import DiskFull, clean_start
from trainer.config import RunConfig, SampleConfig
from trainer.distributed import DistInfo, dist_info, is_sharded, local_device, shutdown
from trainer.errors import CheckpointError, ConfigError
from trainer.generation import complete
from trainer.loop import Outcome, Trainer, TrainingDiverged
from trainer.metrics import WandbLogger, peak_flops
from trainer.plan import warn_if_unfit
from trainer.run_layout import AUTO, resolve_auto, resolve_resume
from trainer.sft import chat_sampling


def resume_command(overrides: list[str], run_name: str, dist: DistInfo | None = None) -> str:
    """The command line that continues this run (under torchrun: with the same process count)."""
    kept = [o for o in overrides if not o.startswith(("resume=", "run_name="))]
    launcher = "python train.py"
    if dist is not None and dist.is_distributed:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
        nodes = dist.world_size // per_node
        rdzv = f"--nnodes={nodes} <rendezvous options> " if nodes > 1 else ""
        launcher = f"torchrun {rdzv}--nproc_per_node={per_node} train.py"
    return " ".join([launcher, *kept, f"run_name={run_name}", "resume=latest"])


def run_training(
    cfg: RunConfig,
    run_dir: Path,
    config_yaml: str,
    config_dict: dict[str, Any],
    overrides: list[str],
    start_time: float,
) -> int:
    """Train, evaluate, save and report; returns the process exit code.

    Everything that can be checked without data (config values, device, optimizer settings,
    the checkpoint to resume from) is checked first, so a mistake costs seconds, not a tokenizer
    build. Only the project's own errors (what a user can fix) become one line; anything else is
    a bug, or the machine (out of memory), and keeps its traceback.
    """
    dist = dist_info()
    try:
        device, precision = resolve_device(cfg)
        device = local_device(device, dist)
        apply_runtime_settings(cfg, device)
        check_optimizer_config(cfg)
        if dist.is_main:  # on CUDA: the plan's warning and suggested change, if it will not fit
            warn_if_unfit(cfg, device, dist.world_size)
        if cfg.trainer.force_process_group and not dist.is_distributed:
            raise ConfigError(
                "trainer.force_process_group=true forms its group of one under torchrun; launch "
                "with torchrun --standalone --nproc_per_node=1 train.py ..."
            )
        resume_dir = None
        resume = resolve_auto(cfg.resume, run_dir)
        if cfg.resume == AUTO and resume is None and dist.is_main:
            print(f"resume=auto: no checkpoint in {run_dir} yet; starting a new run")
        if resume:
            resume_dir, skipped = resolve_resume(resume, run_dir)
            if skipped and dist.is_main:
                print(f"warning: {skipped}", file=sys.stderr, flush=True)
            check_setup_matches(resume_dir, cfg.model, cfg.optim.name)
        parts = build_parts(cfg, dist, device, precision)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if dist.is_main:  # the other ranks of a torchrun job never write to the run directory
        run_dir.mkdir(parents=True, exist_ok=True)
    clean_start(run_dir, dist)
    # one device per process: the run's peak is the sum of theirs
    peak = peak_flops(device, precision.dtype, cfg.trainer.peak_flops) * dist.world_size
    wandb = WandbLogger(cfg.wandb, run_dir, cfg.run_name, config_dict) if dist.is_main else None
    trainer = Trainer(cfg, parts, run_dir, dist, config_yaml, wandb, peak)
    if resume_dir is not None:
        try:
            trainer.resume_from(resume_dir)
        except (CheckpointError, DataError, ConfigError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if dist.is_main:
            print(f"resumed from {resume_dir} at step {trainer.step}")
            if trainer.precision_note:
                print(trainer.precision_note)
    n_params = parts.model.num_params()
    if dist.is_main:
        procs = f" x {dist.world_size} processes" if dist.is_distributed else ""
        if cfg.init_from and resume_dir is None:
            print(f"initialised from {cfg.init_from} (its weights and tokenizer)")
        unit = "conversations" if cfg.sft is not None else "tokens"
        print(
            f"run {run_dir}: {n_params / 1e6:.2f} M parameters, {len(parts.data.train):,} train / "
            f"{len(parts.data.val):,} val {unit}, device {device}{procs}, precision {precision.name}"
        )
    try:
        outcome = trainer.fit()
    except (TrainingDiverged, DiskFull) as e:
        if dist.is_main:
            again = (
                f" with:\n  {resume_command(overrides, cfg.run_name, dist)}"
                if isinstance(e, DiskFull)
                else ""
            )
            print(f"error: {e}{again}", file=sys.stderr)
        shutdown()  # no rank waits on wandb's upload below
        if wandb is not None:
            wandb.finish(exit_code=1)
        trainer.plots.wait()
        return 1
    if not outcome.final_eval:  # stopped early, or resumed a finished run
        outcome.final_eval = trainer.evaluate()
    sample_cfg: SampleConfig = cfg.sample
    wants_samples = not outcome.stopped_by and bool(sample_cfg.prompts)
    wants_samples = wants_samples and bool(sample_cfg.max_new_tokens)
    sampling = replace(sample_cfg, seed=cfg.seed)  # the run's seed
    shown = sample_cfg.prompts
    if cfg.sft is not None:  # a chat model: the prompts are user turns, answers end at im_end
        sampling = chat_sampling(parts.data.tokenizer, sampling)
        shown = [f"user: {p}\nassistant: " for p in sample_cfg.prompts]
    texts: list[str] | None = None
    if wants_samples and is_sharded(parts.model):
        # Every rank samples from its shards on the device (each forward gathers the weights
        # layer by layer, as in training): no rank gathers the whole model or waits for one that
        # does, so the end of a run costs the same at any size.
        texts = end_of_run_samples(parts, sampling, fixed_length=True)
    shutdown()  # the last collective: no rank waits on what rank 0 alone does below
    if not dist.is_main:
        return 0
    if wandb is not None:
        wandb.finish()
    print(
        summary_text(
            outcome,
            run_dir,
            time.perf_counter() - start_time,
            peak,
            trainer.tokens_per_step,
            outcome.budget or cfg.budget,
        )
    )
    if outcome.stopped_by:
        print(
            f"\nstopped by {outcome.stopped_by} at step {outcome.step}; resume with:\n"
            f"  {resume_command(overrides, cfg.run_name, dist)}"
        )
        trainer.plots.wait()
        return 0
    if wants_samples:
        if texts is None:  # the whole model is here (one process, or a DDP replica)
            texts = end_of_run_samples(parts, sampling, fixed_length=False)
        print(samples_text(shown, texts))
    trainer.plots.wait()  # the last plot, drawn while the samples were generated
    return 0


def end_of_run_samples(parts: RunParts, sampling: SampleConfig, fixed_length: bool) -> list[str]:
    """The completions of ``sampling.prompts`` by the trained model, on its device: in bf16 on
    a GPU whatever the training precision (sampling needs no float32 master math), else in the
    run's precision."""
    model = parts.model
    model.eval()
    if parts.device.type == "cuda" and torch.cuda.is_bf16_supported():
        autocast: contextlib.AbstractContextManager[object] = torch.autocast(
            "cuda", dtype=torch.bfloat16
        )
    else:
        autocast = parts.precision.autocast()
    with autocast:
        return complete(model, parts.data.tokenizer, sampling.prompts, sampling, fixed_length)


def format_duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m {s:02d}s" if m else f"{seconds:.1f}s"


def summary_text(
    outcome: Outcome,
    run_dir: Path,
    wall_seconds: float,
    peak_flops: float,
    tokens_per_step: int,
    budget: str = "",
) -> str:
    """A few aligned lines; the val metrics are those of the last evaluation. ``budget``: how
    the run's length was resolved (``RunConfig.budget``)."""
    ev = outcome.final_eval
    lines = [
        "",
        "== summary ==",
        f"run dir         {run_dir}",
        f"steps           {outcome.step} ({outcome.step * tokens_per_step:,} tokens)",
    ]
    if budget:
        lines.append(f"budget          {budget}")
    if ev:
        bpb = f"   val bpb {ev['val_bpb']:.3f}" if "val_bpb" in ev else ""
        lines.append(
            f"val loss        {ev['val_loss']:.4f}   val acc {ev['val_acc']:.4f}   "
            f"val ppl {ev['val_ppl']:.2f}{bpb}"
        )
    if outcome.downstream:
        steps = ", ".join(f"{v:.3f} (step {s})" for s, v in outcome.downstream)
        lines.append(f"{outcome.downstream_key}  {steps}")
    if math.isfinite(outcome.best_value):
        name = "val loss" if outcome.best_metric == "val_loss" else outcome.best_metric
        lines.append(
            f"best            {run_dir / 'best'} -> step {outcome.best_step} "
            f"({name} {outcome.best_value:.4f})"
        )
    lines += [
        f"tokens/s        {outcome.tokens_per_s:,.0f}   MFU {outcome.mfu:.1%} of "
        f"{peak_flops / 1e9:,.0f} GFLOP/s",
        f"training time   {format_duration(outcome.train_seconds)}",
        f"wall time       {format_duration(wall_seconds)}",
    ]
    return "\n".join(lines)


def samples_text(prompts: list[str], completions: list[str]) -> str:
    """Each prompt with its completion, separated by rules."""
    parts = ["", "== samples =="]
    for prompt, text in zip(prompts, completions, strict=True):
        parts += ["-" * 60, prompt + text]
    parts.append("-" * 60)
    return "\n".join(parts)
