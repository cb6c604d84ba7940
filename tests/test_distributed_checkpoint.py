"""Per-rank checkpoints under FSDP (torchrun, gloo on CPU): each rank writes its own shards and
rank 0 never gathers the optimizer state; a run killed with SIGKILL resumes on the same number
of processes exactly, and on another number of processes with the same global batch to float
tolerance; a save in the background (trainer.async_save) gives the same checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from test_distributed_support import (
    base_overrides,
    losses,
    process_tree,
    run_torchrun,
    run_worker,
)
from test_trainer_support import REPO, make_trainer, subprocess_env, write_corpus

from trainer.run_layout import TRAIN_STATE_DIR

STEPS = 6

MEMORY_WORKER = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from optim import OptimConfig, build_optimizers
    from qwen3 import Qwen3, Qwen3Config
    from trainer.distributed import shard_model
    from trainer.train_state import save_train_state

    dist.init_process_group("gloo")
    cfg = Qwen3Config(vocab_size=256, hidden_size=512, intermediate_size=2048,
                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                      head_dim=64, max_position_embeddings=64)
    with torch.device("meta"):
        model = Qwen3(cfg)
    shard_model(model, torch.device("cpu"))
    model.materialize("cpu")
    opt = build_optimizers(model, OptimConfig(name="adamw", warmup_steps=0), 10)
    x = torch.randint(0, 256, (1, 16))
    model(x, targets=x).backward()
    opt.step()
    opt.zero_grad()
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = peak()
    save_train_state(model, opt, Path(sys.argv[1]) / "state")
    saved = peak()
    # The control: what gathering the whole optimizer state (as a rank-0 save would) costs here.
    full = get_optimizer_state_dict(
        model, opt.optimizers[0], options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    gathered = peak()
    full_bytes = sum(v.numel() * v.element_size() for s in full.get("state", {}).values()
                     for v in s.values() if torch.is_tensor(v))  # rank 0 alone holds it
    out = {"save": saved - start, "gather": gathered - saved, "full_optimizer": full_bytes}
    json.dump(out, open(Path(sys.argv[1]) / f"{dist.get_rank()}.json", "w"))
    dist.destroy_process_group()
    """
)


