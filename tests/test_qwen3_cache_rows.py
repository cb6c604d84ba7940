"""KVCache rows joining and leaving a running batch (the server's continuous batching): a row
added or kept after a drop decodes exactly what recomputing its whole sequence gives."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_qwen3_generate import CFG as GENERATE_CFG
from test_qwen3_generate import greedy_by_recompute, varied_model

from qwen3 import KVCache, Qwen3, Sampling, generate

CFG = dataclasses.replace(GENERATE_CFG, max_position_embeddings=64)
GREEDY = Sampling(6, temperature=0)


@pytest.fixture(scope="module")
def model() -> Qwen3:
    return varied_model(CFG)


def prefilled(model: Qwen3, prompt: list[int], room: int = 40) -> KVCache:
    cache = KVCache(CFG, 1, len(prompt) + room)
    with torch.inference_mode():
        model(torch.tensor([prompt]), cache=cache, logits_to_keep=1)
    return cache


def test_rows_added_to_a_running_batch_decode_as_recomputed(model: Qwen3) -> None:
    a, b, c = [3, 14, 15, 9, 26], [7, 1], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22]
    cache = prefilled(model, a)
    first = generate(model, [[]], GREEDY, cache=cache)[0]  # a decodes alone for a while
    cache.add_rows(prefilled(model, b))  # shorter than the batch: holes in front of it
    cache.add_rows(prefilled(model, c))  # longer than the batch: the batch's rows get the holes
    assert cache.batch_size == 3 and cache.length == len(c) and cache.padded
    rows = generate(model, [[]] * 3, GREEDY, cache=cache)
    assert first + rows[0] == greedy_by_recompute(model, a, 12)
    assert rows[1] == greedy_by_recompute(model, b, 6)
    assert rows[2] == greedy_by_recompute(model, c, 6)
    assert cache.next_pos.tolist() == [len(a) + 12, len(b) + 6, len(c) + 6]


def test_dropped_rows_leave_and_the_others_go_on_as_recomputed(model: Qwen3) -> None:
    prompts = [[3, 14, 15], [5, 9, 2, 6, 5, 3, 5, 8, 9, 7], [7, 1]]
    cache = prefilled(model, prompts[0])
    for p in prompts[1:]:
        cache.add_rows(prefilled(model, p))
    before = generate(model, [[]] * 3, GREEDY, cache=cache)
    room = cache.max_len - cache.length
    cache.drop_rows([1])  # the longest row leaves: the slots only it used are cut
    assert cache.batch_size == 2 and cache.length == len(prompts[0]) + 6
    assert cache.max_len - cache.length == room
    after = generate(model, [[]] * 2, GREEDY, cache=cache)
    for p, x, y in zip([prompts[0], prompts[2]], [before[0], before[2]], after, strict=True):
        assert x + y == greedy_by_recompute(model, p, 12)
    cache.drop_rows([1])
    assert not cache.padded  # one row without holes: the mask-free decode path again
    assert cache.batch_size == 1 and cache.next_pos.tolist() == [len(prompts[0]) + 12]
    last = generate(model, [[]], GREEDY, cache=cache)[0]
    assert before[0] + after[0] + last == greedy_by_recompute(model, prompts[0], 18)
    cache.drop_rows([0])
    assert cache.batch_size == 0 and cache.length == 0 and cache.last_logits is None


def test_rows_of_another_model_shape_are_refused(model: Qwen3) -> None:
    other = dataclasses.replace(CFG, num_key_value_heads=1)
    cache = prefilled(model, [3, 4])
    with pytest.raises(ValueError, match="different model shapes"):
        cache.add_rows(KVCache(other, 1, 8))
