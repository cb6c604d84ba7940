"""Log-probabilities in serve.py's API: a real server on loopback, checked against transformers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from test_serve_support import build_tiny_checkpoint

from qwen3.tokenizer import Qwen3Tokenizer
from serving.launch import serve_in_subprocess
from serving.logprobs import TokenNames

CONTEXT = 64


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("logprobs") / "tiny", CONTEXT)


@pytest.fixture(scope="module")
def server(ckpt: Path) -> Iterator[str]:
    with serve_in_subprocess(ckpt) as url:
        yield url


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(ckpt: Path):
    """transformers' Qwen3 on the same checkpoint, float32: the log-probabilities to match."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:  # (T, V): the distribution after each token
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)

    return logprobs


def test_echo_scores_the_prompt_as_transformers_does(
    client: openai.OpenAI, ckpt: Path, reference
) -> None:
    tokenizer = Qwen3Tokenizer.from_dir(ckpt)
    ids = [tokenizer.encode("Tom saw a big red ball."), tokenizer.encode("Lily smiled and ran")]
    out = client.completions.create(
        model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=3, temperature=0
    )
    assert out.usage.completion_tokens == 0
    for choice, prompt in zip(sorted(out.choices, key=lambda c: c.index), ids, strict=True):
        lp = choice.logprobs
        assert choice.finish_reason == "length" and len(lp.tokens) == len(prompt)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        want = reference(prompt)
        for i in range(1, len(prompt)):
            assert lp.token_logprobs[i] == pytest.approx(want[i - 1, prompt[i]].item(), abs=1e-5)
            top = want[i - 1].topk(3).values.tolist()
            got = sorted(lp.top_logprobs[i].values(), reverse=True)
            assert got[:3] == pytest.approx(top, abs=1e-5)  # the chosen one may be a 4th
        # text_offset points into the echoed text, which is the prompt's (ASCII: one name each)
        assert choice.text == "".join(lp.tokens)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(prompt))]


def test_lm_eval_request_shape_and_a_prompt_filling_the_context(server: str, reference) -> None:
    # What lm-eval's local-completions sends for a log-likelihood request.
    prompt = [20, 21, 22, 23]
    body = {"prompt": [prompt], "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}
    res = httpx.post(f"{server}/v1/completions", json={**body, "seed": 1234}, timeout=60)
    choice = res.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(prompt) + 1  # the prompt, then one new token
    want = reference(prompt)
    greedy = int(want[-1].argmax())
    assert lp["token_logprobs"][-1] == pytest.approx(want[-1, greedy].item(), abs=1e-5)
    assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())
    # Scoring only may use the whole context; generating needs room for one token.
    full = {"prompt": [7] * CONTEXT, "max_tokens": 0, "echo": True, "logprobs": 0}
    res = httpx.post(f"{server}/v1/completions", json=full, timeout=60)
    assert res.status_code == 200 and len(res.json()["choices"][0]["logprobs"]["tokens"]) == CONTEXT
    res = httpx.post(f"{server}/v1/completions", json={**full, "max_tokens": 1}, timeout=60)
    assert res.status_code == 400 and "context" in res.json()["error"]["message"]


def ids_of(ckpt: Path, names: list[str]) -> list[int]:
    """Token ids back from the names the API shows (each token's name is its own)."""
    tokenizer = Qwen3Tokenizer.from_dir(ckpt)
    name = TokenNames(tokenizer)
    by_name = {name(i)[0]: i for i in range(tokenizer.vocab_size)}
    assert len(by_name) == tokenizer.vocab_size
    return [by_name[n] for n in names]


def test_generated_logprobs_are_the_model_s_before_temperature_and_filters(
    client: openai.OpenAI, ckpt: Path, reference
) -> None:
    prompt = [40, 41, 42]
    settings = {"temperature": 1.7, "top_p": 0.9, "seed": 3, "max_tokens": 8}
    extra = {"top_k": 20, "ignore_eos": True}
    out = client.completions.create(
        model="tiny", prompt=prompt, logprobs=2, **settings, extra_body=extra
    )
    plain = client.completions.create(model="tiny", prompt=prompt, **settings, extra_body=extra)
    assert plain.choices[0].text == out.choices[0].text  # asking for logprobs changes nothing
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == out.usage.completion_tokens == 8
    new = ids_of(ckpt, lp.tokens)
    want = reference(prompt + new)
    for j, token in enumerate(new):
        row = want[len(prompt) - 1 + j]
        assert lp.token_logprobs[j] == pytest.approx(row[token].item(), abs=1e-4)
        top2 = row.topk(2).values.tolist()
        assert sorted(lp.top_logprobs[j].values(), reverse=True)[:2] == pytest.approx(
            top2, abs=1e-4
        )
    assert lp.text_offset[0] == 0


def test_streamed_logprobs_equal_the_whole_answer(client: openai.OpenAI) -> None:
    body = {"prompt": "Tom saw", "max_tokens": 10, "temperature": 0, "logprobs": 1, "echo": True}
    whole = client.completions.create(model="tiny", **body).choices[0]
    tokens, offsets, text = [], [], ""
    for chunk in client.completions.create(model="tiny", stream=True, **body):
        choice = chunk.choices[0]
        text += choice.text
        if choice.logprobs:
            tokens += choice.logprobs.tokens
            offsets += choice.logprobs.text_offset
    assert text == whole.text and text.startswith("Tom saw")
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset


def test_chat_logprobs_in_the_chat_format(client: openai.OpenAI, ckpt: Path, reference) -> None:
    messages = [{"role": "user", "content": "Who is Tom?"}]
    out = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    tokenizer = Qwen3Tokenizer.from_dir(ckpt)
    raw = b"".join(bytes(t.bytes) for t in content)
    assert raw.decode("utf-8", errors="replace") == out.choices[0].message.content
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    new = ids_of(ckpt, [t.token for t in content])
    want = reference(prompt + new)
    for j, t in enumerate(content):
        assert len(t.top_logprobs) == 3 and t.token == t.top_logprobs[0].token  # greedy
        assert t.logprob == pytest.approx(want[len(prompt) - 1 + j].max().item(), abs=1e-4)
    streamed = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    entries = [
        e
        for c in streamed
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in entries] == [t.token for t in content]
    assert all(e.top_logprobs == [] for e in entries)  # top_logprobs unset: none


def test_partial_characters_are_named_by_their_bytes(ckpt: Path) -> None:
    tokenizer = Qwen3Tokenizer.from_dir(ckpt)
    name = TokenNames(tokenizer)
    ids = tokenizer.encode("猫 Tom<|im_end|>")
    names = [name(i) for i in ids]
    assert b"".join(bytes(raw) for _, raw in names).decode() == "猫 Tom<|im_end|>"
    assert names[0][0] == "bytes:\\xe7" and names[-1][0] == "<|im_end|>"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("completions", {"prompt": "hi", "logprobs": 6}, "logprobs"),
        ("completions", {"prompt": "hi", "logprobs": -1}, "logprobs"),
        ("completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens=0"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
            "top_logprobs",
        ),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
    ],
)
def test_bad_logprobs_requests_get_400_naming_the_field(
    server: str, path: str, body: dict, field: str
) -> None:
    res = httpx.post(f"{server}/v1/{path}", json=body, timeout=60)
    assert res.status_code == 400, res.text
    assert field in res.json()["error"]["message"]
