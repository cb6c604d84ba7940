"""The KV cache given to generation holds everything processed: the prompt, every returned token
and the stop id, never the tokens a stopped row keeps decoding in a batch. So two calls equal one
longer call, and a turn appended to the cache equals recomputing the conversation without one."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from test_qwen3_generate import CFG as GENERATE_CFG
from test_qwen3_generate import varied_model

from qwen3 import (
    KVCache,
    Qwen3,
    Sampling,
    generate,
    generate_steps,
    stream_generate,
)

CFG = dataclasses.replace(GENERATE_CFG, max_position_embeddings=64)
PROMPTS = {1: [[3, 14, 15, 9, 26]], 2: [[3, 14, 15, 9, 26], [7, 1]]}  # rows of different lengths
TURNS = {1: [[16, 23, 42]], 2: [[16, 23, 42], [5]]}


@pytest.fixture(scope="module")
def model() -> Qwen3:
    return varied_model(CFG)


def recompute(model: Qwen3, ids: list[int], n: int) -> list[int]:
    """Greedy continuation of one sequence, the whole sequence recomputed at every step."""
    ids = list(ids)
    start = len(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[start:]


@pytest.mark.parametrize("batch", [1, 2])
def test_twelve_and_twelve_tokens_equal_twenty_four_at_once(model: Qwen3, batch: int) -> None:
    prompts = PROMPTS[batch]
    at_once = generate(model, prompts, Sampling(24, temperature=0))
    assert at_once == [recompute(model, p, 24) for p in prompts]
    cache = KVCache(CFG, batch, 64)
    first = generate(model, prompts, Sampling(12, temperature=0), cache=cache)
    second = generate(model, [[] for _ in prompts], Sampling(12, temperature=0), cache=cache)
    assert [a + b for a, b in zip(first, second, strict=True)] == at_once
    assert cache.length == max(len(p) for p in prompts) + 24  # prompt + every returned token


@pytest.mark.parametrize("batch", [1, 2])
def test_a_turn_appended_to_the_cache_equals_recomputing_the_conversation(
    model: Qwen3, batch: int
) -> None:
    prompts, turns = PROMPTS[batch], TURNS[batch]
    cache = KVCache(CFG, batch, 64)
    first = generate(model, prompts, Sampling(8, temperature=0), cache=cache)
    second = generate(model, turns, Sampling(8, temperature=0), cache=cache)
    assert second == [
        recompute(model, p + a + t, 8) for p, a, t in zip(prompts, first, turns, strict=True)
    ]


def _stop_hit_early_by_row_0_only(model: Qwen3, n: int) -> tuple[int, int]:
    """A token that ends row 0 of PROMPTS[2] well before row 1 stops (or never), and where."""
    free = [recompute(model, p, n) for p in PROMPTS[2]]
    for cut, stop in enumerate(free[0][2:8], start=2):
        row1_cut = free[1].index(stop) if stop in free[1] else n
        if stop not in free[0][:cut] and row1_cut > cut + 2:
            return stop, cut
    raise AssertionError(f"no usable stop id in {free}")


def test_a_stopped_row_holds_its_stop_id_but_nothing_decoded_after_it(model: Qwen3) -> None:
    prompts, turns = PROMPTS[2], TURNS[2]
    stop, cut = _stop_hit_early_by_row_0_only(model, 12)
    cache = KVCache(CFG, 2, 64)
    first = generate(model, prompts, Sampling(12, temperature=0, stop_ids=(stop,)), cache=cache)
    assert len(first[0]) == cut and len(first[1]) > cut + 2  # row 1 decoded on past the stop
    held = [p + a + ([stop] if len(a) < 12 else []) for p, a in zip(prompts, first, strict=True)]
    assert held[0][-1] == stop
    # Continued with nothing new, row 0 goes on from just after its stop id.
    more = generate(model, [[], []], Sampling(4, temperature=0), cache=cache)
    assert more == [recompute(model, h, 4) for h in held]
    held = [h + m for h, m in zip(held, more, strict=True)]
    second = generate(model, turns, Sampling(8, temperature=0), cache=cache)
    assert second == [recompute(model, h + t, 8) for h, t in zip(held, turns, strict=True)]


def test_an_empty_prompt_continues_its_row_while_another_row_gets_a_turn(model: Qwen3) -> None:
    prompts = PROMPTS[2]
    cache = KVCache(CFG, 2, 64)
    first = generate(model, prompts, Sampling(6, temperature=0), cache=cache)
    second = generate(model, [[], [16, 23]], Sampling(6, temperature=0), cache=cache)
    assert second == [
        recompute(model, prompts[0] + first[0], 6),
        recompute(model, prompts[1] + first[1] + [16, 23], 6),
    ]


def test_a_cache_given_to_generate_steps_holds_every_token_yielded_so_far(model: Qwen3) -> None:
    prompts = PROMPTS[2]
    cache = KVCache(CFG, 2, 64)
    steps = generate_steps(model, prompts, Sampling(20, temperature=0), cache=cache)
    taken = list(itertools.islice(steps, 5))
    steps.close()  # the caller stops early
    first = [[step[i] for step in taken] for i in range(2)]
    assert generate(model, [[], []], Sampling(6, temperature=0), cache=cache) == [
        recompute(model, p + a, 6) for p, a in zip(prompts, first, strict=True)
    ]


def test_stream_generate_keeps_the_same_contract(model: Qwen3) -> None:
    prompt = PROMPTS[1][0]
    cache = KVCache(CFG, 1, 64)
    first = list(stream_generate(model, prompt, Sampling(12, temperature=0), cache=cache))
    second = list(stream_generate(model, [], Sampling(12, temperature=0), cache=cache))
    assert first + second == recompute(model, prompt, 24)
    # Stopped at a stop id: the cache holds it, and a new turn follows it.
    free = recompute(model, prompt, 12)
    stop = free[4]
    cut = free.index(stop)
    cache = KVCache(CFG, 1, 64)
    out = list(
        stream_generate(model, prompt, Sampling(12, temperature=0, stop_ids=(stop,)), cache=cache)
    )
    assert out == free[:cut]
    turn = TURNS[1][0]
    again = list(stream_generate(model, turn, Sampling(8, temperature=0), cache=cache))
    assert again == recompute(model, prompt + out + [stop] + turn, 8)


def test_an_empty_prompt_without_a_cache_is_refused(model: Qwen3) -> None:
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], Sampling(3, temperature=0))
