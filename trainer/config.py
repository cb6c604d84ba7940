"""A run's configuration, typed and validated once: the ``trainer``, ``sample`` and ``wandb``
sections (the ``model``, ``data`` and ``optim`` sections are their packages' own dataclasses),
:class:`RunConfig` built from the composed Hydra config, and the options of ``demo``,
``interactive`` and ``eval``.

Each section is a plain dataclass whose ``__post_init__`` checks its values; pydantic validates
the types of a mapping against the annotations first (``Literal`` choices, tuples, nested
types), and every problem becomes one :class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from pydantic import TypeAdapter, ValidationError

from data import DataConfig
from data.conversations import SFTDataConfig
from optim import OptimConfig, fit_warmup
from qwen3 import PRESETS, Qwen3, Qwen3Config
from qwen3.generate import Sampling
from qwen3.quantize import QUANTIZE_CHOICES, unknown_method
from trainer.budget import DEFAULT_MAX_STEPS, resolve_max_steps, resolve_time_budget
from trainer.distributed import DEFAULT_TIMEOUT_S, dist_info
from trainer.errors import ConfigError
from trainer.lm_eval_tasks import is_path
from trainer.run_layout import default_init_from

T = TypeVar("T")


def unknown_key_message(key: str, valid: Iterable[str]) -> str:
    """One line saying the dotted ``key`` is unknown and naming the closest of the dotted
    ``valid`` keys (a key of the same section first), or all keys of its section when none is
    close, e.g. ``trainer.maxsteps is not a known config key; did you mean trainer.max_steps?``"""
    valid = sorted(valid)
    parent, _, name = key.rpartition(".")
    sections = {k.rpartition(".")[0] for k in valid}
    if parent not in sections:
        parent = ""  # a misspelt section: compare whole keys, list the top level

    def score(candidate: str) -> float:
        c_parent, _, c_name = candidate.rpartition(".")
        by_name = difflib.SequenceMatcher(None, name, c_name).ratio()
        if c_parent == parent:
            return by_name
        # A key of another section, or the whole key misspelt (traner.max_steps): ranked lower.
        return max(by_name, difflib.SequenceMatcher(None, key, candidate).ratio()) - 0.1

    ancestors = {key.rsplit(".", n)[0] for n in range(1, key.count(".") + 1)}
    scores = sorted(((score(k), k) for k in valid if k not in ancestors), reverse=True)
    best = scores[0][0] if scores else 0.0
    close = [k for sc, k in scores[:3] if sc >= max(0.6, best - 0.1)]
    if close:
        return f"{key} is not a known config key; did you mean {' or '.join(close)}?"
    siblings = [k.rpartition(".")[2] for k in valid if k.rpartition(".")[0] == parent]
    where = f"of {parent}" if parent else "at the top level"
    return f"{key} is not a known config key; valid keys {where}: {', '.join(siblings)}."


_ADAPTERS: dict[type[Any], TypeAdapter[Any]] = {}


def _adapter(cls: type[Any]) -> TypeAdapter[Any]:
    """pydantic's validator for ``cls``, built once (building one costs milliseconds)."""
    if cls not in _ADAPTERS:
        _ADAPTERS[cls] = TypeAdapter(cls)
    return _ADAPTERS[cls]


def _problem(err: ValidationError, section: str, values: Mapping[str, Any]) -> str:
    """pydantic's first error as one line naming the dotted key, its value and what is wanted.
    A value the dataclass itself refused (its ``__post_init__``) keeps that message."""
    first = err.errors(include_url=False)[0]
    if first["type"] == "value_error" and not first["loc"]:
        msg = str(first["ctx"]["error"])
        return msg if section in msg else f"{section}: {msg}"
    name, *inner = first["loc"]
    where = "".join(f"[{part}]" for part in inner)
    wanted = first["msg"][0].lower() + first["msg"][1:]
    item = f"item {where}: " if where else ""
    return f"{section}.{name}={values.get(str(name))!r} is not valid: {item}{wanted}."


