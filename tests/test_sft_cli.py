"""`train.py sft` end to end through the real command line (slow): it starts from the newest
pretraining run's best, learns the assistant's turns, resumes exactly after SIGKILL, and the
checkpoint it writes answers a chat through our server as transformers does (and its GGUF
keeps the chat template)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train_cli_resume import _start_long_run, _wait_for
from test_trainer_support import (
    read_metrics,
    run_train,
    small_run_overrides,
    write_corpus,
)

from data.conversations import SFTDataConfig, read_conversations
from trainer.checkpoint import load_trainer_state

pytestmark = pytest.mark.slow
STEPS = 12


def write_chats(path: Path, val: int = 24, train: int = 240) -> Path:
    """Conversations from the plays as a local .jsonl: the held-out ones first."""
    chats = list(read_conversations(SFTDataConfig()))
    held = [c for is_val, c in chats if is_val][:val]
    kept = [c for is_val, c in chats if not is_val][:: len(chats) // train][:train]
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in held + kept))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A pretraining run (the small model, a few steps) and the SFT overrides."""
    tmp = tmp_path_factory.mktemp("sft")
    corpus = write_corpus(tmp / "play.txt")
    pre = [*small_run_overrides(tmp, corpus), "trainer.max_steps=6", "trainer.eval_every=0"]
    pre = [o for o in pre if not o.startswith("model.max_position_embeddings")]
    res = run_train(tmp, *pre, "model.max_position_embeddings=256", "run_name=pretrain")
    assert res.returncode == 0, res.stderr
    chats = write_chats(tmp / "chats.jsonl")
    sft = [
        "sft",
        "sft=local",
        f"sft.paths=[{chats}]",
        "sft.val_conversations=24",
        f"data.cache_dir={tmp / 'cache'}",
        f"out_dir={tmp / 'runs'}",
        "trainer.batch_size=4",
        "trainer.seq_len=128",
        "trainer.eval_batches=2",
        "trainer.log_every=1",
        "trainer.peak_flops=1e11",
        "trainer.num_threads=1",
        "optim.schedule=constant",  # losses independent of max_steps: runs can be cut and resumed
        "optim.warmup_steps=0",
        "wandb.mode=disabled",
    ]
    return tmp, sft


def test_sft_starts_from_the_newest_pretraining_run_and_learns_the_assistant(setup) -> None:
    tmp, sft = setup
    res = run_train(tmp, *sft, f"trainer.max_steps={STEPS}", "trainer.eval_every=4", "run_name=a")
    assert res.returncode == 0, res.stderr
    best = (tmp / "runs" / "pretrain" / "best").resolve()
    assert f"initialised from {best}" in res.stdout
    assert "train conversations are longer than trainer.seq_len + 1 = 129 tokens" in res.stdout
    assert "== samples ==" in res.stdout and "user: Wherefore art thou Romeo?" in res.stdout
    rows = [r for r in read_metrics(tmp / "runs" / "a") if "val_loss" in r]
    assert len(rows) == 3 and rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert {"val_acc", "val_ppl", "val_bpb"} <= set(rows[-1])
    # The checkpoint is a Hugging Face directory whose tokenizer carries the chat template.
    config = json.loads((tmp / "runs" / "a" / "best" / "tokenizer_config.json").read_text())
    assert "<|im_start|>assistant" in config["chat_template"]
    # A second `train.py sft` starts again from the pretraining run, not from this SFT run.
    again = run_train(tmp, *sft, "trainer.max_steps=1", "sample.max_new_tokens=0", "run_name=b")
    assert again.returncode == 0 and f"initialised from {best}" in again.stdout


def test_sft_without_a_pretrained_run_says_what_to_run(setup, tmp_path) -> None:
    tmp, sft = setup
    res = run_train(tmp, *sft, f"out_dir={tmp_path / 'empty'}")
    assert res.returncode == 2
    assert "run python train.py model=tiny first, or pass init_from=DIR" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_sft_resumes_after_sigkill_as_if_uninterrupted(setup) -> None:
    tmp, sft = setup
    base = [*sft, "trainer.eval_every=0", "trainer.save_every=4", "sample.max_new_tokens=0"]
    ref = run_train(tmp, *base, f"trainer.max_steps={STEPS}", "run_name=ref")
    assert ref.returncode == 0, ref.stderr
    ref_losses = [r["train_loss"] for r in read_metrics(tmp / "runs" / "ref")]
    run = tmp / "runs" / "killed"
    proc = _start_long_run(tmp, base, "killed")
    _wait_for(proc, lambda: (run / "latest").exists(), tmp, "killed")
    proc.kill()
    proc.wait()
    saved = load_trainer_state(run / "latest")["step"]
    assert 4 <= saved < STEPS
    res = run_train(tmp, *base, f"trainer.max_steps={STEPS}", "run_name=killed", "resume=latest")
    assert res.returncode == 0, res.stderr
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["train_loss"] for r in rows] == ref_losses


def test_the_sft_checkpoint_answers_through_our_server_as_transformers(setup) -> None:
    import openai
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.launch import serve_in_subprocess

    tmp, sft = setup
    res = run_train(tmp, *sft, "trainer.max_steps=4", "sample.max_new_tokens=0", "run_name=chat")
    assert res.returncode == 0, res.stderr
    ckpt = tmp / "runs" / "chat" / "best"
    messages = [
        {"role": "system", "content": "You are Juliet in Shakespeare's Romeo and Juliet."},
        {"role": "user", "content": "Wherefore art thou sad, sweet lady?"},
    ]
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32)
    ids = tok.apply_chat_template(
        messages, add_generation_prompt=True, enable_thinking=False, return_tensors="pt"
    )
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    out = model.generate(
        ids,
        max_new_tokens=24,
        do_sample=False,
        eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id],
    )
    theirs = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    with serve_in_subprocess(ckpt) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=messages,
            max_tokens=24,
            temperature=0,
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        )
    assert answer.choices[0].message.content == theirs and theirs  # greedy: token for token
    # GGUF export keeps the chat template (llama.cpp renders chats with it).
    import gguf

    from qwen3.gguf import export_gguf
    from qwen3.tokenizer import Qwen3Tokenizer

    reader = gguf.GGUFReader(export_gguf(ckpt, tmp / "chat.gguf"))
    template = reader.fields["tokenizer.chat_template"].contents()
    assert template == Qwen3Tokenizer.from_dir(ckpt).chat_template == tok.chat_template


def test_interactive_chats_with_the_newest_sft_checkpoint(setup) -> None:
    import subprocess

    from test_trainer_support import REPO, subprocess_env, train_cmd

    tmp, sft = setup
    res = run_train(tmp, *sft, "trainer.max_steps=2", "sample.max_new_tokens=0", "run_name=talk")
    assert res.returncode == 0, res.stderr
    talk = subprocess.run(
        train_cmd(
            "interactive", f"out_dir={tmp / 'runs'}", "max_new_tokens=6", "system=Be Juliet."
        ),
        input="Good morrow.\n/reset\nWhat news?\n/quit\n",
        cwd=REPO,
        env=subprocess_env(tmp),
        capture_output=True,
        text=True,
    )
    assert talk.returncode == 0, talk.stderr
    assert "runs/talk/" in talk.stdout and "Chat:" in talk.stdout
    assert talk.stdout.count("model> ") == 2
