"""The ``train.py`` command line: a Hydra training run, ``prepare`` and ``config`` (Hydra
overrides too), or the ``demo``/``interactive``/``eval`` subcommands with their ``key=value``
options; :func:`check_command` validates any of them without running it."""

from __future__ import annotations

import itertools
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.config import (
    MODEL_FIELDS,
    EvalCliConfig,
    GenerationCliConfig,
    RunConfig,
    TrainConfig,
    build_dataclass,
    build_run_config,
    register_config_nodes,
    run_record,
    to_container,
    unknown_key_message,
)
from trainer.distributed import (
    DistInfo,
    barrier,
    dist_info,
    from_main,
    init_process_group,
    shutdown,
    under_torchrun,
)
from trainer.errors import CheckpointError, ConfigError, LaunchError
from trainer.generation import demo, interactive
from trainer.run_layout import default_run_name, timestamp_name

SUBCOMMANDS = ("demo", "interactive", "eval")  # key=value options; `prepare`, `config`: Hydra's
USAGE = """\
python train.py [group=option ...] [key=value ...]   train (Hydra overrides; -m for sweeps)
python train.py resume=latest                        continue the most recent run
python train.py prepare [overrides]                  build the tokenizer and token cache, then stop
python train.py sft [overrides]                      chat fine-tuning of the newest run's best (conf/sft.yaml)
python train.py config [overrides]                   the resolved config: values, origins, meanings
python train.py plan [overrides] devices=N device_memory=80GB [format=json]   will it fit? (memory, time)
python train.py demo [ckpt=DIR] [key=value ...]      samples from the best checkpoint of the newest run
python train.py interactive [ckpt=DIR]               a prompt loop
python train.py eval tasks=[hellaswag] [ckpt=DIR] [limit=N] [...]   lm-evaluation-harness tasks
python train.py [overrides] --cfg job [--resolve]    the composed config as YAML
"""
# Hydra's own flags that take a value (``--cfg job``); check_command skips them.
_HYDRA_VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
QUANTIZE_IN_TRAINING = (
    "quantize is for inference, not training (int8 weights cannot be trained); train in full "
    "precision, then pass quantize=int8 to demo or interactive, or --quantize int8 to serve.py"
)


def register_resolvers(stamp: str | None = None) -> None:
    """``${run_name_default:out_dir,resume}`` (cached: one process, one timestamp; ``stamp``:
    the timestamp to use, so that all processes of a torchrun job agree on it)."""
    OmegaConf.register_new_resolver(
        "run_name_default",
        lambda out_dir, resume: default_run_name(out_dir, resume, stamp),
        use_cache=True,
        replace=True,
    )


def _config_keys() -> tuple[set[str], set[str]]:
    """Every key the shipped config defines, dotted (``trainer.max_steps``, ``model.preset``),
    and the subset that holds a value rather than a section. Read from the YAML files and the
    model fields that :func:`trainer.config.register_config_nodes` adds, so they are exactly
    what Hydra accepts; the options of a group share their keys."""
    keys: set[str] = set()
    leaves: set[str] = set()

    def walk(node: dict[Any, Any], prefix: str) -> None:
        for name, value in node.items():
            key = f"{prefix}{name}"
            keys.add(key)
            if isinstance(value, dict):
                walk(value, key + ".")
            else:
                leaves.add(key)

    top = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"), resolve=False)
    assert isinstance(top, dict)
    walk({k: v for k, v in top.items() if k not in ("defaults", "hydra")}, "")
    for group in (d for d in CONF_DIR.iterdir() if d.is_dir()):
        keys.add(group.name)
        for option in group.glob("*.yaml"):
            section = OmegaConf.to_container(OmegaConf.load(option), resolve=False)
            assert isinstance(section, dict)
            walk(section, group.name + ".")
    walk({"model": dict.fromkeys(MODEL_FIELDS)}, "")
    return keys, leaves


def unknown_override(args: list[str]) -> str | None:
    """A one-line message for the first ``key=value`` override whose key the config does not
    have, naming the closest valid keys. Hydra's own message for it suggests appending the key
    with ``+``, which only moves the failure to our typed config."""
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException:
        return None  # a syntax error: Hydra's message shows where
    keys, leaves = _config_keys()
    for o in parsed:
        key = o.key_or_group
        if key.rsplit(".", 1)[-1] == "quantize":  # also +quantize=int8: no training key has it
            return QUANTIZE_IN_TRAINING
        if o.is_add() or o.is_force_add() or o.is_delete() or o.package is not None:
            continue  # explicit additions and deletions, and package overrides, are Hydra's
        if key == "hydra" or key.startswith(("hydra.", "hydra/")) or key in keys:
            continue
        if any(key.startswith(leaf + ".") for leaf in leaves):
            continue  # inside a list or value (sample.prompts.0): Hydra checks it
        return unknown_key_message(key, keys)
    return None


