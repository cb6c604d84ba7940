"""Docs that cannot drift: every relative link in the README, CONTRIBUTING and ``docs/`` points at a
file (and heading) that exists, and every ``train.py`` / ``serve.py`` command in their code blocks
is accepted by the real command line, validated without running (``trainer.cli.check_command``,
``serve.parse_args``): an unknown key, a wrong value or option fails here."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import serve
from data.tokenizer_training import train_tokenizer
from qwen3 import Qwen3, Qwen3Config
from trainer.cli import check_command
from trainer.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted([REPO / "README.md", REPO / "CONTRIBUTING.md", *(REPO / "docs").glob("*.md")])
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """``text`` without its fenced code blocks and inline code."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {_slug(m.group(1).replace("`", "")) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` whose file, or heading, does not exist."""
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        heading = anchor and where.suffix == ".md" and where.exists()
        missing_heading = heading and anchor not in _anchors(where)
        if not where.exists() or missing_heading:
            broken.append(target)
    return broken


def commands(text: str) -> list[tuple[str, list[str]]]:
    """``(script, args)`` of each ``train.py`` / ``serve.py`` command in the code blocks of a
    page (``python train.py ...``, ``torchrun ... train.py ...``, ``$ python ...``)."""
    found = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if not re.search(r"\b(train|serve)\.py\b", line) or line.startswith(("#", ">>>")):
                continue
            words = shlex.split(line, comments=True)
            for stop in ("&", "&&", "|", ";"):
                if stop in words:
                    words = words[: words.index(stop)]
            script = next((w for w in words if w in ("train.py", "serve.py")), None)
            if script and words[0] in ("python", "torchrun"):
                found.append((script, words[words.index(script) + 1 :]))
    return found


def check(script: str, args: list[str]) -> str | None:
    """The problem the real command line finds with ``args``, or None."""
    if script == "serve.py":
        try:
            serve.parse_args(args)
        except SystemExit as e:
            return f"serve.py refused it (exit {e.code})" if e.code else None
        return None
    try:
        check_command(args)
    except ConfigError as e:
        return str(e)
    return None


def _pretrained_placeholders(tmp: Path, shown: list[tuple[str, list[str]]]) -> None:
    """A small real Hugging Face Qwen3 directory at every ``init_from=`` path the docs show, so
    that its check (config.json, tokenizer) runs as it would on a user's download."""
    for _, args in shown:
        for arg in args:
            if arg.startswith("init_from="):
                path = tmp / arg.split("=", 1)[1]
                tokenizer = train_tokenizer(["ROMEO: but soft, what light", "JULIET: ay me"], 300)
                tokenizer.save(path)
                shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, head_dim=8)
                Qwen3(Qwen3Config(vocab_size=320, **shape)).save_pretrained(path)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


def test_every_command_shown_is_valid(tmp_path, monkeypatch) -> None:
    shown = [(page, *cmd) for page in PAGES for cmd in commands(page.read_text())]
    assert sum(script == "train.py" for _, script, _ in shown) >= 30
    assert sum(script == "serve.py" for _, script, _ in shown) >= 4
    _pretrained_placeholders(tmp_path, [(s, a) for _, s, a in shown])
    monkeypatch.chdir(tmp_path)  # relative paths in the commands (init_from=...) resolve here
    problems = [
        f"{page.relative_to(REPO)}: {script} {' '.join(args)}: {problem}"
        for page, script, args in shown
        if (problem := check(script, args)) is not None
    ]
    assert problems == []


def test_the_checks_catch_what_drifts(tmp_path) -> None:
    page = tmp_path / "guide.md"
    page.write_text(
        "[ok](guide.md#usage) [gone](missing.md) [bad anchor](guide.md#nowhere)\n\n"
        "## Usage\n\n```bash\n"
        "python train.py trainer.maxsteps=3   # a typo\n"
        "torchrun --nproc_per_node=2 train.py optim=sgd\n"
        "python train.py demo temprature=0\n"
        "python serve.py --prot 8080 &\n"
        "```\n"
    )
    assert broken_links(page) == ["missing.md", "guide.md#nowhere"]
    found = commands(page.read_text())
    assert [s for s, _ in found] == ["train.py", "train.py", "train.py", "serve.py"]
    problems = [check(script, args) for script, args in found]
    assert all(problems), problems
    assert "did you mean trainer.max_steps" in str(problems[0])
