"""`train.py sft` under torchrun on CPU (gloo): 2 processes (DDP, and FSDP with
trainer.fsdp=true) fine-tune a small pretraining run's checkpoint as 1 process does with the same
global batch: the same train losses, the same held-out assistant-token metrics, and a saved
checkpoint that loads with the one process's weights."""

from __future__ import annotations

import pytest
from test_distributed_support import run_torchrun
from test_sft_cli import write_chats
from test_trainer_support import read_metrics, run_train, small_run_overrides, write_corpus

from qwen3 import Qwen3
from qwen3.tokenizer import Qwen3Tokenizer

pytestmark = pytest.mark.slow
STEPS = 4
VAL = ("val_loss", "val_acc", "val_ppl", "val_bpb")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A pretraining run (the small model, a few steps), the SFT overrides, and the one-process
    reference: 4 rows x 2 micro-batches per step, the global batch of 2 processes x 4 rows."""
    tmp = tmp_path_factory.mktemp("sft-dist")
    corpus = write_corpus(tmp / "play.txt")
    pre = [*small_run_overrides(tmp, corpus), "trainer.max_steps=6", "trainer.eval_every=0"]
    pre = [o for o in pre if not o.startswith("model.max_position_embeddings")]
    res = run_train(tmp, *pre, "model.max_position_embeddings=256", "run_name=pretrain")
    assert res.returncode == 0, res.stderr
    chats = write_chats(tmp / "chats.jsonl", val=16, train=120)
    sft = [
        "sft",
        "sft=local",
        f"sft.paths=[{chats}]",
        "sft.val_conversations=16",
        f"data.cache_dir={tmp / 'cache'}",
        f"out_dir={tmp / 'runs'}",
        "trainer.device=cpu",
        "trainer.seq_len=128",
        f"trainer.max_steps={STEPS}",
        "trainer.eval_every=2",
        "trainer.eval_batches=3",  # 2 ranks: one runs a discarded extra forward
        "trainer.save_every=2",
        "trainer.log_every=1",
        "trainer.peak_flops=1e11",
        "trainer.num_threads=1",
        "sample.max_new_tokens=0",
        "wandb.mode=disabled",
        # the tolerances of tests/test_distributed_support.py's runs, at their learning rate
        "optim.lr=3e-3",
        "optim.adamw_lr=3e-3",
        # float32 Newton-Schulz and matmuls: bf16's (the defaults where a CPU has native bf16)
        # round differently in FSDP's sharded step than in one process's, 3e-4 to 5e-4 apart
        # after these steps
        "optim.ns_dtype=float32",
        "trainer.precision=fp32",
    ]
    ref = run_train(tmp, *sft, "run_name=ref", "trainer.batch_size=4", "trainer.grad_accum=2")
    assert ref.returncode == 0, ref.stderr
    return tmp, sft


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_fine_tune_as_one(setup, fsdp, tmp_path) -> None:
    """The 2 ranks also tokenize the conversations into a cache of their own (both build it,
    the first to finish publishes it), and sample from the chat model at the end."""
    tmp, sft = setup
    name = "fsdp" if fsdp else "ddp"
    res = run_torchrun(
        tmp,
        2,
        *sft,
        f"run_name={name}",
        "trainer.batch_size=4",
        f"trainer.fsdp={fsdp}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "sample.max_new_tokens=4",
    )
    assert res.returncode == 0, res.stderr[-5000:]
    assert "x 2 processes" in res.stdout and res.stdout.count("== summary ==") == 1
    assert "== samples ==" in res.stdout and "user: Wherefore art thou Romeo?" in res.stdout
    assert [p.name.startswith("sft-") for p in (tmp_path / "cache").iterdir()] == [True]
    run, ref = tmp / "runs" / name, tmp / "runs" / "ref"
    best = (tmp / "runs" / "pretrain" / "best").resolve()
    assert f"initialised from {best}" in res.stdout

    rows, ref_rows = read_metrics(run), read_metrics(ref)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # rank 0 alone writes
    got = [r["train_loss"] for r in rows]
    assert got == pytest.approx([r["train_loss"] for r in ref_rows], rel=1e-4)
    # Held-out metrics: each rank scores every other val batch, the sums added across ranks.
    val = [r for r in rows if "val_loss" in r]
    ref_val = [r for r in ref_rows if "val_loss" in r]
    assert len(val) == len(ref_val) == STEPS // 2
    for g, w in zip(val, ref_val, strict=True):
        assert [g[k] for k in VAL] == pytest.approx([w[k] for k in VAL], rel=1e-4)

    # The final checkpoint loads (a Hugging Face directory with the chat template) and holds the
    # one process's weights, to the rounding of sums taken in another order (they moved by
    # 2e-3 to 8e-3 from the pretrained ones here).
    ckpt = run / "latest"
    assert "<|im_start|>assistant" in Qwen3Tokenizer.from_dir(ckpt).chat_template
    want = Qwen3.from_pretrained(ref / "latest").state_dict()
    got_weights = Qwen3.from_pretrained(ckpt).state_dict()
    assert sorted(got_weights) == sorted(want)
    for key, w in got_weights.items():
        assert (w - want[key]).abs().max() <= 1e-5, key
