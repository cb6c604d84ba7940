"""The run config as a user reads it: ``train.py config`` (every key's resolved value, where it
came from and what it means), and the model section of ``--cfg job`` and ``--help`` with the
preset's real values instead of the nulls the composed config holds for them.

A key's description is its field doc in the dataclass that owns its section: the comment on
the field's line, else the comment lines right above it, else the ``name: text`` entry of the
class docstring; a key documented nowhere there falls back to its comment in ``conf/``.
Python keeps no comments at run time, so they are read from the source with :mod:`tokenize`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import re
import textwrap
import tokenize
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from data import DataConfig
from optim import OptimConfig
from qwen3 import PRESETS, Qwen3Config
from trainer.config import (
    MODEL_FIELDS,
    SampleConfig,
    TrainConfig,
    WandbConfig,
    build_run_config,
    run_record,
    to_container,
)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SECTION_CLASSES: dict[str, type[Any]] = {
    "model": Qwen3Config,
    "data": DataConfig,
    "optim": OptimConfig,
    "trainer": TrainConfig,
    "sample": SampleConfig,
    "wandb": WandbConfig,
}
GROUPS = ("model", "data", "optim")  # the Hydra config groups (conf/<group>/<option>.yaml)
_DOC_ENTRY = re.compile(r"^\s*([a-z_][a-z0-9_]*(?:\s*,\s*[a-z_][a-z0-9_]*)*):\s+(\S.*)$")


def _one_line(text: str) -> str:
    """The first sentence of ``text`` on one line."""
    text = " ".join(text.split())
    match = re.search(r"(?<!e\.g)(?<!i\.e)(?<=[a-z0-9)`'\"])\.(\s|$)", text)
    return text[: match.start()] if match else text.rstrip(".")


def _docstring_entries(doc: str) -> dict[str, str]:
    """``name: text`` (or ``a, b: text``) entries of a class docstring, continuation lines
    joined, as :class:`data.DataConfig` documents its fields."""
    entries: dict[str, str] = {}
    names: list[str] = []
    for line in textwrap.dedent(doc).splitlines():
        match = _DOC_ENTRY.match(line)
        if match and not line.startswith(" "):
            names = [n.strip() for n in match.group(1).split(",")]
            for name in names:
                entries[name] = match.group(2)
        elif names and line.startswith(" ") and line.strip():
            for name in names:
                entries[name] += " " + line.strip()
        else:
            names = []
    return {name: _one_line(text) for name, text in entries.items()}


def _class_field_docs(cls: type[Any]) -> dict[str, str]:
    """Field docs of one class's own body (see the module docstring for where they are)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, tuple[str, bool]] = {}  # line -> (comment, whether the line holds code)
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            comments[row] = (
                tok.string.lstrip("#").strip(),
                bool(lines[row - 1][: tok.start[1]].strip()),
            )
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    entries = _docstring_entries(ast.get_docstring(body) or "")
    docs: dict[str, str] = {}
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        end = node.end_lineno or node.lineno
        trailing = [
            comments[r][0] for r in range(node.lineno, end + 1) if comments.get(r, ("", False))[1]
        ]
        above: list[str] = []
        row = node.lineno - 1
        while row in comments and not comments[row][1]:
            above.insert(0, comments[row][0])
            row -= 1
        text = " ".join(trailing) or " ".join(above) or entries.get(name, "")
        if text:
            docs[name] = _one_line(text)
    return docs


def _yaml_comments(path: Path) -> dict[str, str]:
    """Dotted key -> the comment on its line (or the comment lines right above it) in a YAML
    file of ``conf/`` (block-style mappings, as ours are written)."""
    docs: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    above: list[str] = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"^(\s*)([A-Za-z_][\w-]*):(.*)$", line)
        if not match:
            above = []
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([*(k for _, k in stack), key])
        comment = rest.split(" #", 1)[1].strip() if " #" in rest else ""
        if comment or above:
            docs[dotted] = _one_line(comment or " ".join(above))
        above = []
        if not rest.split(" #", 1)[0].strip():  # a mapping follows
            stack.append((indent, key))
    return docs


@functools.cache
def key_docs() -> dict[str, str]:
    """Dotted key (``trainer.max_steps``) -> one-line description, for every documented key."""
    docs = {f"{k}": v for k, v in _yaml_comments(CONF_DIR / "config.yaml").items()}
    for section, cls in SECTION_CLASSES.items():
        own: dict[str, str] = {}
        for klass in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
            own.update(_class_field_docs(klass))  # a subclass's doc of a field wins
        docs.update({f"{section}.{name}": text for name, text in own.items()})
    docs.setdefault(
        "model.preset",
        "which shape (qwen3.config.PRESETS); every other model key applies over it",
    )
    return docs


