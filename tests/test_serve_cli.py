"""serve.py start-up: which checkpoint it picks, and its one-line errors (real files, real sockets)."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
from test_serve_support import build_tiny_checkpoint, run_serve

from serving.served_model import load_served_model
from trainer.errors import CheckpointError
from trainer.run_layout import display_name, find_model_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("cli") / "tiny")


def make_run(root: Path, run: str, step: int, tiny: Path, pointer: str, mtime: float) -> Path:
    """A trainer-style run dir with one step dir and a `best` pointer (symlink or text file)."""
    step_dir = root / run / f"step-{step:06d}"
    shutil.copytree(tiny, step_dir)
    best = root / run / "best"
    if pointer == "symlink":
        os.symlink(step_dir.name, best)
    else:
        best.write_text(step_dir.name + "\n")
    os.utime(best, (mtime, mtime), follow_symlinks=False)
    return step_dir


def one_line_error(result) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("serve.py: error: ")
    return lines[0]


def test_default_is_the_best_of_the_most_recent_run(tmp_path: Path, tiny: Path) -> None:
    root = tmp_path / "checkpoints"
    make_run(root, "old", 10, tiny, "symlink", mtime=1_000)
    newest = make_run(root, "new", 20, tiny, "text", mtime=2_000)
    make_run(root, "older", 30, tiny, "symlink", mtime=500)
    (root / "no-best-yet").mkdir()
    assert find_model_dir(None, root) == newest.resolve()
    assert find_model_dir(root / "old", root) == (root / "old" / "step-000010").resolve()
    assert display_name(newest) == "new/step-000020"
    assert display_name(tiny) == "tiny"


def test_no_checkpoint_yet_says_how_to_train(tmp_path: Path) -> None:
    error = one_line_error(run_serve("--checkpoints", str(tmp_path / "checkpoints")))
    assert "no checkpoint yet" in error and "python train.py model=tiny" in error
    (tmp_path / "checkpoints" / "run").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="python train.py model=tiny"):
        find_model_dir(None, tmp_path / "checkpoints")


def test_a_directory_that_is_not_a_qwen3_model_is_refused(tmp_path: Path, tiny: Path) -> None:
    error = one_line_error(run_serve("--ckpt", str(tmp_path)))
    assert "not a Qwen3 model directory" in error and "config.json" in error
    llama = tmp_path / "llama"
    shutil.copytree(tiny, llama)
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    assert "model_type='llama'" in one_line_error(run_serve("--ckpt", str(llama)))
    assert "no such directory" in one_line_error(run_serve("--ckpt", str(tmp_path / "missing")))
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(tiny, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        find_model_dir(no_tok, "checkpoints")


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json"])
def test_a_damaged_checkpoint_is_one_line(tmp_path: Path, tiny: Path, name: str) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny, damaged)
    file = damaged / name
    file.write_bytes(file.read_bytes()[:100])  # a copy cut short
    assert f"{file} is damaged" in one_line_error(run_serve("--ckpt", str(damaged)))


def test_a_taken_port_is_one_line(tiny: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        error = one_line_error(run_serve("--ckpt", str(tiny), "--port", str(port)))
    assert f"port {port}" in error and "already in use" in error and "--port" in error


def test_a_directory_saved_by_transformers_loads(tmp_path: Path, tiny: Path) -> None:
    transformers = pytest.importorskip("transformers")
    ours = json.loads((tiny / "config.json").read_text())
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
    config = transformers.Qwen3Config(
        **{k: ours[k] for k in fields},
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
    )
    hf_dir = tmp_path / "hf-qwen3"
    transformers.Qwen3ForCausalLM(config).save_pretrained(hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, hf_dir / name)
    served = load_served_model(find_model_dir(hf_dir, "checkpoints"), device="cpu")
    assert served.name == "hf-qwen3" and served.context_length == 512
    assert served.num_params == sum(p.numel() for p in served.model.parameters())