def build_dataclass(
    cls: type[T], values: Mapping[str, Any], section: str, skip: tuple[str, ...] = ()
) -> T:
    """An instance of the config dataclass ``cls`` from ``values``, validated by pydantic
    against its annotations (``Literal`` choices, tuples, nested types) and then by its own
    ``__post_init__``; unknown keys, wrong types and invalid values raise one
    :class:`ConfigError` naming ``section.key``."""
    fields = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in skip}  # type: ignore[arg-type]
    unknown = sorted(set(values) - fields)
    if unknown:
        valid = [f"{section}.{name}" for name in fields]
        raise ConfigError(unknown_key_message(f"{section}.{unknown[0]}", valid))
    try:
        built: T = _adapter(cls).validate_python(dict(values))
    except ValidationError as err:
        raise ConfigError(_problem(err, section, values)) from None
    return built


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
WANDB_MODES = ("auto", "online", "offline", "disabled")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _fail(key: str, value: Any, problem: str, fix: str) -> None:
    raise ValueError(f"{key}={value!r} {problem}; {fix}")


def _check_int(key: str, value: Any, low: int, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(key, value, f"must be a whole number >= {low}", f"set e.g. {key}={example}")


@dataclass
class TrainConfig:
    """The training loop: budget, batch shape, precision, and the cadence of logs, evals and saves.

    The optimizer update uses ``batch_size * grad_accum`` sequences of ``seq_len`` tokens per
    process; ``batch_size`` is what one forward pass holds in memory.
    """

    max_steps: int = (
        DEFAULT_MAX_STEPS  # optimizer steps (null in YAML: the default, or a token budget)
    )
    max_tokens: int | None = None  # train for this many tokens (sets max_steps; trainer/budget.py)
    tokens_per_param: float | None = None  # or this many per model parameter (20: Chinchilla)
    # seconds of training steps the run may take: its length is cut to what fits, decided at the
    # end of warmup; auto = 250 s for the default length, none when the length is set
    time_budget: float | Literal["auto"] | None = "auto"
    batch_size: int = 16  # sequences per forward pass, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256  # tokens per training window
    # auto: bf16 autocast where bf16 matmuls run in hardware (CUDA, CPUs with AMX or AVX-512
    # BF16), else fp32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    clip: float = 1.0  # global gradient-norm clip; 0 turns clipping off
    eval_every: int = 140  # steps between evaluations; 0 = only at the end
    eval_batches: int = 16  # validation batches per evaluation
    log_every: int = 10  # steps between metrics rows (and progress lines in a log file)
    save_every: int = 280  # steps between checkpoints; 0 = only at the end (and at best evals)
    keep_last: int = 2  # step directories kept besides the best one
    async_save: bool = False  # write the training state in the background (trainer/train_state.py)
    compile: bool = False  # torch.compile each decoder block
    tf32: bool = True  # on CUDA, float32 matmuls in TF32 (set_float32_matmul_precision("high"))
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    peak_flops: float | None = None  # FLOP/s of one device (MFU); None: measured with a matmul
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    num_threads: int | None = None  # CPU threads for torch; None: torch's default
    fsdp: bool = False  # under torchrun: shard parameters with FSDP2 instead of replicating (DDP)
    # torchrun with one process forms a process group of one anyway (NCCL on a GPU), so that one
    # GPU runs the multi-process path: FSDP2, sharded Muon, DCP shards (trainer/distributed.py)
    force_process_group: bool = False
    dist_timeout: float = DEFAULT_TIMEOUT_S  # seconds a collective may wait before it fails
    # Per decoder block: none, full (recompute the block) or selective (save matmul and attention
    # outputs, recompute the rest); qwen3/checkpointing.py says what each keeps.
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    # A finite loss spike: z-score of a step's loss against the last spike_window accepted steps
    # (trainer/spikes.py); spike_action=skip drops its update like a non-finite step's.
    spike_detection: bool = True  # flag finite loss spikes (a line each, loss_spike in metrics)
    spike_zscore: float = 6.0  # standard deviations above the window's mean that make a spike
    spike_window: int = 100  # accepted steps the spike z-score is measured against
    spike_action: Literal["log", "skip"] = "log"  # log | skip (drop the spike's update)
    # Downstream tasks scored in the loop on the training model (trainer/downstream_loop.py):
    # lm-eval names, local task YAML paths, or a suite (core, core_local: docs/evaluation.md).
    eval_tasks: list[str] | str = field(default_factory=list)  # [] = none (lm-eval not imported)
    eval_tasks_every: int = 0  # steps between downstream scores; 0 = at each evaluation
    eval_tasks_limit: int | float | None = (
        None  # documents per task (a fraction below 1); null: all
    )
    eval_tasks_fewshot: int | None = None  # few-shot examples per prompt; null: each task's own
    best_metric: str = "val_loss"  # the logged key `best` follows, e.g. downstream/core
    best_mode: Literal["auto", "min", "max"] = "auto"  # auto: max for accuracies and downstream/*

    @property
    def best_higher(self) -> bool:
        """Whether a higher ``best_metric`` is better (``best_mode``, or what ``auto`` infers)."""
        if self.best_mode != "auto":
            return self.best_mode == "max"
        name = self.best_metric
        return name.startswith("downstream/") or name.split("/")[0] in ("val_acc",)

    def _check_downstream(self) -> None:
        if isinstance(self.eval_tasks, str):  # trainer.eval_tasks=core
            self.eval_tasks = [self.eval_tasks] if self.eval_tasks else []
        if not all(isinstance(t, str) and t.strip() for t in self.eval_tasks):
            _fail(
                "trainer.eval_tasks",
                self.eval_tasks,
                "must be task names or task YAML paths",
                "set e.g. trainer.eval_tasks=[core_local] or [hellaswag,path/to/task.yaml]",
            )
        for spec in self.eval_tasks:  # a missing task file fails before any data is read
            if is_path(spec) and not Path(spec).expanduser().is_file():
                _fail(
                    "trainer.eval_tasks",
                    spec,
                    "names no existing task file",
                    "give a task YAML's path (relative to the working directory) or a task name",
                )
        _check_int("trainer.eval_tasks_every", self.eval_tasks_every, 0, "280 (0 = each eval)")
        if self.eval_tasks_limit is not None and not (
            (isinstance(self.eval_tasks_limit, int) and self.eval_tasks_limit >= 1)
            or (isinstance(self.eval_tasks_limit, float) and 0 < self.eval_tasks_limit < 1)
        ):
            _fail(
                "trainer.eval_tasks_limit",
                self.eval_tasks_limit,
                "must be a count >= 1 or a fraction in (0, 1)",
                "set e.g. trainer.eval_tasks_limit=100, or null for all",
            )
        if self.eval_tasks_fewshot is not None:
            _check_int("trainer.eval_tasks_fewshot", self.eval_tasks_fewshot, 0, "5")
        name = self.best_metric
        if not isinstance(name, str) or not name.startswith(("val_", "downstream/")):
            _fail(
                "trainer.best_metric",
                name,
                "is not a key evaluations log",
                "set e.g. trainer.best_metric=val_loss (or val_bpb, downstream/core)",
            )
        if name.startswith("downstream/") and not self.eval_tasks:
            _fail(
                "trainer.best_metric",
                name,
                "is a downstream score, but trainer.eval_tasks is empty",
                "set e.g. trainer.eval_tasks=[core_local]",
            )

    def __post_init__(self) -> None:
        _check_int("trainer.max_steps", self.max_steps, 1, "600")
        self._check_downstream()
        if self.max_tokens is not None:
            _check_int("trainer.max_tokens", self.max_tokens, 1, "100_000_000")
        if self.tokens_per_param is not None and not (
            isinstance(self.tokens_per_param, int | float)
            and math.isfinite(self.tokens_per_param)
            and self.tokens_per_param > 0
        ):
            _fail(
                "trainer.tokens_per_param",
                self.tokens_per_param,
                "must be a positive number",
                "set e.g. trainer.tokens_per_param=20 (Chinchilla)",
            )
        _check_int("trainer.batch_size", self.batch_size, 1, "16")
        _check_int("trainer.grad_accum", self.grad_accum, 1, "1")
        _check_int("trainer.seq_len", self.seq_len, 2, "256")
        _check_int("trainer.eval_every", self.eval_every, 0, "200 (0 = only at the end)")
        _check_int("trainer.eval_batches", self.eval_batches, 1, "16")
        _check_int("trainer.log_every", self.log_every, 1, "10")
        _check_int("trainer.save_every", self.save_every, 0, "200 (0 = only at the end)")
        _check_int("trainer.keep_last", self.keep_last, 1, "2")
        _check_int("trainer.max_bad_steps", self.max_bad_steps, 1, "5")
        _check_int("trainer.spike_window", self.spike_window, 2, "100")
        if not (
            isinstance(self.spike_zscore, int | float)
            and math.isfinite(self.spike_zscore)
            and self.spike_zscore > 0
        ):
            _fail(
                "trainer.spike_zscore",
                self.spike_zscore,
                "must be a positive number of standard deviations",
                "set e.g. trainer.spike_zscore=6",
            )
        if self.num_threads is not None:
            _check_int("trainer.num_threads", self.num_threads, 1, "2")
        for key in ("fsdp", "async_save", "spike_detection", "force_process_group"):
            if not isinstance(getattr(self, key), bool):
                _fail(
                    f"trainer.{key}",
                    getattr(self, key),
                    "must be true or false",
                    f"set trainer.{key}=true",
                )
        if not (
            isinstance(self.dist_timeout, int | float)
            and math.isfinite(self.dist_timeout)
            and self.dist_timeout > 0
        ):
            _fail(
                "trainer.dist_timeout",
                self.dist_timeout,
                "must be a positive number of seconds",
                "set e.g. trainer.dist_timeout=1800",
            )
        if self.fsdp and self.precision == "fp16":  # GradScaler would see only local shards
            _fail(
                "trainer.precision",
                "fp16",
                "does not work with trainer.fsdp=true",
                "use trainer.precision=bf16 (or fp32) for sharded training",
            )
        if self.precision not in PRECISIONS:
            _fail(
                "trainer.precision",
                self.precision,
                "is not a known precision",
                f"choose one of: {', '.join(PRECISIONS)}",
            )
        if not isinstance(self.clip, int | float) or not math.isfinite(self.clip) or self.clip < 0:
            _fail(
                "trainer.clip",
                self.clip,
                "must be a finite number >= 0",
                "set e.g. trainer.clip=1.0",
            )
        if not isinstance(self.device, str) or not _DEVICE_RE.match(self.device):
            _fail(
                "trainer.device",
                self.device,
                "is not a device",
                "choose one of: auto, cpu, cuda, cuda:N, mps",
            )
        if self.peak_flops is not None and not (
            isinstance(self.peak_flops, int | float) and self.peak_flops > 0
        ):
            _fail(
                "trainer.peak_flops",
                self.peak_flops,
                "must be a positive FLOP/s figure or null",
                "set e.g. trainer.peak_flops=2.5e11, or null to measure it",
            )


@dataclass(frozen=True)
class SampleConfig(Sampling):
    """Text generated at the end of training (and the defaults of ``train.py demo``): the
    prompts, and the sampling settings of :class:`qwen3.Sampling`, which checks them. Its stop
    ids and seed are not keys: generation stops at <|endoftext|> and uses the run's seed."""

    key_prefix: ClassVar[str] = "sample."
    not_keys: ClassVar[tuple[str, ...]] = ("stop_ids", "seed")

    max_new_tokens: int = 120  # tokens generated per prompt after training; 0 = no samples
    temperature: float = 0.8
    top_k: int | None = 50
    # the prompts of the samples after training (and of demo)
    prompts: list[str] = field(default_factory=lambda: ["ROMEO:", "JULIET:\n", "First Citizen:\n"])


@dataclass
class WandbConfig:
    """Weights & Biases logging. ``auto``: online when logged in, offline otherwise."""

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "qwen3-pretrain"  # the wandb project
    entity: str | None = None  # the wandb team or user; null: your default
    tags: list[str] = field(default_factory=list)  # wandb tags of the run

    def __post_init__(self) -> None:
        if self.mode not in WANDB_MODES:
            _fail(
                "wandb.mode",
                self.mode,
                "is not a wandb mode",
                f"choose one of: {', '.join(WANDB_MODES)}",
            )
        if not isinstance(self.project, str) or not self.project:
            _fail(
                "wandb.project", self.project, "must be a non-empty name", "set wandb.project=NAME"
            )


@dataclass(frozen=True)
class GenerationCliConfig(Sampling):
    """Options of ``demo`` and ``interactive``, given as ``key=value`` words: the sampling
    settings of :class:`qwen3.Sampling` (``max_new_tokens``, ``temperature``, ``top_k``,
    ``top_p``, ``seed``), which checks them, and the ones below. Stop ids are not an option:
    generation stops at <|endoftext|> unless ``stop_at_eos=false``."""

    not_keys: ClassVar[tuple[str, ...]] = ("stop_ids", "extra")

    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 50
    ckpt: str | None = None  # a checkpoint or any Hugging Face Qwen3 dir; None: latest run's best
    out_dir: str = "checkpoints"
    prompts: list[str] | None = (
        None  # demo only, e.g. prompts='["ROMEO:", "JULIET:"]'; None: the run's
    )
    device: str = "auto"
    stop_at_eos: bool = True
    quantize: str | None = None  # int8: int8 weights on the CPU (qwen3.quantize); None: as saved
    chat: bool | None = (
        None  # interactive: turns through the chat template; None: for an SFT checkpoint
    )
    system: str | None = None  # interactive chat: the system prompt, e.g. system="You are Juliet."
    extra: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not _DEVICE_RE.match(self.device):
            raise ValueError(
                f"device={self.device!r} is not a device; choose one of: auto, cpu, cuda, "
                "cuda:N, mps"
            )
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(unknown_method(self.quantize))
        super().__post_init__()


@dataclass(frozen=True)
class EvalCliConfig:
    """Options of ``eval`` (lm-evaluation-harness on a checkpoint), given as ``key=value``
    words. ``tasks``: lm-eval task names (their data comes from the Hugging Face hub) or paths
    to local task YAML files; ``limit``: documents per task (a fraction when below 1);
    ``num_fewshot``: None keeps each task's own; ``wandb``: log the scores to the checkpoint's
    run in wandb when it has one."""

    tasks: list[str] = field(default_factory=list)
    ckpt: str | None = None  # a checkpoint or any Hugging Face Qwen3 dir; None: latest run's best
    out_dir: str = "checkpoints"
    limit: int | float | None = None
    num_fewshot: int | None = None
    batch_size: int | Literal["auto"] = 8
    device: str = "auto"
    wandb: bool = True

    def __post_init__(self) -> None:
        if not self.tasks or not all(isinstance(t, str) and t for t in self.tasks):
            _fail(
                "tasks",
                self.tasks,
                "must name at least one task",
                "set e.g. tasks=[hellaswag,arc_easy] or tasks=[path/to/task.yaml]",
            )
        if self.limit is not None and not (
            (isinstance(self.limit, int) and self.limit >= 1)
            or (isinstance(self.limit, float) and 0 < self.limit < 1)
        ):
            _fail(
                "limit",
                self.limit,
                "must be a count >= 1 or a fraction in (0, 1)",
                "set e.g. limit=100",
            )
        if self.num_fewshot is not None:
            _check_int("num_fewshot", self.num_fewshot, 0, "5")
        if self.batch_size != "auto":
            _check_int("batch_size", self.batch_size, 1, "8")
        if not isinstance(self.device, str) or not _DEVICE_RE.match(self.device):
            raise ValueError(
                f"device={self.device!r} is not a device; choose one of: auto, cpu, cuda, "
                "cuda:N, mps"
            )


TOP_LEVEL_KEYS = ("run_name", "out_dir", "seed", "resume", "init_from")
SECTIONS = ("model", "data", "optim", "trainer", "sample", "wandb", "sft")


@dataclass
class RunConfig:
    """Every section of a run, typed and validated. ``notes``: one line for each setting that was
    adapted to the run (e.g. a warmup longer than the run, shortened), for the CLI to print."""

    run_name: str
    out_dir: str
    seed: int
    resume: str | None
    model: Qwen3Config
    data: DataConfig
    optim: OptimConfig
    trainer: TrainConfig
    sample: SampleConfig
    wandb: WandbConfig
    notes: list[str] = field(default_factory=list)
    # A Hugging Face Qwen3 directory whose weights and tokenizer training starts from.
    init_from: str | None = None
    budget: str = ""  # how trainer.max_steps was resolved (a token budget, or set), for the summary
    # train.py sft: the conversations to fine-tune on (trainer/sft.py); None when pretraining.
    sft: SFTDataConfig | None = None


# The settable Qwen3Config fields (``extra`` only carries a config.json's unknown keys through).
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(Qwen3Config) if f.name != "extra")
MODEL_FIELDS_NODE = "model_fields"


