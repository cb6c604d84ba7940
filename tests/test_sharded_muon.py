"""Muon under FSDP2 (``optim.sharded_muon``): each matrix orthogonalised by one rank, the same
update as one process (the trainer's BatchedMuon), bit for bit on plain tensors."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from test_distributed_support import run_worker
from torch import nn

from optim.batched_muon import BatchedMuon
from optim.sharded_muon import ShardedMuon

REPO = Path(__file__).resolve().parents[1]
# Row counts that do not divide by 2 (uneven shards, one rank holding a single row) and a
# matrix count that leaves the last round one matrix short.
SHAPES = [(5, 7), (8, 3), (3, 4), (6, 6), (1, 9)]


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(i, o, bias=False) for o, i in SHAPES])


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    """A loss touching every matrix, the same on every rank (so FSDP's averaged gradient is it)."""
    g = torch.Generator().manual_seed(step)
    return sum(
        (lin(torch.randn(4, lin.in_features, generator=g)).sin().sum() for lin in model),
        start=torch.zeros(()),
    )


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
def test_one_process_step_is_the_trainers_muon(nesterov, adjust_lr_fn) -> None:
    """On plain tensors ShardedMuon is one process's Muon (BatchedMuon, float32 Newton-Schulz
    on CPU), bit for bit; with a bf16 iteration BatchedMuon is torch.optim.Muon's step
    (tests/test_batched_muon.py), which pins the rewritten learning-rate rule to torch's."""
    ours, ref = _model(), _model()
    kw = dict(lr=0.05, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    opt_ours, opt_ref = (
        ShardedMuon(ours.parameters(), **kw),
        BatchedMuon(ref.parameters(), **kw),
    )
    for step in range(3):
        for model, opt in ((ours, opt_ours), (ref, opt_ref)):
            opt.zero_grad()
            _loss(model, step).backward()
            opt.step()
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


WORKER = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    sys.path[:0] = [sys.argv[2], sys.argv[3]]
    from test_sharded_muon import SHAPES, _loss, _model
    from optim.sharded_muon import ShardedMuon

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = _model()
    for lin in model:
        fully_shard(lin)
    fully_shard(model)
    done = []
    plain = ShardedMuon.orthogonalize

    def counted(update, group):
        done.append(list(update.shape))
        return plain(update, group)

    ShardedMuon.orthogonalize = staticmethod(counted)
    opt = ShardedMuon(model.parameters(), lr=0.05, weight_decay=0.1, momentum=0.9)
    per_step = []
    for step in range(3):
        opt.zero_grad()
        _loss(model, step).backward()
        done.clear()
        opt.step()
        per_step.append(list(done))
    weights = [p.full_tensor().tolist() for p in model.parameters()]
    json.dump({"orthogonalised": per_step, "weights": weights}, open(f"{sys.argv[1]}/{rank}.json", "w"))
    dist.destroy_process_group()
    """
)


def test_two_ranks_share_the_work_and_match_one_process(tmp_path) -> None:
    res = run_worker(tmp_path, WORKER, str(REPO / "tests"), str(REPO))
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for step in range(3):
        mine = [sorted(map(tuple, r["orthogonalised"][step])) for r in ranks]
        # every matrix once, on one rank; the work split as evenly as the count allows
        assert sorted(mine[0] + mine[1]) == sorted(SHAPES)
        assert sorted(len(m) for m in mine) == [2, 3]

    ref = _model()
    opt = BatchedMuon(ref.parameters(), lr=0.05, weight_decay=0.1, momentum=0.9)
    for step in range(3):
        opt.zero_grad()
        _loss(ref, step).backward()
        opt.step()
    for r in ranks:
        for got, want in zip(r["weights"], ref.parameters(), strict=True):
            torch.testing.assert_close(torch.tensor(got), want.detach(), rtol=1e-5, atol=1e-6)