def _rank_overrides(dist: DistInfo) -> list[str]:
    """Hydra overrides for processes other than rank 0: Hydra neither creates a directory for
    them (its output dir is the working directory) nor writes there (no .hydra/, no log file);
    they learn rank 0's run directory from rank 0."""
    if dist.is_main:
        return []
    return [
        "hydra.run.dir=.",
        "hydra.sweep.dir=.",
        "hydra.sweep.subdir=.",
        "hydra.output_subdir=null",
        "hydra/job_logging=none",
        "hydra/hydra_logging=none",
    ]


def _only_hydra_files(run_dir: Path) -> bool:
    return run_dir.is_dir() and all(
        p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()
    )


def _group_settings(overrides: list[str], config_name: str = "config") -> TrainConfig:
    """``trainer.dist_timeout`` and ``trainer.force_process_group`` as this command line
    composes them (conf/ and its overrides), checked. The process group is formed before
    Hydra's run, whose directory name the ranks agree on through it, so these two come from a
    composition of their own."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    keys = ("dist_timeout", "force_process_group")
    wanted = [o for o in overrides if not o.startswith(("-", "hydra.", "hydra/", "+hydra"))]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            composed = compose(config_name, overrides=wanted)
    except HydraException as e:
        raise ConfigError(str(e)) from None
    values = {k: OmegaConf.select(composed, f"trainer.{k}") for k in keys}
    return build_dataclass(TrainConfig, values, "trainer")


def train_from_hydra(cfg: DictConfig, start_time: float) -> int:
    """Convert and check the composed config, then train; a config mistake, or Ctrl-C before
    the first checkpoint, leaves no run dir."""
    hc = HydraConfig.get()
    run_dir = Path(from_main(hc.runtime.output_dir))  # under torchrun: rank 0's
    try:
        code = _train(cfg, hc, run_dir, start_time)
    except KeyboardInterrupt:
        if dist_info().is_main and _only_hydra_files(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    barrier()  # every rank has made (or used) the run dir before rank 0 may remove it
    if code == 2 and dist_info().is_main and _only_hydra_files(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)
    return code


def _train(cfg: DictConfig, hc: Any, run_dir: Path, start_time: float) -> int:
    from trainer.run import run_training  # data, wandb, datasets: only for a training run

    try:
        data = to_container(cfg)
        run_cfg = build_run_config(data)
    except ConfigError as e:
        if dist_info().is_main:  # every rank composed the same config: say it once
            print(f"config error: {e}", file=sys.stderr)
        return 2
    if dist_info().is_main:
        for note in run_cfg.notes:
            print(note)
    # The saved config says what the run does, also where a setting was adapted to it.
    data = run_record(data, run_cfg)
    yaml = OmegaConf.to_yaml(OmegaConf.create(data))
    return run_training(run_cfg, run_dir, yaml, data, list(hc.overrides.task), start_time)


def main(argv: list[str], start_time: float) -> int:
    """Dispatch on the first word: a subcommand, else Hydra's own command line (``sft``: the
    same with ``conf/sft.yaml``, chat fine-tuning)."""
    config_name = "config"
    if len(argv) > 1 and argv[1] == "sft":
        config_name, argv = "sft", [argv[0], *argv[2:]]
    if len(argv) > 1 and argv[1] in SUBCOMMANDS:
        return run_subcommand(argv[1], argv[2:])
    if len(argv) > 1 and argv[1] == "prepare":
        return prepare(argv[2:])
    if len(argv) > 1 and argv[1] == "config":
        return show_config(argv[2:])
    if len(argv) > 1 and argv[1] == "plan":
        from trainer.plan import plan_command  # the memory model: only for a plan

        return plan_command(argv[2:])
    if "--help" in argv[1:] or "-h" in argv[1:]:
        return show_help([a for a in argv[1:] if a not in ("--help", "-h")])
    shown = _cfg_job(argv[1:], config_name)
    if shown is not None:
        return shown
    try:
        dist = dist_info()
        unknown = unknown_override(argv[1:])
        if config_name == "config" and any(a.startswith(("sft.", "sft=")) for a in argv[1:]):
            unknown = (
                "the sft.* keys and the sft group are for chat fine-tuning: python train.py sft ..."
            )
        if unknown is not None:
            if dist.is_main:  # every process of a torchrun job checks the same command line
                print(f"config error: {unknown}", file=sys.stderr)
            return 2
        register_config_nodes()
        if under_torchrun():  # before Hydra: the ranks agree on the run directory's name
            group = _group_settings(argv[1:], config_name)
            init_process_group(dist, group.dist_timeout, group.force_process_group)
    except ConfigError as e:
        if dist.is_main:
            print(f"config error: {e}", file=sys.stderr)
        return 2
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    register_resolvers(from_main(timestamp_name()) if dist_info().is_distributed else None)
    codes: list[int] = []

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def _hydra_main(cfg: DictConfig) -> None:
        codes.append(train_from_hydra(cfg, start_time))

    sys.argv = [*argv, *_rank_overrides(dist)]
    try:
        _hydra_main()
    except KeyboardInterrupt:
        # Training itself turns Ctrl-C into a clean stop and save (trainer.stop.StopRequest); this is one
        # outside the loop (data preparation, evaluation, samples). Every file is written
        # atomically, so there is nothing to repair: say so instead of printing a traceback.
        shutdown(wait_for_others=False)
        if dist.is_main:
            print(
                "\ninterrupted: nothing is left half-written (the token cache and checkpoints are "
                "complete or absent). Run the same command again; resume=latest continues a run.",
                file=sys.stderr,
            )
        return 130
    except BaseException:
        shutdown(wait_for_others=False)
        raise
    shutdown()
    return max(codes, default=0)


# ---- composing and checking a command line without running it -----------------------------
def compose_config(overrides: list[str], config_name: str = "config") -> DictConfig:
    """The config Hydra composes for ``train.py OVERRIDES`` (``config_name="sft"``: for
    ``train.py sft OVERRIDES``); a mistyped key raises :class:`ConfigError` naming the closest
    ones, as a run would say."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    unknown = unknown_override(overrides)
    if unknown is not None:
        raise ConfigError(unknown)
    register_resolvers()
    register_config_nodes()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name, overrides=overrides)
    except HydraException as e:
        raise ConfigError(str(e)) from None


