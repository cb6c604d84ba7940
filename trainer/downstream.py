"""``train.py eval``: downstream tasks from lm-evaluation-harness on a checkpoint directory.

lm-eval does the work through its Python API: its Hugging Face backend (``HFLM``) loads the
checkpoint, which is a Qwen3 directory ``transformers`` reads, with our tokenizer files. This
module finds the checkpoint and the tasks, turns the user's mistakes into one-line errors, and
puts the scores where the run's other results are: ``eval/<timestamp>.json`` in the run
directory, and the run's wandb run when it has one.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from trainer.config import EvalCliConfig, WandbConfig, build_dataclass
from trainer.errors import ConfigError
from trainer.generation import inference_device
from trainer.run_layout import find_model_dir, step_number, timestamp_name

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager  # type: ignore[import-untyped]  # lm-eval ships no type hints

INSTALL_HINT = "install it with pip install -e '.[eval]'"
_YAML_SUFFIXES = (".yaml", ".yml")


def _is_path(spec: str) -> bool:
    """A task given as a file rather than a name: lm-eval's names never hold a slash or end
    in .yaml."""
    return spec.endswith(_YAML_SUFFIXES) or "/" in spec or os.sep in spec


def resolve_tasks(specs: list[str]) -> tuple[TaskManager, list[str]]:
    """lm-eval's task manager and the task names for ``specs`` (names or YAML paths).

    Local YAMLs are indexed through ``include_path`` (their folders), so a YAML may include
    its siblings; lm-eval's own thousands of tasks are indexed only when a name asks for them
    (that scan takes tens of seconds)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ConfigError(
            f"eval needs lm-eval, which is not installed ({e}); {INSTALL_HINT}"
        ) from None
    files: dict[str, Path] = {}
    for spec in filter(_is_path, specs):
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"tasks: {spec}: no such task file; pass a task YAML or a task name")
        files[spec] = path
    names = [s for s in specs if s not in files]
    folders = sorted({str(p.parent) for p in files.values()})
    manager = TaskManager(include_path=folders or None, include_defaults=bool(names))
    by_file = {e.yaml_path.resolve(): n for n, e in manager.task_index.items() if e.yaml_path}
    resolved: list[str] = []
    for spec in specs:
        if spec in files:
            name = by_file.get(files[spec])
            if name is None:
                raise ConfigError(
                    f"tasks: {spec} is not an lm-eval task YAML (it needs a 'task:' or "
                    "'group:' key and must parse as YAML)"
                )
            resolved.append(name)
        elif spec in manager.all_tasks:
            resolved.append(spec)
        else:
            resolved.append(_known_pattern(manager, spec))
    return manager, resolved


def _known_pattern(manager: TaskManager, spec: str) -> str:
    """``spec`` if it is a glob (``arc_*``) matching some task, else an unknown-task error
    naming the close ones."""
    if any(c in spec for c in "*?[") and manager.match_tasks([spec]):
        return spec
    close = difflib.get_close_matches(spec, manager.all_tasks, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "no task name is close"
    raise ConfigError(
        f"tasks: {spec!r} is not an lm-eval task; {hint} (`lm-eval ls tasks` lists them all; "
        "a local task is given by its YAML path)"
    )


def _offline_fix() -> str:
    set_vars = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(v)]
    if set_vars:
        return f"unset {' and '.join(set_vars)} on a machine with network access"
    return "run where huggingface.co can be reached"


def _results_of(cfg: EvalCliConfig, ckpt: Path) -> dict[str, Any]:
    """lm-eval's results for ``cfg.tasks`` on the model in ``ckpt``."""
    try:
        from lm_eval import simple_evaluate  # type: ignore[import-untyped]  # lm-eval ships no type hints
        from lm_eval.models.huggingface import HFLM  # type: ignore[import-untyped]  # lm-eval ships no type hints
    except ImportError as e:  # lm-eval, or its Hugging Face backend's accelerate
        raise ConfigError(
            f"eval needs lm-eval with its Hugging Face backend ({e}); {INSTALL_HINT}"
        ) from None
    manager, names = resolve_tasks(cfg.tasks)
    device = inference_device(cfg.device)
    model = HFLM(pretrained=str(ckpt), device=str(device), batch_size=cfg.batch_size)
    try:
        results = simple_evaluate(
            model=model,
            tasks=list(names),
            task_manager=manager,
            limit=cfg.limit,
            num_fewshot=cfg.num_fewshot,
            log_samples=False,
        )
    except ConnectionError as e:
        # datasets reports a hub it cannot reach, or offline mode, as ConnectionError
        # ("Couldn't reach 'allenai/ai2_arc' on the Hub (OfflineModeIsEnabled)").
        raise ConfigError(
            f"tasks={cfg.tasks}: a task's data must come from the Hugging Face hub, which "
            f"cannot be reached ({' '.join(str(e).split())}); {_offline_fix()}, or use a "
            "local task YAML"
        ) from None
    assert results is not None  # None only on ranks other than 0 of a multi-process lm-eval
    return dict(results)


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


def scores(results: dict[str, Any]) -> dict[str, float]:
    """Every numeric score as ``task/metric`` (``task/metric,filter`` for a filter other than
    ``none``): ``{"hellaswag/acc": 0.31, "hellaswag/acc_stderr": 0.02, ...}``."""
    flat: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, values in results.get(section, {}).items():
            for key, value in values.items():
                metric, _, filt = key.partition(",")
                if isinstance(value, bool) or not isinstance(value, int | float) or not filt:
                    continue  # alias, name, sample_len
                flat[f"{task}/{metric}" + ("" if filt == "none" else f",{filt}")] = float(value)
    return flat


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
    results = _results_of(cfg, ckpt)
    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    folder, run_dir = _output_dir(ckpt)
    record = {"checkpoint": str(ckpt.resolve()), "step": step_number(ckpt.resolve()), **results}
    path = _write_json(folder, record)
    where = "the run directory" if run_dir is not None else "beside the model directory"
    print(f"scores written to {path} ({where})")
    if run_dir is not None and cfg.wandb:
        run_id = _log_to_wandb(run_dir, ckpt, results, path)
        if run_id is not None:
            print(f"scores logged to the run's wandb run {run_id}")
    sys.stdout.flush()
    return path
