"""``init_from=PATH``: training starts from a Hugging Face Qwen3 directory (continued pretraining)
that the test exports itself from ``transformers``, with the tokenizer saved beside it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_distributed_support import losses, run_torchrun, single_process_losses
from test_trainer_support import (
    SMALL_MODEL,
    compose_run_config,
    make_trainer,
    read_metrics,
    small_run_overrides,
    write_corpus,
)

from data.tokenizer_training import train_tokenizer
from qwen3 import Qwen3, Qwen3Tokenizer
from trainer.errors import ConfigError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("init-from") / "play.txt")


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory) -> Path:
    """A transformers Qwen3ForCausalLM (random, seeded) and its tokenizer in one directory."""
    import transformers

    path = tmp_path_factory.mktemp("pretrained") / "qwen3-test"
    tokenizer = train_tokenizer(corpus.read_text().split("\n\n"), 400)
    tokenizer.save(path)
    config = transformers.Qwen3Config(
        vocab_size=448,  # more rows than the tokenizer has ids, as in the released Qwen3 models
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rope_theta=50_000.0,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_id,
        bos_token_id=tokenizer.eos_id,
    )
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(path)
    return path


def overrides(tmp: Path, corpus: Path, pretrained: Path, *extra: str) -> list[str]:
    run = [o for o in small_run_overrides(tmp, corpus) if o not in SMALL_MODEL]
    return [*run, f"init_from={pretrained}", "trainer.max_steps=4", "trainer.eval_every=0", *extra]


def test_training_starts_from_the_pretrained_weights_and_tokenizer(
    corpus, pretrained, tmp_path
) -> None:
    from transformers import AutoModelForCausalLM

    # float32, as the reference below: auto is bf16 autocast on CPUs with native bf16 matmuls
    run = [*overrides(tmp_path, corpus, pretrained), "trainer.precision=fp32"]
    trainer = make_trainer(run, tmp_path / "run")
    parts = trainer.parts
    # Shapes from config.json (its 448 rows, not the tokenizer's 400 ids), tokenizer from the dir.
    assert parts.model.config.vocab_size == 448 and parts.model.config.rope_theta == 50_000.0
    given = Qwen3Tokenizer.from_dir(pretrained)
    assert parts.data.tokenizer.tokenizer.to_str() == given.tokenizer.to_str()
    assert trainer.cfg.data.tokenizer == str(pretrained)

    hf = AutoModelForCausalLM.from_pretrained(pretrained, torch_dtype=torch.float32)
    x, y = parts.sampler.batch(0)
    with torch.no_grad():
        logits = hf(x).logits
    hf_loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()

    trainer.fit()
    losses = [r["train_loss"] for r in read_metrics(tmp_path / "run") if "train_loss" in r]
    assert len(losses) == 4
    # Step 0's loss is the pretrained model's on that batch: its weights, exactly loaded.
    assert losses[0] == pytest.approx(hf_loss, rel=1e-5)
    assert losses[-1] < losses[0]  # and training moves on from there
    # The checkpoint is again a transformers directory with the same vocabulary and tokenizer.
    ckpt = tmp_path / "run" / "latest"
    assert json.loads((ckpt / "config.json").read_text())["vocab_size"] == 448
    assert Qwen3Tokenizer.from_dir(ckpt).tokenizer.to_str() == given.tokenizer.to_str()
    trained = Qwen3.from_pretrained(ckpt)
    assert not torch.equal(trained.lm_head.weight, hf.lm_head.weight)

    # Relaunched with resume, the run continues from its checkpoint, not from init_from's weights.
    again = make_trainer(overrides(tmp_path, corpus, pretrained), tmp_path / "run")
    again.resume_from(ckpt)
    assert again.step == 4
    assert torch.equal(again.parts.model.lm_head.weight, trained.lm_head.weight)


def test_a_setting_that_leaves_the_shapes_alone_applies(corpus, pretrained, tmp_path) -> None:
    cfg = compose_run_config(
        overrides(tmp_path, corpus, pretrained, "model.rope_theta=1e6", "model.hidden_size=64")
    )
    assert cfg.model.rope_theta == 1e6 and cfg.model.hidden_size == 64
    assert cfg.model.vocab_size == 448 and cfg.init_from == str(pretrained)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("model.hidden_size=128", "model.hidden_size=128 conflicts with init_from="),
        ("model.num_hidden_layers=3", "model.num_hidden_layers=3 conflicts with init_from="),
        ("data.vocab_size=512", "data.vocab_size=512 conflicts with init_from="),
        ("data.tokenizer=/elsewhere", "data.tokenizer='/elsewhere' conflicts with init_from="),
    ],
)
def test_an_override_the_weights_cannot_take_is_one_config_error(
    corpus, pretrained, tmp_path, extra: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        compose_run_config(overrides(tmp_path, corpus, pretrained, extra))
    assert "\n" not in str(err.value)


def test_a_missing_or_damaged_directory_is_one_config_error(corpus, pretrained, tmp_path) -> None:
    def error(path: Path) -> str:
        with pytest.raises(ConfigError) as err:
            make_trainer(overrides(tmp_path, corpus, path), tmp_path / "run")
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "is not a directory" in error(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(pretrained, broken)
    (broken / "config.json").write_text("{not json")
    assert "is not valid JSON" in error(broken)
    (broken / "config.json").unlink()
    assert "needs a config.json" in error(broken)
    shutil.copy(pretrained / "config.json", broken / "config.json")
    (broken / "tokenizer.json").unlink()
    assert "has no tokenizer.json" in error(broken)
    shutil.copy(pretrained / "tokenizer.json", broken / "tokenizer.json")
    (broken / "model.safetensors").unlink()
    assert "has no model.safetensors" in error(broken)


@pytest.mark.slow  # one 2-process torchrun job and its one-process reference
def test_a_sharded_run_starts_from_the_pretrained_weights_as_one_process_does(
    corpus, pretrained, tmp_path
) -> None:
    """trainer.fsdp=true on 2 processes: each rank reads its slices of init_from's files after
    sharding (no rank loads the whole model), and the run trains as the one-process run does."""
    base = [*overrides(tmp_path, corpus, pretrained), "trainer.device=cpu", "optim=adamw"]
    res = run_torchrun(
        tmp_path, 2, *base, "run_name=fsdp", "trainer.fsdp=true", "trainer.batch_size=2"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    ref = single_process_losses([*base, "trainer.batch_size=4"], tmp_path / "ref")
    got = losses(tmp_path / "runs" / "fsdp")
    assert len(got) == 4
    assert got == pytest.approx(ref, rel=1e-4)