def _sweep_expanded(overrides: list[str]) -> list[list[str]]:
    """Each job of a ``-m`` sweep as plain overrides (``optim.lr=1e-3,3e-3`` -> two lists)."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as e:
        raise ConfigError(str(e)) from None
    choices = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [o.input_line or o.key_or_group]
        for o in parsed
    ]
    return [list(job) for job in itertools.product(*choices)]


def check_command(args: list[str]) -> None:
    """Validate the command line ``train.py ARGS`` as the real command would, without running
    it: Hydra composes the config and every section is typed and checked (a sweep's every job),
    or a subcommand's options are parsed. Raises :class:`ConfigError` with the message the
    command would print."""
    if args and args[0] in SUBCOMMANDS:
        if args[0] == "eval":
            parse_eval_options(args[1:])
        else:
            parse_options(args[0], args[1:])
        return
    if args and args[0] == "plan":  # its own options, then a training run's overrides
        from trainer.plan import split_plan_options

        try:
            args = split_plan_options(args[1:])[0]
        except ValueError as e:
            raise ConfigError(str(e)) from None
    config_name = "sft" if args and args[0] == "sft" else "config"
    words = args[1:] if args and args[0] in ("prepare", "config", "sft") else args
    overrides: list[str] = []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word.startswith("-"):  # Hydra's flags: -m, --cfg job, --resolve ...
            skip = word in _HYDRA_VALUE_FLAGS
        else:
            overrides.append(word)
    for job in _sweep_expanded(overrides):
        build_run_config(to_container(compose_config(job, config_name)))


def _hydra_flags(args: list[str]) -> tuple[list[str], dict[str, str | None]]:
    """``args`` split into overrides and the Hydra flags among them (``--cfg`` -> ``job``)."""
    overrides: list[str] = []
    flags: dict[str, str | None] = {}
    words = iter(args)
    for word in words:
        if word in _HYDRA_VALUE_FLAGS:
            flags[word] = next(words, None)
        elif word.startswith("-"):
            flags[word] = None
        else:
            overrides.append(word)
    return overrides, flags


def _cfg_job(args: list[str], config_name: str = "config") -> int | None:
    """``--cfg job`` (or ``all``) without ``--package`` or a sweep: print the composed config
    with the model section's real values (Hydra's own printout shows null for every key the
    preset sets); None for any other command line, which Hydra handles."""
    overrides, flags = _hydra_flags(args)
    kind = flags.get("--cfg", flags.get("-c"))
    hydra_only = {"--package", "-p", "-m", "--multirun", "--config-path", "-cp", "--config-name"}
    if kind not in ("job", "all") or hydra_only & set(flags):
        return None
    from trainer.config_view import render_job

    try:
        cfg = compose_config(overrides, config_name)
        text = render_job(cfg, resolved="--resolve" in flags)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if kind == "all":  # Hydra's own node, as Hydra prints it, after the job's
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            full = compose(config_name, overrides=overrides, return_hydra_config=True)
        text += OmegaConf.to_yaml({"hydra": OmegaConf.to_container(full.hydra, resolve=False)})
    print(text, end="")
    return 0


def show_config(overrides: list[str]) -> int:
    """``train.py config [overrides]``: the resolved config, where each value came from and
    what each key means."""
    from trainer.config_view import render_config

    try:
        print(render_config(overrides, compose_config(overrides)))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


def show_help(overrides: list[str]) -> int:
    """``train.py --help``: the commands, the config groups and every key (with overrides
    applied) with its value, origin and description."""
    groups = {
        d.name: ", ".join(sorted(p.stem for p in d.glob("*.yaml")))
        for d in sorted(CONF_DIR.iterdir())
        if d.is_dir()
    }
    print(USAGE)
    print("Config groups (group=option):")
    for name, options in groups.items():
        print(f"  {name}: {options}")
    print("\nEvery key below is an override (key=value); [from] says where its value comes from.")
    print("Hydra's flags: -m/--multirun, --cfg job|hydra|all, --resolve, --hydra-help.\n")
    return show_config(overrides)


# ---- prepare ------------------------------------------------------------------------------
def prepare(overrides: list[str]) -> int:
    """``train.py prepare [overrides]``: build the tokenizer and token cache exactly as a
    training run with the same overrides would, report them, and stop."""
    if dist_info().is_distributed:
        print(
            "error: train.py prepare runs in one process: run it without torchrun, then start "
            "the torchrun job with the same data and model overrides",
            file=sys.stderr,
        )
        return 2
    try:
        run_cfg = build_run_config(to_container(compose_config(overrides)))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return _prepare_and_report(run_cfg)


def _prepare_and_report(cfg: RunConfig) -> int:
    """Build what is missing; print the cache path, token and document counts, time and rate."""
    from data import DataError, prepare_data  # datasets: only for data work

    start = time.perf_counter()
    try:
        data = prepare_data(cfg.data, cfg.data.vocab_size or cfg.model.vocab_size)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    m = data.meta
    shards = len(m.get("train_shards", [])) or 1
    print(f"tokenizer: {data.tokenizer_dir} ({data.tokenizer.vocab_size} tokens)")
    print(f"token cache: {data.cache_path}")
    print(
        f"  train {m['train_tokens']:,} tokens in {m['train_docs']:,} documents ({shards} "
        f"shard{'s' * (shards > 1)}), val {m['val_tokens']:,} tokens in {m['val_docs']:,} "
        f"documents"
    )
    tokens = m["train_tokens"] + m["val_tokens"]
    build = float(m.get("build_seconds") or 0.0)
    rate = f", {tokens / build:,.0f} tokens/s while tokenizing" if build else ""
    print(f"  took {seconds:.1f} s; the cache took {build:.1f} s to build{rate}")
    return 0


# ---- demo, interactive and eval ----------------------------------------------------------
def _option_values(command: str, args: list[str]) -> dict[str, Any]:
    """``key=value`` words (YAML values, as Hydra overrides) into a mapping."""
    bad = [a for a in args if "=" not in a]
    if bad:
        raise ConfigError(
            f"{command}: {bad[0]!r} is not key=value (e.g. ckpt=checkpoints/RUN/best)"
        )
    try:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist(args))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{command}: cannot parse the options ({e})") from None
    assert isinstance(parsed, dict)  # a dotlist always makes a mapping
    return {str(k): v for k, v in parsed.items()}


def parse_options(command: str, args: list[str]) -> GenerationCliConfig:
    """The checked options of ``demo`` or ``interactive``."""
    values = _option_values(command, args)
    if isinstance(values.get("prompts"), str):  # prompts="ROMEO:" means one prompt
        values["prompts"] = [values["prompts"]]
    return build_dataclass(GenerationCliConfig, values, command, skip=GenerationCliConfig.not_keys)


def parse_eval_options(args: list[str]) -> EvalCliConfig:
    """The checked options of ``eval``."""
    values = _option_values("eval", args)
    if isinstance(values.get("tasks"), str):  # tasks=hellaswag means one task
        values["tasks"] = [values["tasks"]]
    return build_dataclass(EvalCliConfig, values, "eval")


def run_subcommand(command: str, args: list[str]) -> int:
    """Run ``demo``, ``interactive`` or ``eval`` with ``key=value`` options; returns the exit
    code."""
    try:
        if command == "eval":
            from trainer.downstream import evaluate  # lm-eval: only for eval

            evaluate(parse_eval_options(args))
        else:
            cfg = parse_options(command, args)
            (demo if command == "demo" else interactive)(cfg)
    except (ConfigError, CheckpointError) as e:  # a user's to fix; anything else is a bug
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