def register_config_nodes() -> None:
    """Store, for ``conf/config.yaml``'s defaults list, a ``model`` section holding every
    Qwen3Config field as null, composed before the ``model`` group: Hydra overrides only keys
    that exist (``model.num_hidden_layers=2``), so every field must be there, while
    ``conf/model/*.yaml`` names a preset and sets only what differs from it. Call before
    Hydra composes the config."""
    node = dict.fromkeys(MODEL_FIELDS)
    ConfigStore.instance().store(name=MODEL_FIELDS_NODE, node=node, package="model")


def build_model_config(section: dict[str, Any]) -> Qwen3Config:
    """``preset`` with every other key of the ``model`` section applied over it. A null key
    keeps the preset's value: that is how the composed config leaves a field unset. The fields
    whose own value may be null (the special-token ids) are null in every preset, the model
    taking them from the tokenizer, so for them null means the same either way."""
    values = dict(section)
    preset = values.pop("preset", "tiny")
    if preset not in PRESETS:
        raise ConfigError(
            f"model.preset={preset!r} is unknown; choose one of: {', '.join(PRESETS)}."
        )
    base = Qwen3Config.from_preset(preset)
    merged = {name: getattr(base, name) for name in MODEL_FIELDS}
    merged.update((k, v) for k, v in values.items() if v is not None)
    return build_dataclass(Qwen3Config, merged, "model", skip=())


