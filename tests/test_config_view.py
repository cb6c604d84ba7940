"""Reading the config: ``train.py config`` (values, origins, descriptions), ``--cfg job`` and
``--help`` with the preset's real model values, and ``check_command`` (a command line validated
without running it)."""

from __future__ import annotations

import re

import pytest
import yaml

from qwen3 import PRESETS
from trainer.cli import check_command, compose_config, main
from trainer.config import MODEL_FIELDS
from trainer.config_view import _flatten, key_docs, resolve
from trainer.errors import ConfigError


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["train.py", *args], 0.0)
    out = capsys.readouterr()
    return code, out.out, out.err


def _rows(text: str) -> dict[str, tuple[str, str, str]]:
    """``train.py config`` output -> dotted key: (value, origin, description)."""
    rows: dict[str, tuple[str, str, str]] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if re.fullmatch(r"\w+:", line):
            section = line[:-1]
            continue
        match = re.match(r"^(\s*)(\w+):\s+(.*?)\s+\[([^\]]+)\]\s*(.*)$", line)
        assert match, line
        key = f"{section}.{match.group(2)}" if match.group(1) else match.group(2)
        rows[key] = (match.group(3), match.group(4), match.group(5))
    return rows


def test_cfg_job_shows_the_presets_real_model_values(capsys) -> None:
    code, out, _ = _run(capsys, "model=small", "model.rope_theta=5e5", "--cfg", "job")
    assert code == 0
    model = yaml.safe_load(out)["model"]
    assert model["preset"] == "small"
    for name, value in PRESETS["small"].items():
        expected = 5e5 if name == "rope_theta" else value
        assert model[name] == expected, name
    token_ids = {"bos_token_id", "eos_token_id", "pad_token_id"}  # the tokenizer's, at run time
    assert [n for n in MODEL_FIELDS if model[n] is None] == sorted(
        token_ids, key=MODEL_FIELDS.index
    )


def test_config_says_where_each_value_came_from_and_what_it_means(capsys) -> None:
    code, out, _ = _run(
        capsys,
        "config",
        "model=small",
        "optim=adamw",
        "model.rope_theta=5e5",
        "trainer.batch_size=8",
    )
    assert code == 0, out
    rows = _rows(out)
    assert rows["model.hidden_size"][:2] == ("512", "preset small")
    assert rows["model.rms_norm_eps"][1] == "default"  # a field the preset leaves alone
    assert rows["model.rope_theta"][:2] == ("500000.0", "override")
    assert rows["model.preset"][:2] == ("small", "conf/model/small.yaml")
    assert rows["optim.adamw_lr"][1] == "conf/optim/adamw.yaml"
    assert rows["data.source"][:2] == ("shakespeare", "conf/data/shakespeare.yaml")
    assert rows["trainer.batch_size"][:2] == ("8", "override")
    assert rows["trainer.seq_len"][:2] == ("256", "default")
    assert rows["trainer.max_steps"][:2] == ("600", "resolved")  # null: the main job's 600
    assert rows["sample.prompts"][0] == """['ROMEO:', "JULIET:\\n", "First Citizen:\\n"]"""
    assert "sequences per forward pass" in rows["trainer.batch_size"][2]
    assert all(doc for _, _, doc in rows.values()), [k for k, r in rows.items() if not r[2]]


def test_every_key_of_the_config_has_a_description() -> None:
    _, record = resolve(compose_config(["data=mixture", "model=tiny-moe"]))
    docs = key_docs()
    undocumented = [key for key, _ in _flatten(record) if not docs.get(key)]
    assert undocumented == []
    assert all("\n" not in doc and doc == doc.strip() for doc in docs.values())


def test_help_lists_commands_groups_and_described_keys(capsys) -> None:
    code, out, _ = _run(capsys, "--help", "model=small")
    assert code == 0
    assert "python train.py config [overrides]" in out
    assert re.search(r"^  model: .*\bsmall\b.*\btiny\b", out, re.M)
    rows = _rows(out[out.index("# python train.py") :])
    assert rows["model.num_hidden_layers"][:2] == ("8", "preset small")
    assert rows["trainer.log_every"][2]


def test_a_mistyped_key_is_refused_in_one_line(capsys) -> None:
    code, _, err = _run(capsys, "config", "trainer.maxsteps=3")
    assert code == 2
    assert err.strip() == (
        "config error: trainer.maxsteps is not a known config key; did you mean trainer.max_steps?"
    )


@pytest.mark.parametrize(
    "args",
    [
        ["model=small", "optim=adamw", "trainer.max_steps=2000"],
        ["-m", "optim.lr=1e-3,3e-3,1e-2"],
        ["prepare", "data=mixture"],
        ["config", "model=tiny-moe"],
        ["resume=latest"],
        ["demo", "temperature=0", "max_new_tokens=64"],
        ["eval", "tasks=[hellaswag,arc_easy]", "limit=200"],
        ["model=small", "--cfg", "job"],
    ],
)
def test_check_command_accepts_real_command_lines(args: list[str]) -> None:
    check_command(args)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trainer.maxsteps=3"], "did you mean trainer.max_steps"),
        (["-m", "optim.lr=1e-3,-1"], "optim.lr=-1"),
        (["model=huge"], "model"),
        (["demo", "temprature=0"], "temprature"),
        (["eval", "limit=5"], "tasks"),
        (["trainer.precision=fp8"], "trainer.precision"),
    ],
)
def test_check_command_refuses_what_the_command_would(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_command(args)
