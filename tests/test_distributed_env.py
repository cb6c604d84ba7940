"""The process's place in a run, read from torchrun's environment, and the single-process
behaviour of the collectives (no process group: plain values back)."""

from __future__ import annotations

import pytest
import torch
from test_distributed_support import base_overrides, run_torchrun
from test_trainer_support import write_corpus

from qwen3 import Qwen3, Qwen3Config
from trainer.distributed import (
    DistInfo,
    any_rank,
    dist_info,
    from_main,
    gradient_sync,
    local_device,
    main_first,
    mean_across_ranks,
    wrap_model,
)


def test_plain_python_is_rank_0_of_1(monkeypatch) -> None:
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    info = dist_info()
    assert info == DistInfo(0, 1, 0) and info.is_main and not info.is_distributed


def test_torchrun_environment(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    info = dist_info()
    assert info == DistInfo(3, 4, 1) and not info.is_main and info.is_distributed
    assert local_device(torch.device("cuda"), info) == torch.device("cuda", 1)
    assert local_device(torch.device("cuda", 0), info) == torch.device("cuda", 0)
    assert local_device(torch.device("cpu"), info) == torch.device("cpu")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a whole number"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2, LOCAL_RANK=0, WORLD_SIZE=2"),
    ],
)
def test_a_broken_environment_is_named(monkeypatch, env, message) -> None:
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=message) as err:
        dist_info()
    assert "torchrun" in str(err.value)


def test_collectives_without_a_process_group_return_their_input() -> None:
    assert mean_across_ranks(2.5) == 2.5
    assert any_rank(True) and not any_rank(False)
    assert from_main("run-name") == "run-name"
    assert main_first(lambda: 7, "computing") == 7


def test_one_process_trains_the_module_itself() -> None:
    model = Qwen3(
        Qwen3Config(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=16,
        )
    )
    with pytest.warns(UserWarning, match="trainer.fsdp=true in a single process"):
        assert wrap_model(model, DistInfo(), torch.device("cpu"), fsdp=True, compile=False) is model
    x = torch.zeros(1, 4, dtype=torch.long)
    with gradient_sync(model, enabled=False):
        model(x, targets=x).backward()
    assert model.lm_head.weight.grad is not None


@pytest.mark.slow  # ~20 s: two processes start, import torch and stop
def test_a_data_error_on_rank_0_stops_every_rank_without_a_run_dir(tmp_path) -> None:
    corpus = write_corpus(tmp_path / "play.txt")
    missing = tmp_path / "missing.txt"
    args = [
        a.replace(str(corpus), str(missing))
        for a in base_overrides(tmp_path, corpus, tmp_path / "c")
    ]
    res = run_torchrun(tmp_path, 2, *args, "run_name=bad")
    assert res.returncode != 0
    assert f"data.paths entry '{missing}' matches no files" in res.stderr
    assert "rank 0 failed preparing the data" in res.stderr  # rank 1 did not wait forever
    assert not (tmp_path / "runs" / "bad").exists()


def test_fsdp_config_values_are_checked() -> None:
    from trainer.config import TrainConfig

    assert TrainConfig(fsdp=True).fsdp
    with pytest.raises(ValueError, match="trainer.fsdp='yes' must be true or false"):
        TrainConfig(fsdp="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fp16.*trainer.fsdp=true; use trainer.precision=bf16"):
        TrainConfig(fsdp=True, precision="fp16")
