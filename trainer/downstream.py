"""``train.py eval``: downstream tasks from lm-evaluation-harness on a checkpoint directory.

The checkpoint is loaded here and scored by :class:`trainer.lm_eval_model.Qwen3LM`, the same
lm-eval model wrapper the training loop scores its downstream tasks with
(trainer/downstream_loop.py), so a checkpoint's scores equal the ones its run logged at that
step. The tasks (names, YAML paths, suites) are trainer/lm_eval_tasks.py's. This module finds the
checkpoint, turns the user's mistakes into one-line errors, and puts the scores where the run's
other results are: ``eval/<timestamp>.json`` in the run directory, and the run's wandb run when
it has one.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from qwen3 import Qwen3
from qwen3.tokenizer import Qwen3Tokenizer
from trainer.config import EvalCliConfig, WandbConfig, build_dataclass
from trainer.errors import ConfigError
from trainer.generation import inference_device
from trainer.lm_eval_tasks import (
    INSTALL_HINT,
    LoadedTasks,
    core_score,
    load_tasks,
    run_tasks,
    scores,
    skipped_line,
)
from trainer.run_layout import find_model_dir, step_number, timestamp_name


def _results_of(cfg: EvalCliConfig, ckpt: Path) -> tuple[dict[str, Any], LoadedTasks]:
    """lm-eval's results for ``cfg.tasks`` on the model in ``ckpt``, scored by the same model
    wrapper as the training loop's downstream tasks (:class:`trainer.lm_eval_model.Qwen3LM`)."""
    try:
        from trainer.lm_eval_model import Qwen3LM
    except ImportError as e:
        raise ConfigError(
            f"eval needs lm-eval, which is not installed ({e}); {INSTALL_HINT}"
        ) from None
    tasks = load_tasks(cfg.tasks, skip_unreachable=False)
    if tasks.skipped:
        print(skipped_line(tasks.skipped), flush=True)
    if not tasks.names:
        raise ConfigError(f"tasks={cfg.tasks}: none of the tasks could be loaded")
    device = inference_device(cfg.device)
    model = Qwen3.from_pretrained(ckpt, device=device, dtype=torch.float32).eval()
    tokenizer = Qwen3Tokenizer.from_dir(ckpt)
    # batch_size rows of the model's whole context per forward (rows of similar length batched)
    rows = 8 if cfg.batch_size == "auto" else cfg.batch_size
    autocast = (
        functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and torch.cuda.is_bf16_supported()
        else None
    )
    lm = Qwen3LM(model, tokenizer, rows * model.config.max_position_embeddings, autocast=autocast)
    return run_tasks(lm, tasks, cfg.limit, cfg.num_fewshot), tasks


def _output_dir(ckpt: Path) -> tuple[Path, Path | None]:
    """Where the scores go (``eval/`` of the run, or beside a plain model dir) and the run
    directory, if ``ckpt`` is a step directory of one."""
    resolved = ckpt.resolve()
    run_dir = resolved.parent if step_number(resolved) is not None else None
    return resolved.parent / "eval", run_dir


def _write_json(folder: Path, record: dict[str, Any]) -> Path:
    """``folder/<timestamp>.json``, complete or absent, never over an earlier one."""
    from lm_eval.utils import handle_non_serializable  # type: ignore[import-untyped]  # lm-eval ships no type hints

    folder.mkdir(parents=True, exist_ok=True)
    stamp = timestamp_name()
    path, n = folder / f"{stamp}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{stamp}-{n}.json"
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(
        json.dumps(record, indent=2, default=handle_non_serializable) + "\n", encoding="utf-8"
    )
    os.replace(tmp, path)
    return path


def _run_wandb(run_dir: Path, ckpt: Path) -> WandbConfig | None:
    """The wandb settings of the run that wrote ``ckpt``, if that run logged to wandb (its
    wandb folder holds a run with the run directory's id)."""
    from trainer.metrics import wandb_run_id

    wandb_dir = Path(os.environ.get("WANDB_DIR") or run_dir) / "wandb"
    run_id = wandb_run_id(run_dir)
    if not any(wandb_dir.glob(f"*run-*-{run_id}")):
        return None
    try:
        saved = yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8"))
        section = saved.get("wandb") if isinstance(saved, dict) else None
        return build_dataclass(WandbConfig, section or {}, "wandb")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError) as e:
        print(f"wandb: not logging the scores: the run's config.yaml is unusable ({e})")
        return None


def _log_to_wandb(
    run_dir: Path, ckpt: Path, results: dict[str, Any], json_path: Path
) -> str | None:
    """Log the scores to the run's wandb run, against the checkpoint's step; returns the run
    id, or None when the run has no wandb run or wandb could not start."""
    cfg = _run_wandb(run_dir, ckpt)
    if cfg is None:
        return None
    from trainer.metrics import WandbLogger

    logger = WandbLogger(cfg, run_dir, run_dir.name, {}, background=False)
    if logger.run is None:
        return None
    # The run's own step has moved past an earlier checkpoint's, and wandb drops rows logged
    # at a smaller step: the scores get their own x axis, the checkpoint's step.
    logger.run.define_metric("downstream/step")
    logger.run.define_metric("downstream/*", step_metric="downstream/step")
    row: dict[str, Any] = {f"downstream/{k}": v for k, v in scores(results).items()}
    row["downstream/step"] = step_number(ckpt.resolve())
    logger.run.log(row)
    logger.run.summary["downstream/results_file"] = str(json_path)
    run_id = str(logger.run.id)
    logger.finish()
    return run_id


def evaluate(cfg: EvalCliConfig) -> Path:
    """Run ``cfg.tasks`` on the checkpoint, print lm-eval's table, write the JSON and log to
    wandb; returns the JSON's path."""
    ckpt = find_model_dir(cfg.ckpt, cfg.out_dir)
    print(f"checkpoint {ckpt.resolve()}", flush=True)
    results, tasks = _results_of(cfg, ckpt)
    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    record = {"checkpoint": str(ckpt.resolve()), "step": step_number(ckpt.resolve()), **results}
    if tasks.suite is not None:
        record["core"] = core_score(scores(results))
        record["skipped"] = tasks.skipped
        print(f"CORE ({tasks.suite}, {len(tasks.names)} tasks): {record['core']:.4f}")
    folder, run_dir = _output_dir(ckpt)
    path = _write_json(folder, record)
    where = "the run directory" if run_dir is not None else "beside the model directory"
    print(f"scores written to {path} ({where})")
    if run_dir is not None and cfg.wandb:
        run_id = _log_to_wandb(run_dir, ckpt, results, path)
        if run_id is not None:
            print(f"scores logged to the run's wandb run {run_id}")
    sys.stdout.flush()
    return path
