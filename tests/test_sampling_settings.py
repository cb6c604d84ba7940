"""One sampling-settings type (qwen3.Sampling) behind the trainer's `sample` section, the
demo/interactive options and the server's requests, each keeping its own keys and messages."""

from __future__ import annotations

import pytest
from test_trainer_support import compose_run_config

from qwen3 import Sampling
from serving.engine import batch_key
from serving.schemas import ChatCompletionRequest, CompletionRequest
from trainer.cli import parse_options
from trainer.config import SampleConfig
from trainer.errors import ConfigError

EOS = (0, 5)


def test_the_sample_section_is_a_sampling_with_its_own_keys_and_defaults() -> None:
    cfg = compose_run_config(["sample.temperature=0", "sample.top_p=0.5"]).sample
    assert isinstance(cfg, Sampling)
    assert (cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p) == (120, 0.0, 50, 0.5)
    assert (cfg.stop_ids, cfg.seed) == ((), None)
    assert cfg.prompts == ["ROMEO:", "JULIET:\n", "First Citizen:\n"]
    assert compose_run_config([]).sample == SampleConfig()


def test_a_bad_sample_value_names_the_sample_key() -> None:
    with pytest.raises(ConfigError) as err:
        compose_run_config(["sample.top_k=0"])
    assert str(err.value) == "sample.top_k=0 must be a whole number >= 1; set e.g. sample.top_k=50"


@pytest.mark.parametrize("override", ["+sample.seed=3", "+sample.stop_ids=[1]"])
def test_the_run_sets_stop_ids_and_seed_not_the_sample_section(override: str) -> None:
    with pytest.raises(ConfigError, match=r"is not a known config key"):
        compose_run_config([override])


def test_demo_options_are_a_sampling_with_plain_keys() -> None:
    cfg = parse_options("demo", ["seed=3", "top_k=null", "temperature=0", "device=cpu"])
    assert isinstance(cfg, Sampling)
    assert (cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p) == (200, 0.0, None, None)
    assert (cfg.seed, cfg.stop_ids, cfg.stop_at_eos) == (3, (), True)
    with pytest.raises(ConfigError) as err:
        parse_options("interactive", ["max_new_tokens=-1"])
    assert str(err.value) == (
        "interactive: max_new_tokens=-1 must be a whole number >= 0; set e.g. max_new_tokens=120"
    )
    with pytest.raises(ConfigError, match=r"demo\.stop_ids is not a known config key"):
        parse_options("demo", ["stop_ids=[1]"])


def test_a_request_maps_onto_sampling_in_one_place() -> None:
    body = CompletionRequest(prompt="x", temperature=0.5, top_k=3, seed=7)
    assert body.sampling(16, EOS) == Sampling(16, 0.5, top_k=3, stop_ids=EOS, seed=7)
    chat = ChatCompletionRequest(
        messages=[{"role": "user", "content": "hi"}], top_p=0.9, ignore_eos=True
    )
    assert chat.sampling(8, EOS) == Sampling(8, 1.0, top_p=0.9, stop_ids=())


def test_requests_share_a_batch_when_only_their_lengths_differ() -> None:
    def key(**fields: object) -> Sampling | None:
        return batch_key(CompletionRequest(prompt="x", **fields).sampling(16, EOS))

    assert key(max_tokens=4) == key(max_tokens=30) == key(top_p=1.0)
    assert key() != key(temperature=0.5) and key() != key(ignore_eos=True)
    assert key(seed=1) is None  # a seeded request decodes alone


@pytest.mark.parametrize(
    ("temperature", "top_p"), [(1e-30, None), (1e-21, 0.9), (1.0, 1e-40), (0.7, 1e-45)]
)
def test_extreme_but_valid_settings_sample_the_likeliest_token(temperature, top_p) -> None:
    """A temperature so cold that the scaled logits would overflow is greedy, and a top_p that
    rounds to 0 in float32 keeps the likeliest token (both were nan/failures, found by fuzzing
    the server)."""
    import torch

    from qwen3 import sample_next

    logits = torch.tensor([[1.0, 30.0, -5.0, 29.0], [0.0, -1.0, 2.0, 1.5]])
    sampling = Sampling(1, temperature=temperature, top_p=top_p)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert sample_next(logits, sampling, gen).tolist() == [1, 2]
