"""The schema at /openapi.json tells the truth: every status the server sends is documented with
its body, the model's limits are in it, and schemathesis (every check on) finds nothing against a
real server, with and without an API key."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_serve_support import build_tiny_checkpoint

from serving.launch import serve_in_subprocess

KEY = "sk-schema-test"
CAP = 64
CONTEXT = 2048  # long enough that generated text prompts do not fill it


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("schema") / "tiny-model", CONTEXT)


@pytest.fixture(scope="module", params=["open", "with-key"])
def server(request: pytest.FixtureRequest, ckpt: Path) -> Iterator[tuple[str, str | None]]:
    key = KEY if request.param == "with-key" else None
    extra = ("--api-key", KEY) if key else ()
    with serve_in_subprocess(ckpt, "--max-tokens-cap", str(CAP), *extra) as url:
        yield url, key


def test_schema_documents_errors_and_limits(server: tuple[str, str | None]) -> None:
    url, key = server
    schema = httpx.get(f"{url}/openapi.json").json()
    paths, components = schema["paths"], schema["components"]["schemas"]
    expected = {
        ("post", "/v1/completions"): {"200", "400", "404", "413", "429", "500"},
        ("post", "/v1/chat/completions"): {"200", "400", "404", "413", "429", "500"},
        ("get", "/v1/models"): {"200"},
        ("get", "/v1/models/{model_id}"): {"200", "404"},
    }
    for (method, path), statuses in expected.items():
        operation = paths[path][method]
        responses = operation["responses"]
        assert set(responses) == statuses | ({"401"} if key else set()), path
        for status in set(responses) - {"200"}:
            body = responses[status]["content"]["application/json"]["schema"]
            assert body == {"$ref": "#/components/schemas/ErrorResponse"}
        assert ("security" in operation) == bool(key)
    assert "HTTPValidationError" not in components
    assert paths["/v1/completions"]["post"]["responses"]["429"]["headers"]["Retry-After"]
    assert "security" not in paths["/health"]["get"]

    vocab = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
    assert vocab["data"][0]["max_tokens_cap"] == CAP
    props = components["CompletionRequest"]["properties"]
    assert {"type": "integer", "minimum": 0, "maximum": CAP} in props["max_tokens"]["anyOf"]
    token_ids = next(b for b in props["prompt"]["anyOf"] if b.get("items", {}).get("minimum") == 0)
    assert token_ids["maxItems"] == CONTEXT - 1 and token_ids["minItems"] == 1
    chat = components["ChatCompletionRequest"]
    assert chat["properties"]["logprobs"]["anyOf"][0] == {"type": "boolean"}
    assert props["logprobs"]["anyOf"][0]["type"] == "integer"
    kwargs = chat["properties"]["chat_template_kwargs"]["anyOf"][0]
    assert kwargs["properties"]["enable_thinking"] == {"type": "boolean"}
    assert kwargs["additionalProperties"] is False


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/completions", {"prompt": "hi", "logprobs": False}, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "echo": 1}, "echo"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": 1},
            "logprobs",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
            "top_logprobs",
        ),
    ],
)
def test_json_types_are_taken_as_the_schema_says(
    server: tuple[str, str | None], path: str, body: dict, field: str
) -> None:
    """`logprobs: false` is not the integer 0 (OpenAI's completions want an integer there),
    `1` is not true, `"5"` is not 5; 5.0 is an integer, as in JSON Schema."""
    url, key = server
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    res = httpx.post(url + path, json=body, headers=headers)
    assert res.status_code == 400, res.text
    assert field in res.json()["error"]["message"]
    ok = httpx.post(
        f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2.0, "n": 1.0}, headers=headers
    )
    assert ok.status_code == 200, ok.text


@pytest.mark.slow
def test_schemathesis_finds_nothing(server: tuple[str, str | None], tmp_path: Path) -> None:
    """Every check schemathesis has (status codes, content types, headers, response bodies,
    schema-valid requests accepted, invalid ones refused, auth enforced, no server error)."""
    url, key = server
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if cli is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    auth = ["-H", f"Authorization: Bearer {key}"] if key else []
    result = subprocess.run(
        [
            cli,
            "run",
            f"{url}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            "100",
            "--seed",
            "1",
            "--workers",
            "1",
            "--report-dir",
            str(tmp_path),
            *auth,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-20_000:] + result.stderr
    assert "No issues found" in result.stdout or "passed" in result.stdout
