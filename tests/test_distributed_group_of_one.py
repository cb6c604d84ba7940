"""``trainer.force_process_group=true``: torchrun with one process forms a group of one (gloo
here, NCCL on a GPU) and takes the multi-process path (FSDP2 shards, sharded Muon, DTensor
clipping, DCP shards written in the background, resume), training exactly as one plain process;
the settings of the group (its timeout) are checked before any work; and each rank draws its own
random numbers (dropout), which a resume restores rank by rank."""

from __future__ import annotations

import json
import textwrap

import pytest
from test_distributed_support import (
    STEPS,
    base_overrides,
    losses,
    run_torchrun,
    run_worker,
    single_process_losses,
)
from test_trainer_support import run_train, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("group-of-one") / "play.txt")


@pytest.mark.slow  # ~30 s here: two torchrun launches and a reference run
def test_a_group_of_one_trains_shards_saves_async_and_resumes_like_one_process(
    corpus, tmp_path
) -> None:
    base = [*base_overrides(tmp_path, corpus, tmp_path / "cache"), "trainer.batch_size=8"]
    group = [
        "run_name=one",
        "trainer.force_process_group=true",
        "trainer.fsdp=true",
        "trainer.async_save=true",
        "trainer.clip=0.5",  # clipped: the DTensor norm is reduced over the group
        "trainer.dist_timeout=120",
    ]
    first = run_torchrun(tmp_path, 1, *base, *group)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "x 1 processes" in first.stdout  # in a group, not the plain one-process path
    run = tmp_path / "runs" / "one"
    assert (run / f"step-{STEPS:06d}" / "train_state" / ".metadata").is_file()
    whole = losses(run)
    middle = run / f"step-{STEPS // 2:06d}"  # written in the background, then resumed from
    res = run_torchrun(tmp_path, 1, *base, *group, f"resume={middle}", "sample.max_new_tokens=6")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {middle}" in res.stdout
    assert "== samples ==" in res.stdout  # sampled from the shards, on every rank (here one)
    assert losses(run) == whole  # exact resume
    ref = single_process_losses(
        [*base, "trainer.clip=0.5", "sample.max_new_tokens=0"], tmp_path / "ref"
    )
    assert len(whole) == STEPS
    # sharded Muon on one rank is Muon; only the reduction order of the norms differs
    assert whole == pytest.approx(ref, rel=1e-4)


def test_force_process_group_without_torchrun_says_how_to_launch(corpus, tmp_path) -> None:
    res = run_train(
        tmp_path,
        *base_overrides(tmp_path, corpus, tmp_path / "cache"),
        "trainer.force_process_group=true",
        "trainer.max_steps=1",
    )
    assert res.returncode == 2
    assert "torchrun --standalone --nproc_per_node=1" in res.stderr.strip().splitlines()[-1]


def test_a_bad_timeout_is_refused_before_the_group_forms(corpus, tmp_path) -> None:
    res = run_torchrun(
        tmp_path,
        1,
        *base_overrides(tmp_path, corpus, tmp_path / "cache"),
        "trainer.force_process_group=true",
        "trainer.dist_timeout=0",
    )
    assert res.returncode != 0
    assert "trainer.dist_timeout=0.0 must be a positive number of seconds" in res.stderr


RNG_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    from trainer.checkpoint import capture_rng, restore_rng
    from trainer.distributed import dist_info, rank_seed

    dist.init_process_group("gloo")
    torch.manual_seed(rank_seed(1337, dist_info()))
    saved = capture_rng()
    after = torch.rand(4).tolist()
    torch.manual_seed(0)
    restore_rng(saved)
    again = torch.rand(4).tolist()
    only_rank0 = {k: v for k, v in saved.items() if k != "ranks"}  # another process count
    restore_rng(only_rank0)
    other = torch.rand(4).tolist()
    json.dump({"after": after, "again": again, "other": other},
              open(f"{sys.argv[1]}/{dist.get_rank()}.json", "w"))
    dist.destroy_process_group()
    """
)


def test_ranks_draw_differently_and_each_resumes_its_own_stream(tmp_path) -> None:
    res = run_worker(tmp_path, RNG_WORKER)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2))
    assert r0["after"] != r1["after"]  # dropout masks differ across data-parallel ranks
    assert r0["again"] == r0["after"] and r1["again"] == r1["after"]  # each its own stream
    # from rank 0's states alone: rank 0 continues its stream, the others still differ
    assert r0["other"] == r0["after"] and r1["other"] != r0["other"]
