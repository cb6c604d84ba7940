"""The server's chat prompts are transformers' for the same messages and template options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_serve_support import build_tiny_checkpoint

from qwen3.tokenizer import Qwen3Tokenizer
from serving.completions import chat_prompt_ids
from serving.errors import APIError
from serving.schemas import ChatCompletionRequest

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who is Tom?"},
        {"role": "assistant", "content": "<think>\nA cat.\n</think>\n\nA cat."},
        {"role": "user", "content": "And Lily?"},
    ],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "add them"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "again"},
    ],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "system", "content": "later rule"},
        {"role": "user", "content": "c"},
    ],
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("chat") / "tiny")


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("thinking", [None, False, True])
def test_server_prompt_ids_are_transformers(ckpt: Path, messages, thinking) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(ckpt)
    options = {} if thinking is None else {"enable_thinking": thinking}
    body: dict[str, Any] = {"messages": messages}
    if options:
        body["chat_template_kwargs"] = options
    ours = chat_prompt_ids(Qwen3Tokenizer.from_dir(ckpt), ChatCompletionRequest(**body))
    theirs = hf.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=False, **options
    )
    assert ours == theirs


def test_developer_role_and_text_parts_render_as_system_and_text(ckpt: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(ckpt)
    body = ChatCompletionRequest(
        messages=[
            {
                "role": "developer",
                "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
            },
            {"role": "user", "content": "hi", "tool_calls": None},
        ]
    )
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert chat_prompt_ids(Qwen3Tokenizer.from_dir(ckpt), body) == hf.apply_chat_template(
        plain, add_generation_prompt=True, return_dict=False
    )


def test_an_option_the_template_does_not_read_is_refused(ckpt: Path) -> None:
    body = ChatCompletionRequest(
        messages=[{"role": "user", "content": "hi"}],
        chat_template_kwargs={"enable_thinking": False, "thinking_budget": 10},
    )
    with pytest.raises(APIError, match="no option 'thinking_budget'") as err:
        chat_prompt_ids(Qwen3Tokenizer.from_dir(ckpt), body)
    assert err.value.status == 400 and err.value.param == "chat_template_kwargs"
