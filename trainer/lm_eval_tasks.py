"""Which lm-eval tasks a run scores and how: task names, local task YAMLs and the suites
(``core``, ``core_local``), loading them once (hub tasks whose data cannot be reached are named
and skipped where asked), running them on a model, and the scores as flat ``task/metric`` keys
with the CORE aggregate. ``train.py eval`` (trainer/downstream.py) and the training loop
(trainer/downstream_loop.py) both score through :func:`run_tasks`.
"""

from __future__ import annotations

import difflib
import glob
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trainer.errors import ConfigError

if TYPE_CHECKING:
    from lm_eval.api.model import LM  # type: ignore[import-untyped]  # lm-eval ships no type hints
    from lm_eval.tasks import TaskManager  # type: ignore[import-untyped]  # lm-eval ships no type hints

INSTALL_HINT = "install it with pip install -e '.[eval]'"
_YAML_SUFFIXES = (".yaml", ".yml")
LOCAL_TASK_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "lm_eval_tasks"

# The CORE suite (nanochat's, after DCLM): each task's metric and its chance level. The local
# tasks are 4-way multiple choice over the default corpus's held-out plays; the hub tasks join
# when their data can be reached. CORE = the mean over tasks of (metric - chance) / (1 - chance).
CORE_TASKS: dict[str, tuple[str, float]] = {
    "shakespeare_next_line": ("acc", 0.25),
    "shakespeare_next_speaker": ("acc", 0.25),
    "shakespeare_missing_word": ("acc", 0.25),
    "hellaswag": ("acc_norm", 0.25),
    "arc_easy": ("acc_norm", 0.25),
    "piqa": ("acc_norm", 0.5),
    "lambada_openai": ("acc", 0.0),
    "winogrande": ("acc", 0.5),
}
LOCAL_TASKS = ["shakespeare_next_line", "shakespeare_next_speaker", "shakespeare_missing_word"]
HUB_TASKS = ["hellaswag", "arc_easy", "piqa", "lambada_openai", "winogrande"]
SUITES = {"core": LOCAL_TASKS + HUB_TASKS, "core_local": LOCAL_TASKS}
# simple_evaluate's default seeds (python, numpy, few-shot sampling): the same prompts as lm-eval's
# own runs, at every step of a run
_SEEDS = (0, 1234, 1234)


def local_task_path(name: str) -> str:
    """The YAML of a task shipped in ``benchmarks/lm_eval_tasks/``."""
    return str(LOCAL_TASK_DIR / f"{name}.yaml")


def is_path(spec: str) -> bool:
    """A task given as a file rather than a name: lm-eval's names never hold a slash or end
    in .yaml."""
    return spec.endswith(_YAML_SUFFIXES) or "/" in spec or os.sep in spec


def expand_suites(specs: list[str]) -> tuple[list[str], str | None]:
    """``specs`` with a suite name replaced by its tasks (local ones as YAML paths), and the
    suite's name (None without one); one suite at most."""
    suites = [s for s in specs if s in SUITES]
    if len(suites) > 1:
        raise ConfigError(f"tasks: {suites} name more than one suite; keep one of them")
    out: list[str] = []
    for spec in specs:
        if spec in SUITES:
            local = [local_task_path(n) for n in SUITES[spec] if n in LOCAL_TASKS]
            out += local + [n for n in SUITES[spec] if n not in LOCAL_TASKS]
        else:
            out.append(spec)
    return list(dict.fromkeys(out)), suites[0] if suites else None


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
    for spec in filter(is_path, specs):
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
        "a local task is given by its YAML path; suites: core, core_local)"
    )


def offline_fix() -> str:
    set_vars = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(v)]
    if set_vars:
        return f"unset {' and '.join(set_vars)} on a machine with network access"
    return "run where huggingface.co can be reached"


@dataclass
class LoadedTasks:
    """Tasks loaded once (their documents read), ready to be scored any number of times."""

    names: list[str]  # lm-eval's names of the tasks that loaded
    task_dict: dict[str, Any]  # lm-eval's {"tasks": ..., "groups": ...}
    suite: str | None = None
    skipped: list[str] = field(default_factory=list)  # hub tasks whose data was out of reach


