"""KV-cache generation: cache = recompute, padding, continuation, sampling options, stop ids."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from qwen3 import KVCache, Qwen3, Qwen3Config, Sampling, generate, sample_next, stream_generate

CFG = Qwen3Config(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=32,
)


def varied_model(cfg: Qwen3Config) -> Qwen3:
    """A seeded random model in eval mode whose weights are scaled up, so greedy paths are
    varied rather than one repeated token."""
    torch.manual_seed(0)
    m = Qwen3(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(20)
    return m


@pytest.fixture(scope="module")
def model() -> Qwen3:
    return varied_model(CFG)


def greedy_by_recompute(model: Qwen3, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_with_cache_equals_full_recomputation(model: Qwen3) -> None:
    prompt = [3, 14, 15, 9, 26]
    expected = greedy_by_recompute(model, prompt, 40)  # 45 positions: past the 32 precomputed
    assert len(set(expected)) > 3
    assert generate(model, [prompt], Sampling(40, temperature=0)) == [expected]
    assert list(stream_generate(model, prompt, Sampling(40, temperature=0))) == expected


def test_batched_prompts_of_different_lengths_match_single_runs(model: Qwen3) -> None:
    prompts = [[5], [7, 8, 9, 10, 11, 12], [1, 2, 3]]
    batched = generate(model, prompts, Sampling(12, temperature=0))
    assert batched == [greedy_by_recompute(model, p, 12) for p in prompts]


def test_continuation_from_an_existing_cache(model: Qwen3) -> None:
    prompt, more = [4, 8, 15], [16, 23]
    full = greedy_by_recompute(model, prompt + more, 6)
    cache = KVCache(CFG, 1, 64)
    first = generate(model, [prompt], Sampling(1, temperature=0), cache=cache)
    assert first == [greedy_by_recompute(model, prompt, 1)]
    # The cache holds the returned token too, so `more` is appended after it.
    expected = greedy_by_recompute(model, prompt + first[0] + more, 6)
    assert generate(model, [more], Sampling(6, temperature=0), cache=cache) == [expected]
    # no new tokens at all: continue from the cache's last logits
    again = KVCache(CFG, 1, 64)
    with torch.no_grad():
        model(torch.tensor([prompt + more]), cache=again)
    assert generate(model, [[]], Sampling(6, temperature=0), cache=again) == [full]


def test_eos_stops_each_row_and_is_not_returned(model: Qwen3) -> None:
    prompt = [3, 14, 15, 9, 26]
    free = greedy_by_recompute(model, prompt, 20)
    stop = free[5]
    cut = free.index(stop)
    out = generate(model, [prompt, [1, 2]], Sampling(20, temperature=0, stop_ids=(stop,)))
    assert out[0] == free[:cut]
    assert stop not in out[1]


def test_sampling_is_seeded_and_honours_top_k_and_top_p() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(500, 1)
    k2 = sample_next(logits, Sampling(1, top_k=2), generator=torch.Generator().manual_seed(0))
    assert set(k2.tolist()) == {0, 1}
    probs = logits[0].softmax(-1)
    # top_p just above p0 keeps exactly the first two tokens
    p2 = sample_next(
        logits,
        Sampling(1, top_p=float(probs[0]) + 1e-3),
        generator=torch.Generator().manual_seed(0),
    )
    assert set(p2.tolist()) == {0, 1}
    hot = sample_next(
        logits, Sampling(1, temperature=5.0), generator=torch.Generator().manual_seed(0)
    )
    assert len(set(hot.tolist())) == 6  # high temperature flattens
    assert sample_next(logits[:1], Sampling(1, temperature=0.0)).item() == 0  # greedy


def test_generate_is_reproducible_with_a_seed(model: Qwen3) -> None:
    a = generate(model, [[1, 2, 3]], Sampling(15, temperature=1.0, top_k=10, seed=7))
    b = generate(model, [[1, 2, 3]], Sampling(15, temperature=1.0, top_k=10, seed=7))
    c = generate(model, [[1, 2, 3]], Sampling(15, temperature=1.0, top_k=10, seed=8))
    assert a == b and a != c


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [(dict(temperature=-1.0), "temperature"), (dict(top_p=1.5), "top_p"), (dict(top_k=0), "top_k")],
)
def test_bad_sampling_options_are_refused(model: Qwen3, kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        generate(model, [[1, 2]], Sampling(3, **kwargs))


def test_full_cache_is_refused_with_a_clear_message(model: Qwen3) -> None:
    cache = KVCache(CFG, 1, 8)
    with pytest.raises(ValueError, match="KVCache too small"):
        generate(model, [[1, 2, 3]], Sampling(10), cache=cache)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_new_tokens=-1), "max_new_tokens=-1 must be a whole number >= 0"),
        (dict(max_new_tokens=2.5), "max_new_tokens=2.5 must be a whole number >= 0"),
        (dict(stop_ids=[1, -2]), "stop_ids=[1, -2] must be a list of token ids"),
        (dict(stop_ids="0"), "stop_ids='0' must be a list of token ids"),
        (dict(seed=2**64), f"seed={2**64} must be a whole number from -2**63 to 2**64-1"),
        (dict(seed=True), "seed=True must be a whole number"),
    ],
)
def test_sampling_names_the_field_a_bad_value_is_in(kwargs: dict, message: str) -> None:
    values = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        Sampling(**values)


def test_sampling_is_a_hashable_value() -> None:
    """Equal settings are equal and hash alike (the server batches requests by them); stop ids
    given as any iterable are kept as a tuple, and nothing can be changed afterwards."""
    a = Sampling(8, temperature=0.7, top_p=0.9, stop_ids=[2, 3])
    b = Sampling(8, temperature=0.7, top_p=0.9, stop_ids=(2, 3))
    assert a == b and hash(a) == hash(b) and a.stop_ids == (2, 3)
    assert a != dataclasses.replace(b, seed=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.temperature = 0.0  # type: ignore[misc]
