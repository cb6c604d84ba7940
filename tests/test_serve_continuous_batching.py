"""Continuous batching in the engine: a request arriving while another decodes joins its batch,
a cancelled row leaves while the others finish as they would alone, and a seeded request draws
the same tokens alone or joined into a busy batch. The engine runs in-process on a real tiny
checkpoint, so its counters can be read between steps."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from test_serve_support import build_tiny_checkpoint

from qwen3 import Qwen3, Sampling
from qwen3.tokenizer import Qwen3Tokenizer
from serving.engine import Choice, GenerationEngine, GenerationRequest
from serving.text_stream import TextStream

PROMPTS = ["Tom saw a big red ball", "Lily", "The moon came up over the hill, and"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GenerationEngine]:
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("cb") / "tiny", max_positions=2048)
    tokenizer = Qwen3Tokenizer.from_dir(path)
    engine = GenerationEngine(Qwen3.from_pretrained(path).eval(), tokenizer, threads=1)
    engine.start()
    yield engine
    engine.stop()


def request(
    engine: GenerationEngine, prompt: str, max_tokens: int, n: int = 1, **sampling: object
) -> GenerationRequest:
    """A request that never stops at end-of-text, so its length is exactly `max_tokens`."""
    ids = engine.tokenizer.encode(prompt)
    choices = [Choice(j, ids, max_tokens, TextStream(engine.tokenizer)) for j in range(n)]
    settings = Sampling(max_tokens, **sampling)
    return GenerationRequest(choices, settings, asyncio.get_running_loop())


async def first_delta(req: GenerationRequest) -> None:
    while (await req.events.get())[0] != "delta":
        pass


async def texts(req: GenerationRequest) -> list[str]:
    out = [""] * len(req.choices)
    while True:
        kind, index, value = await req.events.get()
        assert kind != "error", value
        if kind == "delta":
            assert isinstance(value, str)
            out[index] += value
        elif kind == "end":
            return out


async def alone(
    engine: GenerationEngine, prompt: str, max_tokens: int, **sampling: object
) -> list[str]:
    req = request(engine, prompt, max_tokens, **sampling)
    engine.submit(req)
    return await texts(req)


def test_a_request_arriving_while_another_decodes_joins_its_batch(
    engine: GenerationEngine,
) -> None:
    async def main() -> None:
        solo = await alone(engine, PROMPTS[1], 12, temperature=0)
        before = dict(engine.stats)
        long = request(engine, PROMPTS[0], 600, temperature=0)
        engine.submit(long)
        await first_delta(long)  # decoding: the next request must join it
        short = request(engine, PROMPTS[1], 12, temperature=0)
        engine.submit(short)
        assert await texts(short) == solo  # greedy: the same as alone
        assert engine.load["running"] == 1  # the long one goes on
        await texts(long)
        steps = engine.stats["decode_steps"] - before["decode_steps"]
        tokens = engine.stats["generated_tokens"] - before["generated_tokens"]
        # One step draws a token for every row: the short request's 12 rode along.
        assert (tokens, steps) == (612, 600)

    asyncio.run(main())


def test_a_cancelled_row_leaves_and_the_others_finish_as_alone(engine: GenerationEngine) -> None:
    async def main() -> None:
        solo = [await alone(engine, p, 40, temperature=0) for p in (PROMPTS[0], PROMPTS[2])]
        before = dict(engine.stats)
        first = request(engine, PROMPTS[0], 40, temperature=0)
        doomed = request(engine, PROMPTS[1], 1000, temperature=0)
        last = request(engine, PROMPTS[2], 40, temperature=0)
        for req in (first, doomed, last):
            engine.submit(req)
        await first_delta(doomed)
        doomed.cancel()
        assert [await texts(first), await texts(last)] == solo
        while engine.load["running"]:  # the worker drops the row at its next step
            await asyncio.sleep(0.01)
        assert doomed.choices[0].finish_reason == "cancelled"
        assert engine.stats["cancelled"] == before["cancelled"] + 1
        assert engine.stats["generated_tokens"] - before["generated_tokens"] < 40 + 40 + 1000

    asyncio.run(main())


def test_a_seeded_request_draws_the_same_tokens_alone_and_under_load(
    engine: GenerationEngine,
) -> None:
    seeded = {"temperature": 1.0, "top_k": 50, "seed": 7}

    async def main() -> None:
        solo = request(engine, PROMPTS[2], 24, n=2, **seeded)
        engine.submit(solo)
        want = await texts(solo)
        assert want[0] != want[1]  # two choices, two draws of one generator
        busy = [
            request(engine, PROMPTS[0], 300, temperature=0),
            request(engine, PROMPTS[1], 300, temperature=1.0),  # torch's global generator
            request(engine, PROMPTS[1], 300, temperature=0.8, seed=7),  # the same seed, other rows
        ]
        for req in busy:
            engine.submit(req)
        await first_delta(busy[0])
        joined = request(engine, PROMPTS[2], 24, n=2, **seeded)
        engine.submit(joined)
        together = [request(engine, PROMPTS[2], 24, n=2, **seeded) for _ in range(2)]
        for req in together:  # prefilled in one padded batch with each other
            engine.submit(req)
        assert await texts(joined) == want
        assert [await texts(r) for r in together] == [want, want]
        for req in busy:
            await texts(req)

    asyncio.run(main())
