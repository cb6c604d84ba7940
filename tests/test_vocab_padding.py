"""Vocabulary padding: a tokenizer the project trains gets a model vocabulary padded up to a
multiple of 64; the export stays a transformers model (same logits), GGUF marks the padding rows
unused, val_bpb counts them as 0 bytes, and neither generation nor the server ever gives a
padding id any probability."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import pytest
import torch
from fastapi.testclient import TestClient
from test_trainer_support import make_trainer, small_run_overrides, write_corpus

from data.tokenizer_training import train_tokenizer
from qwen3 import Qwen3, Qwen3Config, Qwen3Tokenizer, Sampling, generate, stream_generate
from qwen3.gguf import export_gguf
from serving.app import create_app
from serving.served_model import load_served_model


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Qwen3, Qwen3Tokenizer, dict]:
    """Two steps of a run whose tokenizer (vocab 400 asked) is trained here."""
    tmp = tmp_path_factory.mktemp("padded")
    corpus = write_corpus(tmp / "play.txt")
    run = [o for o in small_run_overrides(tmp, corpus) if not o.startswith("model.vocab_size")]
    trainer = make_trainer(
        [*run, "model.vocab_size=400", "trainer.max_steps=2", "trainer.eval_every=0"],
        tmp / "run",
    )
    trainer.fit()
    return tmp / "run" / "latest", trainer.parts.model, trainer.parts.data.tokenizer, trainer


def test_a_trained_tokenizer_s_model_vocabulary_is_padded_to_64(trained_run) -> None:
    _, model, tokenizer, trainer = trained_run
    assert tokenizer.vocab_size == 400
    assert model.config.vocab_size == 448  # 7 x 64
    assert model.model.embed_tokens.weight.shape[0] == 448
    # val_bpb: the padding rows have no text (0 bytes); the real ids keep their lengths.
    token_bytes = trainer.parts.token_bytes
    assert token_bytes.shape == (448,)
    assert token_bytes[:400].tolist() == tokenizer.token_byte_lengths()
    assert token_bytes[400:].eq(0).all()
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["val_bpb"]) and metrics["val_bpb"] > 0


def test_a_given_tokenizer_is_used_as_is(tmp_path) -> None:
    corpus = write_corpus(tmp_path / "play.txt")
    tokenizer = train_tokenizer(corpus.read_text().split("\n\n"), 400)
    tokenizer.save(tmp_path / "tok")
    run = [o for o in small_run_overrides(tmp_path, corpus) if not o.startswith("model.vocab")]
    trainer = make_trainer(
        [*run, "model.vocab_size=512", f"data.tokenizer={tmp_path / 'tok'}"], tmp_path / "run"
    )
    assert trainer.parts.model.config.vocab_size == 400


def test_the_padded_export_is_a_transformers_model_with_the_same_logits(trained_run) -> None:
    from transformers import AutoModelForCausalLM

    ckpt, _, _, _ = trained_run
    hf = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32)
    assert hf.config.vocab_size == 448
    x = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = Qwen3.from_pretrained(ckpt)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), rtol=1e-4, atol=1e-4)


def test_gguf_marks_the_padding_rows_unused(trained_run, tmp_path) -> None:
    ckpt, _, _, _ = trained_run
    reader = gguf.GGUFReader(export_gguf(ckpt, tmp_path / "m.gguf"))
    field = reader.fields["tokenizer.ggml.token_type"]
    types = [int(field.parts[i][0]) for i in field.data]
    assert len(types) == 448
    assert all(t == gguf.TokenType.UNUSED for t in types[400:])
    assert all(t != gguf.TokenType.UNUSED for t in types[:400])


def padding_heavy_model(tmp: Path) -> tuple[Path, Qwen3, Qwen3Tokenizer]:
    """A checkpoint whose real tokens all score 0 and whose padding rows score far higher for
    most hidden states: unmasked, greedy decoding picks padding ids."""
    tokenizer = train_tokenizer(write_corpus(tmp / "c.txt").read_text().split("\n\n"), 300)
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_id,
    )
    model = Qwen3(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[: tokenizer.vocab_size] = 0
        model.lm_head.weight[tokenizer.vocab_size :] *= 500
    model.save_pretrained(tmp / "ckpt")
    tokenizer.save(tmp / "ckpt")
    return tmp / "ckpt", model, tokenizer


def test_generation_never_samples_a_padding_id(tmp_path) -> None:
    _, model, tokenizer = padding_heavy_model(tmp_path)
    v = tokenizer.vocab_size
    prompts = [tokenizer.encode("ROMEO: the"), tokenizer.encode("a")]
    greedy = Sampling(20, temperature=0)
    # The test can fail: without the limit the padding rows win.
    assert any(t >= v for row in generate(model, prompts, greedy) for t in row)
    assert all(t < v for row in generate(model, prompts, greedy, vocab_size=v) for t in row)
    sampled = generate(model, prompts * 4, Sampling(30, temperature=1.5, seed=0), vocab_size=v)
    assert all(0 <= t < v for row in sampled for t in row)
    streamed = list(stream_generate(model, prompts[0], Sampling(30, top_p=0.99), vocab_size=v))
    assert all(t < v for t in streamed)


def test_the_server_gives_padding_ids_no_probability(tmp_path) -> None:
    ckpt, _, tokenizer = padding_heavy_model(tmp_path)
    uniform = -math.log(tokenizer.vocab_size)  # every real token scores 0: uniform over them
    app = create_app(load_served_model(ckpt, device="cpu"), threads=1)
    prompt = tokenizer.encode("ROMEO: the king")
    with TestClient(app) as client:
        body = {"model": "ckpt", "prompt": prompt, "max_tokens": 8, "logprobs": 2, "echo": True}
        r = client.post("/v1/completions", json={**body, "temperature": 1.0, "seed": 0})
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        # Echoed prompt positions (after the first) and the 8 generated ones: all uniform over
        # the real vocabulary, so the padding rows took no probability mass anywhere.
        scores = lp["token_logprobs"][1:]
        assert len(scores) == len(prompt) - 1 + 8
        assert scores == pytest.approx([uniform] * len(scores), abs=1e-4)
        assert r.json()["usage"]["completion_tokens"] == 8
