"""DDP under torchrun on CPU (gloo): 2 processes x batch 8 train exactly as 1 process x batch 16,
rank 0 alone writes one run directory, and a checkpoint resumes exactly under the same world
size, on one process with the same global batch, and is refused with another global batch."""

from __future__ import annotations

import pytest
from test_distributed_support import (
    STEPS,
    base_overrides,
    losses,
    run_torchrun,
    single_process_losses,
)
from test_trainer_support import make_trainer, read_metrics, write_corpus

from trainer.errors import CheckpointError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    return tmp, write_corpus(tmp / "play.txt")


def test_two_processes_match_one_with_the_whole_batch_muon(corpus, tmp_path) -> None:
    """Muon: every rank orthogonalises the same all-reduced gradient. The 2-process side also
    accumulates 2 micro-batches (no_sync on the first) and builds the token cache (rank 0
    first); the reference then reuses that cache."""
    _, text = corpus
    base = base_overrides(tmp_path, text, tmp_path / "cache")
    res = run_torchrun(
        tmp_path, 2, *base, "run_name=ddp", "trainer.batch_size=4", "trainer.grad_accum=2"
    )
    assert res.returncode == 0, res.stderr
    run = tmp_path / "runs" / "ddp"
    ref = single_process_losses([*base, "trainer.batch_size=16"], tmp_path / "ref")
    got = losses(run)
    assert len(got) == STEPS and got[-1] < got[0]
    assert got == pytest.approx(ref, rel=1e-4)  # float sums in another order, bf16 Newton-Schulz

    # One run directory, written by rank 0 alone: one metrics row per step, one Hydra copy.
    assert [r["step"] for r in read_metrics(run)] == list(range(1, STEPS + 1))
    assert (run / ".hydra" / "config.yaml").is_file()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp"]
    assert not list(run.glob(".tmp-*"))
    assert res.stdout.count("== summary ==") == 1
    assert "x 2 processes" in res.stdout


def test_two_processes_match_one_with_the_whole_batch_adamw(corpus, tmp_path) -> None:
    """Also the evaluations: each rank takes every other val batch (3 batches: one rank runs a
    discarded extra forward to stay in step) and the sums are added across ranks."""
    _, text = corpus
    base = [
        *base_overrides(tmp_path, text, tmp_path / "cache"),
        "optim=adamw",
        "trainer.eval_every=2",
        "trainer.eval_batches=3",
    ]
    res = run_torchrun(tmp_path, 2, *base, "run_name=ddp", "trainer.batch_size=8")
    assert res.returncode == 0, res.stderr
    ref = single_process_losses([*base, "trainer.batch_size=16"], tmp_path / "ref")
    assert losses(tmp_path / "runs" / "ddp") == pytest.approx(ref, rel=1e-5)
    # Val batches follow trainer.batch_size: one process at 8 x 2 sees the same ones.
    single_process_losses([*base, "trainer.batch_size=8", "trainer.grad_accum=2"], tmp_path / "r8")
    metrics = ("val_loss", "val_acc", "val_bpb")
    ddp_rows = [r for r in read_metrics(tmp_path / "runs" / "ddp") if "val_loss" in r]
    ref_rows = [r for r in read_metrics(tmp_path / "r8") if "val_loss" in r]
    assert len(ddp_rows) == len(ref_rows) == STEPS // 2
    for got, want in zip(ddp_rows, ref_rows, strict=True):
        assert [got[k] for k in metrics] == pytest.approx([want[k] for k in metrics], rel=1e-5)


@pytest.mark.slow
def test_resume_is_exact_under_the_same_world_size_and_the_same_global_batch(
    corpus, tmp_path
) -> None:
    _, text = corpus
    base = [*base_overrides(tmp_path, text, tmp_path / "cache"), "trainer.batch_size=8"]
    full = run_torchrun(tmp_path, 2, *base, "run_name=full")
    assert full.returncode == 0, full.stderr
    ckpt = tmp_path / "runs" / "full" / "step-000002"
    resumed = run_torchrun(tmp_path, 2, *base, "run_name=resumed", f"resume={ckpt}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {ckpt} at step 2" in resumed.stdout
    assert losses(tmp_path / "runs" / "resumed") == losses(tmp_path / "runs" / "full")[2:]

    # One process, the same 16 sequences per step: resumes (the replicated state is read once).
    one = make_trainer([*base, "trainer.batch_size=16"], tmp_path / "one")
    one.resume_from(ckpt)
    one.fit()
    want = losses(tmp_path / "runs" / "full")[2:]
    assert losses(tmp_path / "one") == pytest.approx(want, rel=1e-5)

    half = make_trainer(base, tmp_path / "half")  # 8 sequences per step on one process
    with pytest.raises(CheckpointError, match="global batch of 16 sequences .* this run has 8"):
        half.resume_from(ckpt)