def _weight_shapes(cfg: Qwen3Config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # no memory, whatever the size
        model = Qwen3(cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    return {**shapes, "tied": (int(cfg.tie_word_embeddings),)}


def pretrained_model_config(path: str, section: dict[str, Any]) -> Qwen3Config:
    """The model config of ``init_from=PATH``: its ``config.json``, with the ``model`` section's
    set fields applied over it when they leave the weights' shapes alone (``rope_theta``,
    ``max_position_embeddings``, ...); a different shape is a :class:`ConfigError`. The preset
    is not used: the directory defines the model."""
    where = Path(path).expanduser()
    if not where.is_dir():
        raise ConfigError(
            f"init_from={path!r} is not a directory; point it at a Hugging Face Qwen3 model "
            "directory (config.json, safetensors, tokenizer.json)"
        )
    try:
        base = Qwen3Config.from_json_file(where / "config.json")
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"init_from={path!r}: {e}") from None
    unknown = sorted(set(section) - set(MODEL_FIELDS) - {"preset"})
    if unknown:
        raise ConfigError(unknown_key_message(f"model.{unknown[0]}", MODEL_FIELDS))
    fields = {name: getattr(base, name) for name in MODEL_FIELDS}
    overrides = {
        k: v for k, v in section.items() if k != "preset" and v is not None and v != fields[k]
    }
    shapes = _weight_shapes(base)
    for name, value in overrides.items():
        one = build_dataclass(Qwen3Config, {**fields, name: value}, "model", skip=())
        if _weight_shapes(one) != shapes:
            raise ConfigError(
                f"model.{name}={value!r} conflicts with init_from={path!r}, whose config.json "
                f"says {fields[name]!r}: the weights fix the model's shape; drop the override"
            )
    built = build_dataclass(Qwen3Config, {**fields, **overrides}, "model", skip=())
    return dataclasses.replace(built, extra=base.extra)


def pretrained_data_config(path: str, data: DataConfig) -> DataConfig:
    """The data section of an ``init_from`` run: it tokenizes with the directory's tokenizer."""
    if data.tokenizer and Path(data.tokenizer).expanduser() != Path(path).expanduser():
        raise ConfigError(
            f"data.tokenizer={data.tokenizer!r} conflicts with init_from={path!r}: the "
            "pretrained model's own tokenizer is used; drop data.tokenizer"
        )
    if data.vocab_size is not None:
        raise ConfigError(
            f"data.vocab_size={data.vocab_size} conflicts with init_from={path!r}: its tokenizer "
            "is used as is, nothing is trained; drop data.vocab_size"
        )
    if not (Path(path).expanduser() / "tokenizer.json").is_file():
        raise ConfigError(
            f"init_from={path!r} has no tokenizer.json; a model directory for continued "
            "pretraining needs its tokenizer (save it with the model)"
        )
    return dataclasses.replace(data, tokenizer=path)


def run_record(data: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    """``data`` (the composed config) as the run uses it, for the ``config.yaml`` saved with
    each checkpoint and for wandb: every model field with its value (the preset's where the
    composed config says null), and settings adapted to the run (a shortened warmup)."""
    record = dict(data)
    model = cfg.model
    preset = (data.get("model") or {}).get("preset", "tiny")
    record["model"] = {"preset": preset, **{name: getattr(model, name) for name in MODEL_FIELDS}}
    if isinstance(data.get("optim"), dict):
        record["optim"] = {**data["optim"], "warmup_steps": cfg.optim.warmup_steps}
    if isinstance(data.get("trainer"), dict):  # what a token budget resolved to
        record["trainer"] = {**data["trainer"], "max_steps": cfg.trainer.max_steps}
    return record


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python values, without Hydra's own node."""
    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(
            f"{e.full_key} must be set (it has no default); add {e.full_key}=VALUE."
        ) from None
    except OmegaConfBaseException as e:
        raise ConfigError(
            f"{getattr(e, 'full_key', '') or 'config'}: {e.msg if hasattr(e, 'msg') else e}"
        ) from None
    assert isinstance(data, dict)
    data.pop("hydra", None)
    return {str(k): v for k, v in data.items()}


def build_run_config(data: dict[str, Any]) -> RunConfig:
    """Check and convert every section; the first problem raises one :class:`ConfigError`."""
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS) - set(SECTIONS))
    if unknown:
        raise ConfigError(unknown_key_message(unknown[0], TOP_LEVEL_KEYS + SECTIONS))
    seed = data.get("seed", 1337)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r} must be an integer, e.g. seed=1337.")
    resume = data.get("resume")
    if resume is not None and not isinstance(resume, str):
        raise ConfigError(f"resume={resume!r} must be null, latest, auto, or a checkpoint path.")
    init_from = data.get("init_from")
    if init_from is not None and (not isinstance(init_from, str) or not init_from):
        raise ConfigError(f"init_from={init_from!r} must be null or a model directory path.")
    data_cfg = build_dataclass(DataConfig, data.get("data") or {}, "data")
    sft = None
    if data.get("sft") is not None:
        sft = build_dataclass(SFTDataConfig, data["sft"], "sft")
        if not init_from:
            init_from = default_init_from(str(data.get("out_dir") or "checkpoints"))
    if init_from:
        model = pretrained_model_config(init_from, data.get("model") or {})
        data_cfg = pretrained_data_config(init_from, data_cfg)
    else:
        model = build_model_config(data.get("model") or {})
    optim = build_dataclass(OptimConfig, data.get("optim") or {}, "optim")
    section = dict(data.get("trainer") or {})
    steps_given = section.get("max_steps") is not None
    if not steps_given:
        section.pop("max_steps", None)  # null: the default, or what a token budget sets
    trainer = build_dataclass(TrainConfig, section, "trainer")
    length_given = steps_given or trainer.max_tokens is not None or trainer.tokens_per_param
    trainer.time_budget = resolve_time_budget(trainer.time_budget, bool(length_given))
    trainer, budget = resolve_max_steps(
        trainer, steps_given, model, data_cfg, init_from, dist_info().world_size
    )
    if trainer.time_budget is not None:
        budget += f", cut to fit trainer.time_budget={trainer.time_budget:g} s of training"
    optim, note = fit_warmup(optim, trainer.max_steps)
    return RunConfig(
        run_name=str(data.get("run_name") or ""),
        out_dir=str(data.get("out_dir") or "checkpoints"),
        seed=seed,
        resume=resume,
        model=model,
        data=data_cfg,
        optim=optim,
        trainer=trainer,
        sample=build_dataclass(
            SampleConfig, data.get("sample") or {}, "sample", skip=SampleConfig.not_keys
        ),
        wandb=build_dataclass(WandbConfig, data.get("wandb") or {}, "wandb"),
        notes=[note] if note else [],
        init_from=init_from,
        budget=budget,
        sft=sft,
    )
