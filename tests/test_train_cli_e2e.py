"""End to end on the built-in default corpus: ``train.py`` trains, evaluates, saves, reports,
samples, and the best checkpoint loads in ``transformers``."""

from __future__ import annotations

import pytest
import torch
from test_trainer_support import (
    SMALL_MODEL,
    read_metrics,
    run_train,
    small_run_overrides,
    write_corpus,
)

from qwen3 import Qwen3
from qwen3.tokenizer import Qwen3Tokenizer


def test_short_run_on_the_default_corpus(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    res = run_train(
        tmp_path,
        *SMALL_MODEL,
        "data.max_tokens=60000",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"out_dir={tmp_path / 'runs'}",
        "run_name=e2e",
        "trainer.max_steps=8",
        "trainer.eval_every=4",
        "trainer.batch_size=8",
        "trainer.seq_len=64",
        "trainer.eval_batches=2",
        "trainer.num_threads=1",
        "optim.warmup_steps=2",
        "wandb.mode=offline",
        "sample.max_new_tokens=16",
    )
    assert res.returncode == 0, res.stderr
    run = tmp_path / "runs" / "e2e"
    for line in (
        "== summary ==",
        "val loss",
        "val acc",
        "val ppl",
        "val bpb",
        "tokens/s",
        "wall time",
        "== samples ==",
        "ROMEO:",
    ):
        assert line in res.stdout, line
    assert (run / ".hydra" / "config.yaml").is_file()  # Hydra's output lives in the run dir
    rows = read_metrics(run)
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8]
    assert rows[-1]["val_loss"] < rows[0]["train_loss"]
    assert list((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*/run-*.wandb"))

    best = run / "best"
    hf = AutoModelForCausalLM.from_pretrained(best)
    ours = Qwen3.from_pretrained(best)
    tok = Qwen3Tokenizer.from_dir(best)
    x = torch.tensor([tok.encode("ROMEO:\nBut soft, what light")])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), rtol=1e-4, atol=1e-4)


def test_two_steps_with_the_shipped_warmup_run_and_leave_no_empty_log(tmp_path) -> None:
    """``train.py trainer.max_steps=2`` with the shipped 30 warmup steps: the warmup is
    shortened with one printed line, the saved config says what ran, and the run directory holds
    no empty train.log."""
    corpus = write_corpus(tmp_path / "play.txt")
    overrides = [o for o in small_run_overrides(tmp_path, corpus) if not o.startswith("optim.")]
    res = run_train(
        tmp_path, *overrides, "trainer.max_steps=2", "run_name=short", "sample.max_new_tokens=0"
    )
    assert res.returncode == 0, res.stderr
    notes = [line for line in res.stdout.splitlines() if "optim.warmup_steps=30" in line]
    assert notes == [
        "optim.warmup_steps=30 does not fit the run (trainer.max_steps=2): running without warmup"
    ]
    run = tmp_path / "runs" / "short"
    assert "warmup_steps: 0" in (run / "best" / "config.yaml").read_text()
    assert [r["step"] for r in read_metrics(run)][-1] == 2
    assert (run / ".hydra").is_dir() and not list(run.glob("*.log"))


@pytest.mark.slow
def test_compiled_run_saves_plain_weight_names(tmp_path) -> None:
    from safetensors.torch import load_file

    res = run_train(
        tmp_path,
        *SMALL_MODEL,
        "data.max_tokens=30000",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"out_dir={tmp_path / 'runs'}",
        "run_name=compiled",
        "trainer.max_steps=3",
        "trainer.eval_every=3",
        "trainer.batch_size=4",
        "trainer.seq_len=32",
        "trainer.eval_batches=1",
        "trainer.compile=true",
        "optim.warmup_steps=1",
        "wandb.mode=disabled",
        "sample.max_new_tokens=4",
    )
    assert res.returncode == 0, res.stderr
    names = load_file(
        tmp_path / "runs" / "compiled" / "best" / "model-00001-of-00001.safetensors"
    ).keys()
    assert names and not [n for n in names if "_orig_mod" in n]


def test_multirun_sweep_writes_one_dir_per_job(tmp_path) -> None:
    corpus = write_corpus(tmp_path / "play.txt")
    res = run_train(
        tmp_path,
        "-m",
        *small_run_overrides(tmp_path, corpus),
        "trainer.max_steps=3",
        "trainer.eval_every=3",
        "optim.warmup_steps=1",
        "optim.lr=1e-3,3e-3",
        "run_name=sweep",
        "sample.max_new_tokens=0",
    )
    assert res.returncode == 0, res.stderr
    sweep = tmp_path / "runs" / "sweep"
    assert (sweep / "multirun.yaml").is_file()
    lrs = []
    for job in ("0", "1"):
        assert (sweep / job / "best" / "model-00001-of-00001.safetensors").is_file()
        lrs.append(read_metrics(sweep / job)[0]["lr/muon"])
    assert lrs[0] < lrs[1]


def test_ctrl_c_outside_the_training_loop_ends_with_a_message_not_a_traceback(
    tmp_path, monkeypatch, capsys
) -> None:
    """Ctrl-C during data preparation (here: the moment the run starts) exits 130 with a line
    saying nothing is half-written, instead of a KeyboardInterrupt traceback."""
    import trainer.cli as cli_entry

    def interrupted(cfg, start_time):  # what a Ctrl-C in prepare_data raises up to here
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_entry, "train_from_hydra", interrupted)
    argv = ["train.py", f"out_dir={tmp_path}", "run_name=ctrl-c", "hydra.output_subdir=null"]
    assert cli_entry.main(argv, start_time=0.0) == 130
    err = capsys.readouterr().err
    assert "interrupted: nothing is left half-written" in err and "Traceback" not in err
