"""Packaging metadata: a wheel and an editable build succeed without a single setuptools warning,
and the wheel carries the server's static page."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

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
