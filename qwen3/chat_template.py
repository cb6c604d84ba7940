"""The chat template: Qwen3's (without tool calls) and how any saved one is read and rendered.

Rendering follows transformers' `apply_chat_template` (same Jinja environment and inputs), so a
prompt built here has the same ids as one built by transformers, vLLM or lm-eval from the same
tokenizer directory.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The Qwen3 chat template without tool calls: saved with every tokenizer we write, and the one
# source of every chat prompt (rendered as transformers renders it, so both build the same ids).
CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(found=false, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}"
    "{%- if message.role == 'user' and not ns.found %}"
    "{%- set ns.found = true %}"
    "{%- set ns.last_query_index = (messages|length - 1) - loop.index0 %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- set content = message.content if message.content is string else '' %}"
    "{%- set reasoning = '' %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- if message.reasoning_content is string %}"
    "{%- set reasoning = message.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}"
    "{{- '<|im_start|>assistant\\n' + content }}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# Variables every chat template receives; anything else a template reads is an option to pass.
TEMPLATE_INPUTS = frozenset({"messages", "add_generation_prompt", "tools", "documents"})
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where recent transformers save the template


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@lru_cache(maxsize=1)
def _chat_environment() -> ImmutableSandboxedEnvironment:
    """The Jinja environment transformers renders chat templates in: sandboxed, because a
    template that came with a downloaded tokenizer is untrusted code, with its options and helpers."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@lru_cache(maxsize=8)
def compile_chat_template(source: str) -> tuple[jinja2.Template, frozenset[str]]:
    """The compiled template and the names it reads from its caller."""
    env = _chat_environment()
    try:
        names = jinja2.meta.find_undeclared_variables(env.parse(source))
        return env.from_string(source), frozenset(names - set(env.globals))
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(
            f"the tokenizer's chat template is not valid Jinja ({err}); fix or remove it"
        ) from err


def read_chat_template(path: Path) -> str | None:
    """The chat template saved in a tokenizer directory (`chat_template.jinja`, else the
    `chat_template` of tokenizer_config.json: one string, or named ones of which "default")."""
    if (path / CHAT_TEMPLATE_FILE).is_file():
        return (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    config_file = path / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    try:
        template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{config_file} is not a JSON object ({err}); re-create it") from err
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