@pytest.mark.slow  # ~20 s: one 2-process job of a 33M-parameter model
def test_a_sharded_save_writes_per_rank_shards_and_gathers_no_optimizer_state(
    tmp_path, monkeypatch
) -> None:
    # Freed blocks of 64 KiB and more go back to the kernel at once, so the peak RSS after the
    # save is what the save itself allocated, not hidden by memory reused from the step.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    res = run_worker(tmp_path, MEMORY_WORKER)
    assert res.returncode == 0, res.stderr
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    full = ranks[0]["full_optimizer"]  # AdamW's two float32 moments of 33M weights: ~250 MB
    assert full > 200e6
    # Rank 0's gather of the whole optimizer state shows up in this measurement ...
    assert ranks[0]["gather"] > 0.5 * full
    # ... and the save allocates a fraction of it on every rank: at most a copy of the rank's
    # own quarter (half the weights of the two moments' size, split in two) as safetensors
    # serialises its file of weights in memory; never the whole model.
    assert all(r["save"] < 0.35 * full for r in ranks), ranks
    # Each rank wrote its own half of the optimizer state (the two moments) ...
    shards = sorted((tmp_path / "state" / "train_state").glob("*.distcp"))
    assert [s.name for s in shards] == ["__0_0.distcp", "__1_0.distcp"]
    for shard in shards:
        assert 0.4 * full < shard.stat().st_size < 0.6 * full, shard
    # ... and its half of the weights, joined into one Hugging Face file (the weights once).
    parts = sorted((tmp_path / "state" / "sharded").glob("*.safetensors"))
    assert len(parts) == 2 and all(0.2 * full < p.stat().st_size < 0.3 * full for p in parts)
    whole = list((tmp_path / "state").glob("model-*.safetensors"))
    assert len(whole) == 1 and 0.45 * full < whole[0].stat().st_size < 0.55 * full


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The overrides and the uninterrupted one-process reference (16 sequences per step)."""
    tmp = tmp_path_factory.mktemp("reshard")
    corpus = write_corpus(tmp / "play.txt")
    base = [
        o
        for o in base_overrides(tmp, corpus, tmp / "cache")
        if not o.startswith(("trainer.max_steps=", "trainer.keep_last="))
    ]
    # A constant LR makes the losses independent of max_steps: the killed run is started long.
    base += ["optim=adamw", "optim.schedule=constant", "optim.warmup_steps=0"]
    base += ["trainer.keep_last=10"]
    ref = make_trainer([*base, f"trainer.max_steps={STEPS}", "trainer.batch_size=16"], tmp / "ref")
    ref.fit()
    return tmp, base, losses(tmp / "ref")


def _saved_step(ckpt) -> int:
    return int(ckpt.resolve().name.removeprefix("step-"))


@pytest.mark.slow  # ~2-3 min: four 2-process jobs
def test_a_killed_sharded_run_resumes_on_two_processes_and_on_one(setup) -> None:
    tmp, base, ref = setup
    two = [*base, "trainer.fsdp=true", "trainer.batch_size=8", "trainer.async_save=true"]
    full = run_torchrun(tmp, 2, *two, f"trainer.max_steps={STEPS}", "run_name=full")
    assert full.returncode == 0, full.stderr
    uninterrupted = losses(tmp / "runs" / "full")
    assert uninterrupted == pytest.approx(ref, rel=1e-5)  # 2 sharded processes = 1 process

    # Kill the whole 2-process job once a checkpoint (written in the background) is published.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = [*two, "trainer.max_steps=100000", "run_name=killed"]
    with open(tmp / "killed.out", "w") as out:
        job = subprocess.Popen(
            [*cmd, str(REPO / "train.py"), *args],
            cwd=REPO,
            env=subprocess_env(tmp),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    latest = tmp / "runs" / "killed" / "latest"
    while not latest.exists():
        assert job.poll() is None, (tmp / "killed.out").read_text()
        time.sleep(0.01)
    tree = process_tree(job.pid)
    assert len(tree) >= 3  # torchrun and its two workers
    for pid in tree:  # as a crash of the machine would: every process at once, no cleanup
        os.kill(pid, signal.SIGKILL)
    job.wait()
    ckpt = latest.resolve()
    step = _saved_step(ckpt)
    assert step < STEPS and (ckpt / TRAIN_STATE_DIR / ".metadata").is_file()

    # The same 2 processes: exactly the uninterrupted run.
    again = run_torchrun(
        tmp, 2, *two, f"trainer.max_steps={STEPS}", "run_name=again", f"resume={ckpt}"
    )
    assert again.returncode == 0, again.stderr
    assert losses(tmp / "runs" / "again") == uninterrupted[step:]

    # One process with the same 16 sequences per step: the shards are read back whole.
    one = make_trainer([*base, f"trainer.max_steps={STEPS}", "trainer.batch_size=16"], tmp / "one")
    one.resume_from(ckpt)
    one.fit()
    assert losses(tmp / "one") == pytest.approx(uninterrupted[step:], rel=1e-5)

    # The other way: the one-process reference's checkpoint, resumed by 2 sharded processes.
    start = tmp / "ref" / "step-000002"
    split = run_torchrun(
        tmp, 2, *two, f"trainer.max_steps={STEPS}", "run_name=split", f"resume={start}"
    )
    assert split.returncode == 0, split.stderr
    assert losses(tmp / "runs" / "split") == pytest.approx(ref[2:], rel=1e-5)

    # Another global batch is refused in one line, before any step.
    other = run_torchrun(tmp, 2, *two, "trainer.batch_size=4", "run_name=other", f"resume={start}")
    assert other.returncode != 0
    assert "global batch of 16 sequences of seq_len" in other.stderr
    assert "this run has 8 sequences" in other.stderr
    assert "[rank0]: Traceback" not in other.stderr  # a worker's one line (torchrun adds its own)


@pytest.mark.slow  # ~1 min per optimizer: one 2-process job and the one-process reference
@pytest.mark.parametrize("optim", ["muon", "adamw"])
def test_two_sharded_processes_equal_one_over_ten_steps(setup, optim) -> None:
    tmp, base, _ = setup
    steps = [*(o for o in base if o != "optim=adamw"), f"optim={optim}", "trainer.max_steps=10"]
    ref = make_trainer([*steps, "trainer.batch_size=16"], tmp / f"ref-{optim}")
    ref.fit()
    res = run_torchrun(
        tmp, 2, *steps, "trainer.fsdp=true", "trainer.batch_size=8", f"run_name=ten-{optim}"
    )
    assert res.returncode == 0, res.stderr
    got, want = losses(tmp / "runs" / f"ten-{optim}"), losses(tmp / f"ref-{optim}")
    assert len(got) == 10
    assert got == pytest.approx(want, rel=1e-5)
