"""Qwen3Tokenizer: training, save/load round trip, transformers parity, Qwen chat format."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer
from tokenizers.models import BPE

from data.errors import DataError
from data.tokenizer_training import MIN_VOCAB_SIZE, check_tokenizer_fits, train_tokenizer
from qwen3.tokenizer import SPECIAL_TOKENS, Qwen3Tokenizer

WORDS = [
    "the",
    "king",
    "queen",
    "sword",
    "crown",
    "night",
    "day",
    "love",
    "death",
    "speak",
    "hear",
    "lord",
    "lady",
    "fair",
    "foul",
]

SAMPLES = [
    "Hello world!\n\nROMEO:\nBut soft, what light through yonder window breaks?",
    "<|im_start|>user\nhi<|im_end|>\n<think>\nhmm\n</think>\n\nok<|endoftext|>",
    "café  naïve \t tabs\r\nnumbers 1234567 unicode 日本語 emoji 😀 it's we'll",
    "",
]


def _corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> Qwen3Tokenizer:
    return train_tokenizer(_corpus(), 400)


@pytest.fixture(scope="module")
def saved(tok: Qwen3Tokenizer, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("tok")
    tok.save(path)
    return path


def test_special_tokens_and_vocab(tok: Qwen3Tokenizer) -> None:
    assert tok.vocab_size <= 400
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS[:3]] == [0, 1, 2]
    assert tok.eos_id == 0 and tok.im_start_id == 1 and tok.im_end_id == 2
    assert {tok.token_to_id("<think>"), tok.token_to_id("</think>")} == {
        tok.vocab_size - 2,
        tok.vocab_size - 1,
    }
    # each special token encodes to its single id, inside running text too
    for t in SPECIAL_TOKENS:
        assert tok.encode(t) == [tok.token_to_id(t)]
        assert tok.encode(f"queen{t}king").count(tok.token_to_id(t)) == 1
    # training learned merges: common words are single tokens
    assert len(tok.encode(" queen")) == 1


def test_encode_decode_round_trip(tok: Qwen3Tokenizer) -> None:
    for text in SAMPLES:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]
    # control tokens are dropped by skip_special_tokens; the think tags stay (as in Qwen3)
    ids = tok.encode(SAMPLES[1])
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi\n<think>\nhmm\n</think>\n\nok"


def test_save_load_round_trip(tok: Qwen3Tokenizer, saved) -> None:
    names = {p.name for p in saved.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    again = Qwen3Tokenizer.from_dir(saved)
    assert again.vocab_size == tok.vocab_size
    for text in SAMPLES:
        assert again.encode(text) == tok.encode(text)
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and "chat_template" in config


def test_transformers_autotokenizer_parity(tok: Qwen3Tokenizer, saved) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(saved)
    assert len(hf) == tok.vocab_size
    assert hf.eos_token_id == tok.eos_id and hf.pad_token_id == tok.eos_id
    texts = [*SAMPLES, " ".join(_corpus(5, seed=3))]
    for text in texts:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == tok.decode(ids)
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nplan\n</think>\n\nHello!"},
        {"role": "user", "content": "Bye"},
    ],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "add them"},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
]


def _thinking(value: bool | None) -> dict[str, bool]:
    """Template options for enable_thinking: unset (None), or true/false."""
    return {} if value is None else {"enable_thinking": value}


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("thinking", [None, False, True])
@pytest.mark.parametrize("gen", [False, True])
def test_chat_template_matches_transformers(tok, saved, messages, thinking, gen) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(saved)
    ours = Qwen3Tokenizer.from_dir(saved)
    text = ours.apply_chat_template(messages, add_generation_prompt=gen, **_thinking(thinking))
    theirs = hf.apply_chat_template(
        messages, add_generation_prompt=gen, return_dict=False, **_thinking(thinking)
    )
    assert ours.encode(text) == theirs


def test_chat_format_is_qwen(tok: Qwen3Tokenizer) -> None:
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    opened = (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    )
    # As the official Qwen3 template: the empty think block only when thinking is turned off.
    assert tok.apply_chat_template(msgs) == opened
    assert tok.apply_chat_template(msgs, enable_thinking=True) == opened
    no_think = tok.apply_chat_template(msgs, enable_thinking=False)
    assert no_think == opened + "<think>\n\n</think>\n\n"
    history = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<think>\nold thoughts\n</think>\n\nA"},
        {"role": "user", "content": "b"},
    ]
    text = tok.apply_chat_template(history, add_generation_prompt=False)
    assert "old thoughts" not in text and "<|im_start|>assistant\nA<|im_end|>\n" in text
    # the rendered prompt tokenizes with the control tokens as single ids
    ids = tok.encode(text)
    assert ids.count(tok.im_start_id) == 3 and ids.count(tok.im_end_id) == 3


def test_chat_template_rejects_bad_messages_and_options(tok: Qwen3Tokenizer) -> None:
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"role": "wizard", "content": "x"}])
    with pytest.raises(ValueError, match="at least one"):
        tok.apply_chat_template([])
    assert tok.chat_template_options == {"enable_thinking"}
    with pytest.raises(ValueError, match="no option 'enable_thinkin'.*enable_thinking"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], enable_thinkin=False)


# A template of another model family: it reads its own option and raises on a bad conversation.
OTHER_TEMPLATE = (
    "{% if messages[-1]['role'] != 'user' %}{{ raise_exception('last must be user') }}{% endif %}"
    "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] | tojson }}\n{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT]{% if brief %} (brief){% endif %}{% endif %}"
)


@pytest.mark.parametrize("where", ["chat_template.jinja", "config string", "config list"])
def test_the_template_saved_in_the_directory_is_the_one_rendered(tok, tmp_path, where) -> None:
    from transformers import AutoTokenizer

    tok.save(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    if where == "chat_template.jinja":
        (tmp_path / "chat_template.jinja").write_text(OTHER_TEMPLATE)
    else:
        other = [{"name": "default", "template": OTHER_TEMPLATE}, {"name": "x", "template": "-"}]
        config["chat_template"] = OTHER_TEMPLATE if where == "config string" else other
        config_file.write_text(json.dumps(config))
    ours = Qwen3Tokenizer.from_dir(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert ours.chat_template_options == {"brief"}
    messages = [{"role": "system", "content": 'say "ü"'}, {"role": "user", "content": "hi"}]
    for options in ({}, {"brief": True}):
        text = ours.apply_chat_template(messages, **options)
        assert text == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **options
        )
    assert '[SYSTEM] "say \\"ü\\""' in text  # tojson as transformers: quotes escaped, not ü
    with pytest.raises(ValueError, match="last must be user"):
        ours.apply_chat_template([{"role": "assistant", "content": "x"}])
    # Saving keeps the template it was loaded with.
    ours.save(tmp_path / "again")
    assert Qwen3Tokenizer.from_dir(tmp_path / "again").chat_template == OTHER_TEMPLATE


def test_vocab_too_small_for_specials() -> None:
    with pytest.raises(DataError, match=f"at least {MIN_VOCAB_SIZE}"):
        train_tokenizer(["some text"], 100)


def test_tokenizer_larger_than_model_vocab(tok: Qwen3Tokenizer) -> None:
    with pytest.raises(DataError, match="model.vocab_size"):
        check_tokenizer_fits(tok, tok.vocab_size - 1, "test")
    check_tokenizer_fits(tok, tok.vocab_size, "test")


def test_from_dir_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Qwen3Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Qwen3Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="special tokens"):
        Qwen3Tokenizer(Tokenizer(BPE()))


def test_a_broken_saved_template_is_one_clear_error(tok: Qwen3Tokenizer, tmp_path) -> None:
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="tokenizer_config.json is not a JSON object"):
        Qwen3Tokenizer.from_dir(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}")
    broken = Qwen3Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="chat template is not valid Jinja"):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])
