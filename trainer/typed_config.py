"""Turn a plain mapping (a Hydra config section) into a config dataclass, checking every value.

Hand-written because OmegaConf's structured configs reject ``Literal`` and tuple-typed fields,
which the package config dataclasses use; errors here name the full key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A user-fixable configuration problem; the message names the key and the fix."""


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


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the annotation ``tp`` (ints widen to float, lists to tuples)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}={value!r} is not a valid choice; choose {_type_name(tp)}.")
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {_type_name(tp)}.")
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected {_type_name(tp)}.")
        args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [Any]
        if origin is tuple and len(args) > 1:
            if len(value) != len(args):
                raise ConfigError(f"{key}={value!r} must hold {len(args)} values.")
            return tuple(
                _coerce(f"{key}[{i}]", v, a)
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        items = [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected a mapping.")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected a section of keys.")
        return build_dataclass(tp, value, key)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
        Path: isinstance(value, str | Path),
    }.get(tp)
    if ok is None:
        return value
    if not ok:
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {_type_name(tp)}.")
    return float(value) if tp is float else Path(value) if tp is Path else value


def build_dataclass(
    cls: type[T], values: Mapping[str, Any], section: str, skip: tuple[str, ...] = ()
) -> T:
    """An instance of ``cls`` from ``values``; unknown keys, wrong types and invalid values raise
    one :class:`ConfigError` naming ``section.key``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in skip}
    unknown = sorted(set(values) - fields)
    if unknown:
        valid = [f"{section}.{name}" for name in fields]
        raise ConfigError(unknown_key_message(f"{section}.{unknown[0]}", valid))
    kwargs = {name: _coerce(f"{section}.{name}", v, hints[name]) for name, v in values.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise ConfigError(msg if section in msg else f"{section}: {msg}") from None
