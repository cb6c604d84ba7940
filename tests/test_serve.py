"""serve.py end to end: a real server process on loopback, driven by the official `openai` client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from test_serve_support import build_tiny_checkpoint

from serving.launch import serve_in_subprocess

CONTEXT = 2048  # long enough that a disconnected 1000-token request is clearly cut short
CAP = 1000


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("serve") / "tiny-model", max_positions=CONTEXT
    )


@pytest.fixture(scope="module")
def server(ckpt: Path) -> Iterator[str]:
    with serve_in_subprocess(ckpt, "--max-tokens-cap", str(CAP)) as url:
        yield url


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def greedy(client: openai.OpenAI, prompt: str, max_tokens: int = 12, **kw) -> str:
    out = client.completions.create(
        model="tiny-model", prompt=prompt, max_tokens=max_tokens, temperature=0, **kw
    )
    return out.choices[0].text


def test_models_lists_the_checkpoint_with_size_and_context(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-model"]
    card = models[0].model_dump()
    assert card["max_model_len"] == CONTEXT and card["num_params"] > 0
    assert client.models.retrieve("tiny-model").id == "tiny-model"


def test_completion_plain_and_streamed_agree(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model="tiny-model", prompt="Once upon a time", max_tokens=12, temperature=0
    )
    choice = out.choices[0]
    assert out.object == "text_completion" and out.model == "tiny-model"
    assert choice.text and choice.finish_reason in ("length", "stop")
    assert out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    if choice.finish_reason == "length":
        assert out.usage.completion_tokens == 12

    stream = client.completions.create(
        model="tiny-model",
        prompt="Once upon a time",
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_chat_plain_and_streamed_agree(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about Tom."},
    ]
    out = client.chat.completions.create(
        model="tiny-model", messages=messages, max_tokens=10, temperature=0
    )
    assert out.object == "chat.completion"
    message = out.choices[0].message
    assert message.role == "assistant" and message.content
    assert out.usage.prompt_tokens > 10  # the chat format wraps the messages in control tokens

    stream = client.chat.completions.create(
        model="tiny-model", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    chunks = [c for c in stream if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_seed_n_and_token_prompts(client: openai.OpenAI) -> None:
    def sample(seed: int) -> list[str]:
        out = client.completions.create(
            model="tiny-model",
            prompt="The cat",
            max_tokens=8,
            seed=seed,
            n=2,
            extra_body={"top_k": 50},
        )
        assert [c.index for c in out.choices] == [0, 1]
        return [c.text for c in out.choices]

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    ids = client.completions.create(
        model="tiny-model", prompt=[[5, 6, 7], [8, 9]], max_tokens=3, n=2
    )
    assert sorted(c.index for c in ids.choices) == [0, 1, 2, 3]
    assert ids.usage.prompt_tokens == 5


def test_stop_sequence_ends_the_text_before_it(client: openai.OpenAI) -> None:
    text = greedy(client, "Lily found", max_tokens=40)
    start = next(
        i for i in range(1, len(text) - 1) if text[i : i + 2].isascii() and text[i : i + 2].strip()
    )
    stop = text[start : start + 2]
    out = client.completions.create(
        model="tiny-model", prompt="Lily found", max_tokens=40, temperature=0, stop=[stop]
    )
    assert out.choices[0].text == text[: text.find(stop)]
    assert out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="tiny-model",
        prompt="Lily found",
        max_tokens=40,
        temperature=0,
        stop=stop,
        stream=True,
    )
    assert "".join(c.choices[0].text for c in streamed) == text[: text.find(stop)]


def test_generation_is_cut_at_the_context(client: openai.OpenAI) -> None:
    prompt = [5] * (CONTEXT - 3)
    out = client.completions.create(model="tiny-model", prompt=prompt, max_tokens=20, temperature=0)
    assert out.usage.completion_tokens <= 3
    assert out.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "hi", "temperature": 2.5}, "temperature"),
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"max_tokens": 5}, "prompt"),
        ({"prompt": "hi", "max_tokens": CAP + 1}, "max_tokens"),
        ({"prompt": [5] * CONTEXT}, "prompt"),
        ({"prompt": [10**6]}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": ["a"] * 5, "n": 8}, "prompt"),  # 40 sequences > --max-batch-size 32
        ({"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty"),
        ({"prompt": "hi", "seed": 2**64}, "seed"),  # more than torch.Generator takes
        ({"prompt": "hi", "seed": -(2**63) - 1}, "seed"),
        ({"prompt": "hi", "min_p": 0.1}, "unknown field 'min_p'"),
        ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
        (
            {"prompt": "hi", "stream": True, "stream_options": {"usage": True}},
            "stream_options.usage",
        ),
    ],
)
def test_bad_completion_requests_get_400_naming_the_field(
    server: str, body: dict, field: str
) -> None:
    res = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert res.status_code == 400, res.text
    error = res.json()["error"]
    assert field in error["message"]
    assert error["type"] == "invalid_request_error"


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": HI, "response_format": {"type": "json_object"}}, "response_format"),
        (
            {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {}}},
            "response_format",
        ),
        ({"messages": HI, "chat_template_kwargs": {"thinking": False}}, "chat_template_kwargs"),
        ({"messages": HI, "chat_template_kwargs": {"enable_thinking": "no"}}, "enable_thinking"),
        ({"messages": [{"role": "user", "content": "hi", "name": "Tom"}]}, "messages[0].name"),
        (
            {"messages": [{"role": "user", "content": "hi", "tool_call_id": "x"}]},
            "messages[0].tool_call_id",
        ),
        (
            {"messages": [{"role": "user", "content": "hi", "reasoning_content": "x"}]},
            "messages[0]",
        ),
        ({"messages": HI, "tool_choice": "required"}, "unknown field 'tool_choice'"),
    ],
)
def test_bad_chat_fields_get_400_naming_the_field(server: str, body: dict, field: str) -> None:
    res = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert res.status_code == 400, res.text
    assert field in res.json()["error"]["message"]


def test_neutral_values_and_the_whole_seed_range_are_accepted(client: openai.OpenAI) -> None:
    for seed in (-(2**63), -1, 2**64 - 1):
        assert greedy(client, "Tom", max_tokens=2, seed=seed)
    out = client.chat.completions.create(
        model="tiny-model",
        messages=HI,
        max_tokens=2,
        response_format={"type": "text"},
        extra_body={"tool_choice": None, "chat_template_kwargs": {}},
    )
    assert out.choices[0].message.content is not None


@pytest.mark.parametrize("thinking", [None, False, True])
def test_chat_prompt_is_the_one_transformers_builds(
    client: openai.OpenAI, ckpt: Path, thinking: bool | None
) -> None:
    from transformers import AutoTokenizer

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who is Tom?"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "And Lily?"},
    ]
    options = {} if thinking is None else {"enable_thinking": thinking}
    ids = AutoTokenizer.from_pretrained(ckpt).apply_chat_template(
        messages, add_generation_prompt=True, return_dict=False, **options
    )
    chat = client.chat.completions.create(
        model="tiny-model",
        messages=messages,
        max_tokens=8,
        temperature=0,
        extra_body={"chat_template_kwargs": options, "ignore_eos": True},
    )
    assert chat.usage.prompt_tokens == len(ids)
    same = greedy(client, ids, max_tokens=8, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == same


def test_bad_chat_requests_and_malformed_json(server: str) -> None:
    res = httpx.post(
        f"{server}/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}
    )
    assert res.status_code == 400 and "messages[0].role" in res.json()["error"]["message"]
    res = httpx.post(f"{server}/v1/chat/completions", json={"messages": []})
    assert res.status_code == 400 and "messages" in res.json()["error"]["message"]
    res = httpx.post(
        f"{server}/v1/completions",
        content=b'{"prompt": "hi",',
        headers={"Content-Type": "application/json"},
    )
    assert res.status_code == 400 and "not valid JSON" in res.json()["error"]["message"]
    for content, expected in ((b"[1, 2]", "JSON object"), (b"", "empty")):
        res = httpx.post(
            f"{server}/v1/completions",
            content=content,
            headers={"Content-Type": "application/json"},
        )
        assert res.status_code == 400 and expected in res.json()["error"]["message"]
    res = httpx.get(f"{server}/v1/nothing-here")
    assert res.status_code == 404 and "/v1/nothing-here" in res.json()["error"]["message"]


def test_unknown_model_is_404_and_the_server_stays_up(client: openai.OpenAI, server: str) -> None:
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(
            model="tiny-model", messages=[{"role": "user", "content": "hi"}], temperature=9
        )
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    assert greedy(client, "Tom", max_tokens=3)


def test_sixteen_concurrent_requests_are_all_answered(client: openai.OpenAI, server: str) -> None:
    prompts = [f"Tom saw {i} red balls" * (1 + i % 3) for i in range(16)]
    alone = [greedy(client, p, max_tokens=10) for p in prompts[:4]]

    async def one(aclient: openai.AsyncOpenAI, i: int) -> str:
        if i % 2:
            stream = await aclient.completions.create(
                model="tiny-model", prompt=prompts[i], max_tokens=10, temperature=0, stream=True
            )
            return "".join([c.choices[0].text async for c in stream])
        out = await aclient.completions.create(
            model="tiny-model", prompt=prompts[i], max_tokens=10, temperature=0
        )
        return out.choices[0].text

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=f"{server}/v1", api_key="unused", max_retries=0
        ) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(16)))

    texts = asyncio.run(main())
    assert all(texts)
    assert texts[:4] == alone  # batched with others, a greedy answer is the same as alone


def test_streamed_events_stay_whole_for_line_readers_that_split_on_unicode_breaks(
    server: str,
) -> None:
    """U+0085, U+2028 and U+2029 are legal raw in JSON but end a line for str.splitlines, and so
    for httpx's iter_lines: an echoed prompt holding them still comes as whole events."""
    prompt = "Tom\x85 saw\u2028 the\u2029 cat"
    body = {"prompt": prompt, "max_tokens": 3, "echo": True, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as res:
        lines = [line for line in res.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert text.startswith(prompt)


def test_disconnect_mid_stream_stops_generation(server: str) -> None:
    before = httpx.get(f"{server}/health").json()
    body = {"prompt": "Once", "max_tokens": CAP, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as res:
        lines = res.iter_lines()
        received = [next(lines) for _ in range(6)]  # a few events, then hang up
    assert any(line.startswith("data: {") for line in received)
    health = httpx.get(f"{server}/health").json()
    while health["running"] or health["waiting"]:  # the worker drops the request at its next step
        health = httpx.get(f"{server}/health").json()
    assert health["cancelled"] == before["cancelled"] + 1
    assert health["generated_tokens"] - before["generated_tokens"] < CAP


def test_a_short_request_is_not_stuck_behind_a_long_one(server: str) -> None:
    long_body = {"prompt": "Once", "max_tokens": CAP, "ignore_eos": True, "stream": True, "seed": 1}
    with httpx.stream("POST", f"{server}/v1/completions", json=long_body, timeout=60) as res:
        lines = res.iter_lines()
        next(lines)  # the long request is decoding
        short = httpx.post(f"{server}/v1/completions", json={"prompt": "Tom", "max_tokens": 4})
        assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] <= 4
        assert httpx.get(f"{server}/health").json()["running"] == 1  # the long one goes on
        finishes = [
            json.loads(line[6:])["choices"][0]["finish_reason"] for line in lines if "{" in line
        ]
    assert finishes[-1] == "length"
