"""Checkpoint directories: atomic saves, pointers, pruning, weights-only state, compatibility,
and loading by transformers."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
import torch
from test_trainer_support import tiny_qwen3, write_corpus

from data.tokenizer_training import train_tokenizer
from optim import OptimConfig, build_optimizers
from qwen3 import Qwen3, Qwen3Config
from trainer.checkpoint import (
    check_compatible,
    check_setup_matches,
    global_batch,
    load_trainer_state,
    save_checkpoint,
    tokenizer_hash,
)
from trainer.errors import CheckpointError, ConfigError
from trainer.run_layout import (
    TRAIN_STATE_DIR,
    check_checkpoint,
    most_recent_run,
    prune_checkpoints,
    read_pointer,
    resolve_resume,
    set_pointer,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("tok") / "play.txt")
    return train_tokenizer(corpus.read_text().split("\n\n"), 300)


@pytest.fixture
def model(tokenizer):
    return tiny_qwen3(tokenizer)


def _state(step: int, tokenizer) -> dict:
    return {
        "step": step,
        "tensor": torch.arange(3),
        "rng": torch.get_rng_state(),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "global_batch": global_batch(8, 1, 2, 64),
    }


def _save(run, step, model, tokenizer, config_yaml: str = ""):
    """A whole training checkpoint (with the weights' and an AdamW's state in train_state/)."""
    optimizers = build_optimizers(model, OptimConfig(name="adamw", warmup_steps=0), 10)
    state = _state(step, tokenizer)
    return save_checkpoint(run, step, model, tokenizer, state, config_yaml, optimizers)


def test_save_pointers_and_pruning(tmp_path, model, tokenizer) -> None:
    run = tmp_path / "run"
    run.mkdir()
    stale = run / ".tmp-step-000009-123456"  # a save interrupted by a crash
    stale.mkdir()
    for step in (1, 2, 3, 4):
        path = _save(run, step, model, tokenizer, "seed: 1\n")
        set_pointer(run, "latest", path)
        if step == 1:
            set_pointer(run, "best", path)
        prune_checkpoints(run, keep_last=2)
    assert sorted(p.name for p in run.glob("step-*")) == [
        "step-000001",
        "step-000003",
        "step-000004",
    ]
    assert os.readlink(run / "latest") == "step-000004"  # relative: the run dir can move
    assert read_pointer(run, "best") == (run / "step-000001").resolve()
    assert not stale.exists() and not list(run.glob(".*tmp*"))
    state = load_trainer_state(run / "latest")
    assert state["step"] == 4 and torch.equal(state["tensor"], torch.arange(3))
    assert (run / "latest" / TRAIN_STATE_DIR / ".metadata").is_file()
    assert (run / "latest" / "config.yaml").read_text() == "seed: 1\n"
    # Re-saving a step (resumed from an older checkpoint) replaces it whole.
    path = _save(run, 4, model, tokenizer, "seed: 2\n")
    torch.save(
        {**torch.load(path / "trainer_state.pt", weights_only=True), "step": 44},
        path / "trainer_state.pt",
    )
    assert load_trainer_state(run / "latest")["step"] == 44
    assert most_recent_run(tmp_path, "best") == run
    assert resolve_resume("latest", run) == ((run / "step-000004").resolve(), None)
    assert resolve_resume(str(run), run) == ((run / "step-000004").resolve(), None)
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        resolve_resume(str(tmp_path), run)


def test_weights_round_trip_and_transformers_loads_it(tmp_path, model, tokenizer) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.train_state import load_train_state

    path = _save(tmp_path, 7, model, tokenizer, "x: 1\n")
    exported = Qwen3.from_pretrained(path)
    other = Qwen3(model.config)
    load_train_state(
        other,
        build_optimizers(other, OptimConfig(name="adamw", warmup_steps=0), 10),
        path,
    )
    for (n, p), q, r in zip(
        model.state_dict().items(),
        other.state_dict().values(),
        exported.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(p, q) and torch.equal(p, r), n
    hf = AutoModelForCausalLM.from_pretrained(path)
    hf_tok = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.encode("ROMEO:\nGood night, sweet love.")
    assert hf_tok("ROMEO:\nGood night, sweet love.")["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=1e-4, atol=1e-4)


def test_corrupt_state_is_a_clear_error(tmp_path, model, tokenizer) -> None:
    path = save_checkpoint(tmp_path, 1, model, tokenizer, _state(1, tokenizer), "")
    (path / "trainer_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_trainer_state(path)
    with pytest.raises(CheckpointError, match="no trainer_state.pt"):
        load_trainer_state(tmp_path)


def test_mismatched_setup_is_named(tmp_path, model, tokenizer) -> None:
    path = save_checkpoint(tmp_path, 1, model, tokenizer, _state(1, tokenizer), "")
    state = load_trainer_state(path)
    h = tokenizer_hash(tokenizer)
    same = global_batch(8, 1, 2, 64)
    check_compatible(path, state, model.config, h, same)  # the same setup passes
    # Another split of the same 16 sequences over processes and micro-batches resumes.
    for batch_size, grad_accum, world in ((16, 1, 1), (4, 2, 2), (2, 2, 4)):
        check_compatible(
            path, state, model.config, h, global_batch(batch_size, grad_accum, world, 64)
        )
    wider = dataclasses.replace(model.config, hidden_size=128)
    with pytest.raises(CheckpointError, match="model.hidden_size is 64 in the checkpoint but 128"):
        check_compatible(path, state, wider, h, same)
    with pytest.raises(CheckpointError, match="tokenizer differs"):
        check_compatible(path, state, model.config, "0123456789abcdef", same)
    with pytest.raises(CheckpointError) as err:
        check_compatible(path, state, model.config, h, global_batch(8, 1, 1, 64))
    assert str(err.value).count("\n") == 0 and (
        "a global batch of 16 sequences of seq_len 64 (batch_size 8 x grad_accum 1 x 2 "
        "processes), this run has 8 sequences of seq_len 64 (batch_size 8 x grad_accum 1 x 1 "
        "process); set trainer.batch_size, trainer.grad_accum and trainer.seq_len to give 16 "
        "sequences of 64 tokens per step on 1 process"
    ) in str(err.value)
    with pytest.raises(
        CheckpointError,
        match="16 sequences of seq_len 64 .* this run has 16 sequences of seq_len 128",
    ):
        check_compatible(path, state, model.config, h, global_batch(8, 1, 2, 128))


def test_pruning_orders_steps_by_number(tmp_path) -> None:
    """step-1000000 is newer than step-999999, though it sorts before it as a string."""
    for step in (999_998, 999_999, 1_000_000):
        (tmp_path / f"step-{step:06d}").mkdir()
    prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-1000000", "step-999999"]


def _truncate(file, size: int = 100) -> None:
    file.write_bytes(file.read_bytes()[:size])


def _damage(ckpt, kind: str) -> str:
    """Damage one file of a checkpoint the way a full disk or a killed copy does; returns what
    the error must name."""
    if kind == "weights":
        _truncate(ckpt / "model.safetensors")
        return r"model\.safetensors is damaged \(.*header"
    if kind == "state":
        _truncate(ckpt / "trainer_state.pt")
        return r"trainer_state\.pt is damaged \(.*zip"
    if kind == "config":
        (ckpt / "config.json").unlink()
        return r"config\.json is missing"
    if kind == "tokenizer":
        _truncate(ckpt / "tokenizer.json")
        return r"tokenizer\.json is damaged: not valid JSON"
    if kind == "shard":  # a killed copy of the optimizer shards
        shard = next((ckpt / TRAIN_STATE_DIR).glob("*.distcp"))
        _truncate(shard, shard.stat().st_size - 1)
        return rf"{shard.name} is damaged \(truncated: \d+ of \d+ bytes\)"
    if kind == "metadata":  # a save killed before its metadata was written
        (ckpt / TRAIN_STATE_DIR / ".metadata").unlink()
        return r"train_state/\.metadata is missing"
    assert kind == "mismatch"  # another model's config.json beside these weights
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    return "the weights have 2 layers, config.json says num_hidden_layers=3"


@pytest.mark.parametrize(
    "kind", ["weights", "state", "config", "tokenizer", "mismatch", "shard", "metadata"]
)
def test_a_damaged_checkpoint_names_the_file(tmp_path, model, tokenizer, kind) -> None:
    path = _save(tmp_path, 1, model, tokenizer)
    check_checkpoint(path, training=True)  # intact
    expected = _damage(path, kind)
    with pytest.raises(CheckpointError, match=expected) as err:
        check_checkpoint(path, training=True)
    assert "\n" not in str(err.value)
    if kind not in ("state", "shard", "metadata"):  # demo and serve need no trainer state
        with pytest.raises(CheckpointError, match=expected):
            check_checkpoint(path)
    else:
        check_checkpoint(path)


def test_truncated_trainer_state_is_a_checkpoint_error(tmp_path, model, tokenizer) -> None:
    path = save_checkpoint(tmp_path, 1, model, tokenizer, _state(1, tokenizer), "")
    state_file = path / "trainer_state.pt"
    _truncate(state_file, state_file.stat().st_size - 16)  # the tail cut: torch.load's OSError
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_trainer_state(path)


@pytest.mark.parametrize("kind", ["weights", "state", "config", "shard"])
def test_resume_skips_a_damaged_latest_and_refuses_a_damaged_path(
    tmp_path, model, tokenizer, kind
) -> None:
    run = tmp_path / "run"
    for step in (1, 2, 3):
        path = _save(run, step, model, tokenizer)
        set_pointer(run, "latest", path)
    expected = _damage(run / "step-000003", kind)
    picked, note = resolve_resume("latest", run)
    assert picked == (run / "step-000002").resolve()
    assert note is not None and "\n" not in note and re.search(expected, note)
    assert f"resuming from {picked}, the newest intact checkpoint" in note
    assert resolve_resume(str(run), run)[0] == picked  # a run dir means its latest

    # Named explicitly, a damaged checkpoint is refused with the intact ones listed.
    with pytest.raises(CheckpointError, match="intact checkpoints of .*: step-000002, step-000001"):
        resolve_resume(str(run / "step-000003"), run)
    assert resolve_resume(str(run / "step-000001"), run) == (picked.parent / "step-000001", None)

    _damage(run / "step-000002", kind)
    assert resolve_resume("latest", run)[0] == (run / "step-000001").resolve()
    _damage(run / "step-000001", kind)
    with pytest.raises(CheckpointError, match="no other checkpoint of .* is intact"):
        resolve_resume("latest", run)


def test_resume_of_a_missing_or_dangling_latest(tmp_path, model, tokenizer) -> None:
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="no 'latest' pointer"):
        resolve_resume("latest", run)
    with pytest.raises(ConfigError, match="no such directory"):
        resolve_resume(str(tmp_path / "nowhere"), run)
    _save(run, 1, model, tokenizer)
    os.symlink("step-000009", run / "latest")  # its step dir was deleted by hand
    picked, note = resolve_resume("latest", run)
    assert picked == (run / "step-000001").resolve()
    assert "latest points at a directory that does not exist" in note


def test_setup_mismatch_is_found_before_any_data(tmp_path, model, tokenizer) -> None:
    yaml_text = "optim:\n  name: muon\n"
    path = save_checkpoint(tmp_path, 1, model, tokenizer, _state(1, tokenizer), yaml_text)
    other_vocab = dataclasses.replace(model.config, vocab_size=model.config.vocab_size + 7)
    check_setup_matches(path, other_vocab, "muon")  # the vocabulary is the tokenizer's to set
    with pytest.raises(
        CheckpointError, match="model.num_hidden_layers is 2 in the checkpoint but 4"
    ):
        check_setup_matches(path, dataclasses.replace(model.config, num_hidden_layers=4), "muon")
    with pytest.raises(CheckpointError, match="optim.name is muon in the checkpoint but adamw"):
        check_setup_matches(path, model.config, "adamw")


def test_a_checkpoint_stores_the_weights_once(tmp_path, model, tokenizer) -> None:
    """Bytes on disk are at most 1.1x the weights plus the optimizer state (it held the weights
    twice before format 3), and no per-rank weight parts are left beside the whole files."""
    path = _save(tmp_path, 1, model, tokenizer)
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    optim = sum(f.stat().st_size for f in (path / TRAIN_STATE_DIR).rglob("*.distcp") if f.is_file())
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert not (path / "sharded").exists()
    assert weights < total <= 1.1 * (weights + optim), (total, weights, optim)


def test_transformers_loads_a_mixture_of_experts_checkpoint(tmp_path, tokenizer) -> None:
    """The experts' 3-D parameters are written under their fused names; transformers 5 reads
    them into its Qwen3-MoE and gives our logits, and resume reads them back."""
    from transformers import AutoModelForCausalLM

    from trainer.train_state import load_train_state

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
        max_position_embeddings=64,
    )
    model = Qwen3(config)
    path = _save(tmp_path, 1, model, tokenizer)
    other = Qwen3(config)
    adamw = OptimConfig(name="adamw", warmup_steps=0)
    load_train_state(other, build_optimizers(other, adamw, 10), path)
    for (n, p), q in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    hf = AutoModelForCausalLM.from_pretrained(path)
    x = torch.tensor([tokenizer.encode("ROMEO:\nGood night.")])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=1e-4, atol=1e-4)