def load_tasks(specs: list[str], skip_unreachable: bool) -> LoadedTasks:
    """Load ``specs`` (names, YAML paths, a suite). A task whose data must come from the
    Hugging Face hub and cannot: skipped and listed in ``skipped`` when ``skip_unreachable``
    (and for a suite's hub tasks always), else a one-line :class:`ConfigError`."""
    expanded, suite = expand_suites(specs)
    manager, names = resolve_tasks(expanded)
    hub = set(HUB_TASKS) if suite else set()
    loaded: dict[str, Any] = {"tasks": {}, "groups": {}}
    kept: list[str] = []
    skipped: list[str] = []
    for name in names:
        try:
            one = manager.load([_with_local_data(manager, name)])
        except FileNotFoundError as e:  # datasets: a data file of a task YAML is not there
            raise ConfigError(
                f"tasks: {name}: {' '.join(str(e).split())}; a relative dataset_kwargs.data_files "
                "path is read from the task YAML's folder, else from the working directory"
            ) from None
        except ConnectionError as e:  # datasets: the hub unreachable, or offline mode
            if not (skip_unreachable or name in hub):
                raise ConfigError(
                    f"tasks: {name}'s data must come from the Hugging Face hub, which cannot "
                    f"be reached ({' '.join(str(e).split())}); {offline_fix()}, or use a local "
                    "task YAML"
                ) from None
            skipped.append(name)
            continue
        for key in ("tasks", "groups"):
            loaded[key].update(one.get(key, {}))
        if "group_map" in one:
            loaded.setdefault("group_map", {}).update(one["group_map"])
        kept.append(name)
    return LoadedTasks(kept, loaded, suite, skipped)


def _with_local_data(manager: TaskManager, name: str) -> str | dict[str, Any]:
    """``name``, or, for a task YAML whose ``dataset_kwargs.data_files`` name files beside it by
    a relative path, the task's whole config with those paths made absolute: datasets reads a
    relative path from the working directory, and the shipped tasks must load from anywhere.
    (A path that names no file beside the YAML is left for datasets to read as before.)"""
    entry = manager.task_index.get(name)
    if entry is None or entry.yaml_path is None:
        return name
    # lm-eval's own reading of the YAML (its includes merged, !function tags resolved): a task
    # given as a config dict is built from that config alone
    from lm_eval.tasks._yaml_loader import load_yaml  # type: ignore[import-untyped]  # lm-eval ships no type hints

    config = load_yaml(entry.yaml_path, resolve_func=True)
    kwargs = config.get("dataset_kwargs")
    if not isinstance(config.get("task"), str) or not isinstance(kwargs, dict):
        return name  # a group, or a task without data_files: nothing to resolve
    folder = Path(entry.yaml_path).resolve().parent

    def beside(files: Any) -> Any:
        if isinstance(files, dict):
            return {split: beside(f) for split, f in files.items()}
        if isinstance(files, list):
            return [beside(f) for f in files]
        if not isinstance(files, str) or "://" in files or Path(files).is_absolute():
            return files
        here = str(folder / files)
        return here if glob.glob(here, recursive=True) else files

    files = kwargs.get("data_files")
    resolved = beside(files)
    if resolved == files:
        return name
    return {**config, "dataset_kwargs": {**kwargs, "data_files": resolved}}


def skipped_line(skipped: list[str]) -> str:
    """The one line naming the tasks left out because their data could not be reached."""
    return (
        f"downstream: skipping {', '.join(skipped)}: their data is on the Hugging Face hub, "
        f"which cannot be reached ({offline_fix()} to score them)"
    )


def run_tasks(
    lm: LM,
    tasks: LoadedTasks,
    limit: int | float | None,
    num_fewshot: int | None,
    bootstrap_iters: int = 100_000,
) -> dict[str, Any]:
    """lm-eval's results of ``tasks`` on ``lm``: the prompts (few-shot examples included) the
    same at every call, as :func:`lm_eval.simple_evaluate` would build them. Python's and
    numpy's random states are put back afterwards (the training run's own draws go on)."""
    from lm_eval.evaluator import evaluate  # type: ignore[import-untyped]  # lm-eval ships no type hints

    states = random.getstate(), np.random.get_state()
    random.seed(_SEEDS[0])
    np.random.seed(_SEEDS[1])
    try:
        for task in tasks.task_dict["tasks"].values():
            default = task.get_config("num_fewshot")
            if num_fewshot is not None and default != 0:  # a task fixed at 0 stays at 0
                task.set_config(key="num_fewshot", value=num_fewshot)
            elif default is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=_SEEDS[2])
        results = evaluate(
            lm=lm,
            task_dict=tasks.task_dict,
            limit=limit,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
        )
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
    assert results is not None  # None only on ranks other than lm.rank 0; ours are all rank 0
    return dict(results)


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


def core_score(flat: dict[str, float]) -> float | None:
    """The CORE aggregate of ``flat`` scores (:func:`scores`): each CORE task's metric centered
    on its chance level, averaged over the CORE tasks present; None when none is."""
    centered = [
        (flat[f"{task}/{metric}"] - chance) / (1 - chance)
        for task, (metric, chance) in CORE_TASKS.items()
        if f"{task}/{metric}" in flat
    ]
    return sum(centered) / len(centered) if centered else None