# ---- where each value came from -------------------------------------------------------------
def _flatten(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a mapping; lists are values."""
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted, value


def _command_line(overrides: list[str]) -> tuple[set[str], dict[str, str]]:
    """The keys set on the command line, and the groups chosen there (``optim=adamw``)."""
    keys: set[str] = set()
    groups: dict[str, str] = {}
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.key_or_group
        if key in GROUPS and isinstance(o.value(), str):
            groups[key] = str(o.value())
        else:
            keys.add(key)
    return keys, groups


def _group_keys(group: str, option: str) -> set[str]:
    path = CONF_DIR / group / f"{option}.yaml"
    if not path.is_file():
        return set()
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    assert isinstance(data, dict)
    return {f"{group}.{k}" for k, _ in _flatten({k: v for k, v in data.items() if k != "defaults"})}


def origins(
    overrides: list[str], composed: dict[str, Any], record: dict[str, Any]
) -> dict[str, str]:
    """Dotted key -> where its value came from: ``override`` (the command line), ``conf/<group>/
    <option>.yaml`` (a config group's file), ``preset <name>`` (a model field the preset sets),
    ``init_from`` (its config.json), ``default`` (conf/config.yaml or the dataclass), or
    ``resolved`` (a null the run fills in: a token budget's steps, a shortened warmup)."""
    keys, chosen = _command_line(overrides)
    model = composed.get("model") or {}
    preset = str(model.get("preset") or "tiny")
    group_files: dict[str, str] = {}
    for group in GROUPS:
        option = chosen.get(group) or _default_option(group)
        for key in _group_keys(group, option):
            group_files[key] = f"conf/{group}/{option}.yaml"
    flat = dict(_flatten(composed))
    where: dict[str, str] = {}
    for key, value in _flatten(record):
        if key in keys or any(key.startswith(k + ".") for k in keys):
            where[key] = "override"
        elif key.startswith("model.") and flat.get(key) is None and key != "model.preset":
            name = key.split(".", 1)[1]
            if record.get("init_from"):
                where[key] = "init_from"
            elif name in PRESETS.get(preset, {}):
                where[key] = f"preset {preset}"
            else:
                where[key] = "default"
        elif key in group_files:
            where[key] = group_files[key]
        elif key in flat and flat[key] != value:
            where[key] = "resolved"
        else:
            where[key] = "default"
    return where


@functools.cache
def _default_option(group: str) -> str:
    """The option ``conf/config.yaml``'s defaults list picks for ``group``."""
    top = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"), resolve=False)
    assert isinstance(top, dict)
    for entry in top.get("defaults", []):
        if isinstance(entry, dict) and group in entry:
            return str(entry[group])
    return ""


# ---- rendering ------------------------------------------------------------------------------
def _value(value: Any) -> str:
    """A value as one line of YAML flow style (``[0.9, 0.95]``, ``null``, ``'JULIET:\\n'``)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, str) and (
        not value.isprintable() or ": " in value or value != value.strip()
    ):
        return json.dumps(value)
    text = OmegaConf.to_yaml({"v": value}).strip().removeprefix("v:").strip()
    return text


def with_model_values(container: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """``container`` (a composed config) with its model section holding the values the run uses
    (the preset's, or ``init_from``'s config.json, where the composed config says null), in the
    composed order."""
    model = dict(container.get("model") or {})
    effective = record.get("model") or {}
    for name in MODEL_FIELDS:
        if model.get(name) is None and name in effective:
            model[name] = effective[name]
    return {**container, "model": model}


def resolve(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The composed config ``cfg`` as plain values (interpolations resolved), and the record of
    the run it makes (``run_record``); raises :class:`~trainer.errors.ConfigError` as a run
    would."""
    composed = to_container(cfg)
    return composed, run_record(composed, build_run_config(composed))


def _section_rank(key: str) -> int:
    """Top-level keys first, then the sections in the order a run builds them."""
    section = key.partition(".")[0] if "." in key else ""
    return list(SECTION_CLASSES).index(section) + 1 if section in SECTION_CLASSES else 0


def render_config(overrides: list[str], cfg: DictConfig) -> str:
    """``train.py config [overrides]``: each key of ``cfg`` (composed from ``overrides``) with
    its resolved value, where it came from, and its description, grouped by section."""
    composed, record = resolve(cfg)
    where = origins(overrides, composed, record)
    docs = key_docs()
    flat = sorted(_flatten(record), key=lambda kv: _section_rank(kv[0]))
    rows = [(key, _value(value), where[key], docs.get(key, "")) for key, value in flat]
    width_key = max(len(k.rpartition(".")[2]) + (2 if "." in k else 0) for k, *_ in rows)
    width_value = min(max(len(v) for _, v, *_ in rows), 32)
    width_from = max(len(f) for _, _, f, _ in rows)
    lines = [
        f"# python train.py {' '.join(overrides)}".rstrip(),
        "# key: value  [from]  description",
    ]
    section = ""
    for key, value, origin, doc in rows:
        parent, _, name = key.rpartition(".")
        if parent != section:
            section = parent
            if parent:
                lines.append(f"{parent}:")
        label = f"  {name}" if parent else name
        lines.append(
            f"{label + ':':<{width_key + 1}} {value:<{width_value}}  {'[' + origin + ']':<{width_from + 2}}  {doc}".rstrip()
        )
    return "\n".join(lines)


def render_job(cfg: DictConfig, resolved: bool) -> str:
    """What ``--cfg job`` prints for the composed ``cfg``: its YAML (interpolations resolved
    with ``--resolve``), the model section with its real values."""
    composed, record = resolve(cfg)
    shown = composed if resolved else OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(shown, dict)
    return OmegaConf.to_yaml(with_model_values({str(k): v for k, v in shown.items()}, record))
