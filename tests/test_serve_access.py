"""serve.py beyond localhost: the API key, the body-size and queue limits (a real server process)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from test_serve_support import build_tiny_checkpoint

from serve import API_KEY_ENV, is_loopback, parse_args
from serving.launch import SERVE_PY, serve_in_subprocess
from serving.served_model import quantize_device_note

KEY = "sk-test-0123456789"
BODY_LIMIT = 4096
# A request of LONG tokens keeps its row busy for the whole queue test, however fast the machine.
LONG = 60_000


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("access") / "tiny-model", LONG + 64)


@pytest.fixture(scope="module")
def server(ckpt: Path) -> Iterator[str]:
    args = ("--api-key", KEY, "--max-body-bytes", str(BODY_LIMIT), "--max-tokens-cap", str(LONG))
    with serve_in_subprocess(ckpt, *args, "--max-queue", "1", "--max-batch-size", "1") as url:
        yield url


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_v1_needs_the_key_and_health_and_the_page_do_not(server: str) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for method, path, body in [
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/tiny-model", None),
        ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
        ("POST", "/v1/chat/completions", chat),
    ]:
        wrong: list[dict[str, str | bytes]] = [
            {},
            auth("wrong"),
            auth(KEY + "x"),
            auth(KEY[:-1]),
            {"Authorization": f"Basic {KEY}"},
            {"Authorization": b"Bearer \xfc\xff"},  # not ASCII: refused, not a server error
        ]
        for headers in wrong:
            res = httpx.request(method, server + path, headers=headers, json=body)
            assert res.status_code == 401, (path, headers, res.text)
            assert res.headers["WWW-Authenticate"].startswith("Bearer")
            assert res.json()["error"]["code"] == "invalid_api_key"
        ok = httpx.request(method, server + path, headers=auth(), json=body)
        assert ok.status_code == 200, ok.text
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    assert "Qwen3 playground" in httpx.get(server).text
    assert httpx.get(f"{server}/static/app.js").status_code == 200


def test_openai_client_with_and_without_the_key(server: str) -> None:
    good = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model="tiny-model", prompt="Tom", max_tokens=2).choices
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        bad.models.list()


def test_a_body_above_the_limit_is_413_declared_or_streamed(server: str) -> None:
    big = {"prompt": "a" * BODY_LIMIT, "max_tokens": 1}
    res = httpx.post(f"{server}/v1/completions", headers=auth(), json=big)
    assert res.status_code == 413
    error = res.json()["error"]
    assert error["code"] == "request_too_large" and "--max-body-bytes" in error["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server counts what it reads
        data = json.dumps(big).encode()
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    headers = {**auth(), "Content-Type": "application/json"}
    res = httpx.post(f"{server}/v1/completions", headers=headers, content=chunks())
    assert "content-length" not in res.request.headers
    assert res.status_code == 413 and res.json()["error"]["code"] == "request_too_large"
    small = {"prompt": "Once upon a time " * 100, "max_tokens": 1}  # 1.7 kB
    assert httpx.post(f"{server}/v1/completions", headers=auth(), json=small).status_code == 200


def send_without_reading(url: str, body: dict[str, Any]) -> socket.socket:
    """POST `body` on a raw connection and leave the answer unread (a client that waits)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def test_a_full_queue_is_429_with_retry_after(server: str) -> None:
    """--max-batch-size 1 and --max-queue 1: one request decoding, one waiting, the third is
    refused until the queue moves."""
    long_body = {"prompt": "Once", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    url = f"{server}/v1/completions"
    with httpx.stream("POST", url, json=long_body, headers=auth(), timeout=60) as running:
        lines = running.iter_lines()  # kept: a dropped iterator closes the stream
        next(lines)  # decoding
        with contextlib.closing(send_without_reading(server, long_body)):
            health = httpx.get(f"{server}/health").json()
            while health["waiting"] == 0:  # the second one is queued behind the first
                health = httpx.get(f"{server}/health").json()
            res = httpx.post(url, json={"prompt": "hi", "max_tokens": 1}, headers=auth())
            assert res.status_code == 429, res.text
            assert int(res.headers["Retry-After"]) >= 1
            error = res.json()["error"]
            assert error["code"] == "rate_limit_exceeded" and "--max-queue" in error["message"]
            client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model="tiny-model", prompt="hi", max_tokens=1)
    health = httpx.get(f"{server}/health").json()
    while health["running"] or health["waiting"]:  # both hung up; their rows are dropped
        health = httpx.get(f"{server}/health").json()
    res = httpx.post(url, json={"prompt": "hi", "max_tokens": 1}, headers=auth())
    assert res.status_code == 200


def test_api_key_from_the_environment_and_limits_checked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert parse_args([]).api_key == "from-env"
    assert parse_args(["--api-key", "flag"]).api_key == "flag"
    monkeypatch.setenv(API_KEY_ENV, "")
    assert parse_args([]).api_key is None
    for argv, message in [
        (["--api-key", " "], "--api-key must not be empty"),
        (["--api-key", "clé"], "--api-key must be printable ASCII"),
        (["--max-queue", "0"], "--max-queue must be at least 1"),
        (["--max-body-bytes", "0"], "--max-body-bytes must be at least 1"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err


def test_loopback_hosts() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.5", "example.org"]))


def startup_lines(ckpt: Path, *args: str) -> list[str]:
    """serve.py's output up to the line after its URL (then it is stopped)."""
    proc = subprocess.Popen(
        [sys.executable, str(SERVE_PY), "--ckpt", str(ckpt), "--port", "0", *args],
        cwd=SERVE_PY.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if len(lines) >= 2 and lines[-2].startswith("Open http://"):
                break
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return lines


def test_every_interface_without_a_key_warns_and_with_one_does_not(ckpt: Path) -> None:
    out = "".join(startup_lines(ckpt, "--host", "0.0.0.0"))
    assert "warning: listening on 0.0.0.0 without an API key" in out and "--api-key" in out
    out = "".join(startup_lines(ckpt, "--host", "0.0.0.0", "--api-key", KEY))
    assert "warning" not in out and "API key required" in out
    assert KEY not in out  # the key itself is never printed


def test_quantize_on_auto_says_where_it_runs() -> None:
    note = quantize_device_note("int8", "auto", torch.device("cuda"))
    assert note is not None and "CPU" in note and "cuda" in note and "drop --quantize" in note
    assert quantize_device_note("int8", "auto", torch.device("cpu")) is None
    assert quantize_device_note("int8", "cpu", torch.device("cuda")) is None
    assert quantize_device_note(None, "auto", torch.device("cuda")) is None
