"""Packaging metadata: a wheel and an editable build succeed without a single setuptools warning,
the wheel carries the server's static page, and ``make install`` into a fresh virtual environment
prints no error or warning of the project's making and leaves ``pip check`` clean."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("qwen3", "data", "optim", "trainer", "serving")


def test_wheel_and_editable_builds_are_quiet(tmp_path) -> None:
    # Build from a copy, so that setuptools' build/ and egg-info folders stay out of the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in PACKAGES:
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    build = (
        "from setuptools import build_meta as b; "
        f"b.build_wheel({str(out)!r}); b.build_editable({str(out)!r})"
    )
    res = subprocess.run(
        [sys.executable, "-W", "default", "-c", build],
        cwd=src,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "Warning" not in res.stderr, res.stderr
    (wheel,) = (p for p in out.glob("*.whl") if "editable" not in p.name)
    names = zipfile.ZipFile(wheel).namelist()
    static = sorted(p.name for p in (REPO / "serving" / "static").iterdir())
    assert sorted(n.rpartition("/")[2] for n in names if "serving/static/" in n) == static
    metadata = next(n for n in names if n.endswith("METADATA"))
    assert "License-Expression: MIT" in zipfile.ZipFile(wheel).read(metadata).decode()


def _pip_config_locations() -> set[str]:
    """Index and find-links locations this machine's pip configuration names (not the project's)."""
    res = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    )
    found = set()
    for line in res.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.rsplit(".", 1)[-1] in ("extra-index-url", "index-url", "find-links"):
            found.update(value.strip("'\"").split())
    return found


def _machine_warning(line: str, configured: set[str]) -> bool:
    """pip's warning about a location that this machine's pip configuration names and that does
    not exist here, e.g. ``WARNING: Location 'file:///opt/pypi/simple/torch/' is ignored: it is
    neither a file nor a directory.``: the machine's, not the project's."""
    match = re.fullmatch(
        r"WARNING: Location '(.+)' is ignored: it is neither a file nor a directory\.", line
    )
    return bool(match) and any(match.group(1).startswith(loc) for loc in configured)


@pytest.mark.slow
def test_make_install_is_quiet_and_pip_check_is_clean(tmp_path) -> None:
    # A fresh clone's first command: the Makefile's install into a new virtual environment.
    venv = tmp_path / "venv"
    res = subprocess.run(
        ["make", "install", f"VENV={venv}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    configured = _pip_config_locations()
    noisy = [
        line
        for line in (res.stdout + res.stderr).splitlines()
        if re.search(r"\b(ERROR|WARNING)\b", line, re.I) and not _machine_warning(line, configured)
    ]
    assert noisy == []
    check = subprocess.run(
        [str(venv / "bin" / "pip"), "check"], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout
    plays = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "from data.shakespeare import list_plays; print(len(list_plays()))",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert plays.stdout.strip() == "38", plays.stderr
