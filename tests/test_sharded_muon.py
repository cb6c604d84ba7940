"""Muon's Newton-Schulz work split across ranks: under DDP (``BatchedMuon`` with a process group:
each rank iterates on its share of every shape's batch, one all-gather per shape) and under
FSDP2 (``ShardedMuon``: the share's row shards go to their owner and back, one all-to-all each
way per shape). Both give one process's weights (the trainer's BatchedMuon), and on plain
tensors ShardedMuon is it bit for bit. A 3-D stack of matrices (MoE experts) is orthogonalised
slice by slice; a step flagged ``found_inf`` changes nothing."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from test_distributed_support import run_worker
from torch import nn

from optim.batched_muon import BatchedMuon
from optim.muon_math import matrix_batches
from optim.sharded_muon import ShardedMuon

REPO = Path(__file__).resolve().parents[1]
# (out, in) of each matrix: row counts that do not divide by 2 (uneven shards, one rank holding
# a single row or none), and shapes repeated 1, 2 and 3 times (an odd count leaves one rank's
# share a matrix short).
SHAPES = [(5, 7), (8, 3), (5, 7), (3, 4), (6, 6), (1, 9), (3, 4), (5, 7), (1, 9), (1, 9)]
BATCHES = {(5, 7): 3, (8, 3): 1, (3, 4): 2, (6, 6): 1, (1, 9): 3}
EXPERTS = (4, 3, 5)  # (E, out, in): a stack of 4 matrices, as an MoE layer's experts
KW = dict(lr=0.05, weight_decay=0.1, momentum=0.9)
STEPS = 3


class Experts(nn.Module):
    """A 3-D parameter used as E matrices, the layout MoE experts take."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(*EXPERTS) / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, E, out)
        return torch.einsum("eoi,bi->beo", self.weight, x)


def _model(experts: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(i, o, bias=False) for o, i in SHAPES]
    return nn.Sequential(*layers, *([Experts()] if experts else []))


def _optimizer(cls: type[BatchedMuon], model: nn.Module, **extra: object) -> BatchedMuon:
    """``cls`` over the model's 2-D weights, with a 3-D one added as its own group:
    torch.optim.Muon's constructor refuses more than two dimensions, the step takes them."""
    flat = [p for p in model.parameters() if p.ndim == 2]
    opt = cls(flat, **KW, **extra)  # type: ignore[arg-type]
    stacks = [p for p in model.parameters() if p.ndim == 3]
    if stacks:
        opt.add_param_group({"params": stacks})
    return opt


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    """A loss touching every matrix, the same on every rank (so the averaged gradient is it)."""
    g = torch.Generator().manual_seed(step)
    total = torch.zeros(())
    for layer in model:
        n = layer.weight.shape[-1]
        total = total + layer(torch.randn(4, n, generator=g)).sin().sum()
    return total


def _reference(experts: bool) -> list[torch.Tensor]:
    """One process's weights after STEPS steps of the trainer's BatchedMuon."""
    ref = _model(experts)
    opt = _optimizer(BatchedMuon, ref)
    for step in range(STEPS):
        opt.zero_grad()
        _loss(ref, step).backward()
        opt.step()
    return [p.detach() for p in ref.parameters()]


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
def test_one_process_step_is_the_trainers_muon(nesterov, adjust_lr_fn) -> None:
    """On plain tensors ShardedMuon is one process's Muon (BatchedMuon, float32 Newton-Schulz
    on CPU), bit for bit; with a bf16 iteration BatchedMuon is torch.optim.Muon's step
    (tests/test_batched_muon.py), which pins the rewritten learning-rate rule to torch's."""
    ours, ref = _model(), _model()
    kw = dict(nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    opt_ours, opt_ref = _optimizer(ShardedMuon, ours, **kw), _optimizer(BatchedMuon, ref, **kw)
    for step in range(STEPS):
        for model, opt in ((ours, opt_ours), (ref, opt_ref)):
            opt.zero_grad()
            _loss(model, step).backward()
            opt.step()
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_batches_group_by_the_trailing_matrix_shape() -> None:
    model = _model(experts=True)
    params = list(model.parameters())
    got = {tuple(params[b[0]].shape[-2:]): len(b) for b in matrix_batches(params)}
    assert got == {**BATCHES, EXPERTS[1:]: 1}


def test_a_stack_of_matrices_is_orthogonalised_slice_by_slice() -> None:
    """A (E, out, in) parameter steps exactly as its E matrices would as separate parameters
    (each normalised and orthogonalised on its own, the learning rate of one matrix)."""
    stacked = Experts()
    slices = [nn.Parameter(w.detach().clone()) for w in stacked.weight]
    unused = nn.Parameter(torch.zeros(2, 2))  # no gradient: never stepped
    opt_stack = _optimizer(BatchedMuon, nn.ParameterList([unused, stacked.weight]))
    opt_slices = BatchedMuon(slices, **KW)  # type: ignore[arg-type]
    for step in range(STEPS):
        g = torch.randn(EXPERTS, generator=torch.Generator().manual_seed(step))
        stacked.weight.grad = g.clone()
        for p, gs in zip(slices, g, strict=True):
            p.grad = gs.clone()
        opt_stack.step()
        opt_slices.step()
    for got, want in zip(stacked.weight, slices, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("cls", [BatchedMuon, ShardedMuon])
def test_found_inf_skips_the_step_on_the_device(cls) -> None:
    """``found_inf`` 1 with non-finite gradients leaves parameters and momentum bit for bit;
    ``found_inf`` 0 is the plain step, bit for bit."""
    model, twin = _model(experts=True), _model(experts=True)
    opt, opt_twin = _optimizer(cls, model), _optimizer(cls, twin)
    for step in range(2):  # a real step first, so the momentum buffers are not zero
        for m, o in ((model, opt), (twin, opt_twin)):
            o.zero_grad()
            _loss(m, step).backward()
        opt.found_inf = torch.zeros(())
        opt.step()
        opt_twin.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    before = [p.detach().clone() for p in model.parameters()]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.found_inf = torch.ones(())
    opt.step()
    for p, was, buf in zip(model.parameters(), before, bufs, strict=True):
        assert torch.equal(p, was)
        assert torch.equal(opt.state[p]["momentum_buffer"], buf)


WORKER = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode
    sys.path[:0] = [sys.argv[2], sys.argv[3]]
    from test_sharded_muon import STEPS, _loss, _model, _optimizer
    import optim.batched_muon
    from optim.batched_muon import BatchedMuon
    from optim.sharded_muon import ShardedMuon

    mode = sys.argv[4]
    if sys.argv[5] != "default":
        optim.batched_muon.CHUNK_BYTES = int(sys.argv[5])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = _model(experts=True)
    if mode == "fsdp":
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        cls, extra = ShardedMuon, {}
    else:  # DDP's state after its all-reduce: the same parameters and gradients on every rank
        cls, extra = BatchedMuon, {"process_group": dist.group.WORLD}
    done = []
    plain = cls.orthogonalize

    def counted(stacked, group, dtype):
        done.append(list(stacked.shape))
        return plain(stacked, group, dtype)

    cls.orthogonalize = staticmethod(counted)
    opt = _optimizer(cls, model, **extra)
    per_step, comms = [], []
    for step in range(STEPS):
        opt.zero_grad()
        _loss(model, step).backward()
        done.clear()
        with CommDebugMode() as comm:
            opt.step()
        per_step.append(list(done))
        comms.append({str(k): v for k, v in comm.get_comm_counts().items()})
    weights = [(p.full_tensor() if isinstance(p, DTensor) else p).tolist() for p in model.parameters()]
    out = {"orthogonalised": per_step, "comms": comms, "weights": weights}
    json.dump(out, open(f"{sys.argv[1]}/{rank}.json", "w"))
    # Both ranks done before either tears gloo down (as trainer.distributed does): a rank that
    # left first once aborted its peer ('terminate called without an active exception').
    dist.barrier()
    dist.destroy_process_group()
    """
)

# The collectives of one step, by name as CommDebugMode counts them: one exchange per batch of
# row-sharded matrices (an all-to-all each way), none for the expert stack (each rank holds whole
# experts under FSDP); one all-gather per batch, the stack's included, under DDP.
COMMS = {
    "fsdp": {"c10d.alltoall_base_": 2 * len(BATCHES)},
    "ddp": {"c10d._allgather_base_": len(BATCHES) + 1},
}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_share_the_work_and_match_one_process(tmp_path, mode) -> None:
    res = run_worker(tmp_path, WORKER, str(REPO / "tests"), str(REPO), mode, "default")
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    shares = {shape: [-(-n // 2), n // 2] for shape, n in BATCHES.items()}  # rank 0, rank 1
    e, rows, cols = EXPERTS
    for step in range(STEPS):
        for r, rank in enumerate(ranks):
            assert rank["comms"][step] == COMMS[mode]
            got = sorted(map(tuple, rank["orthogonalised"][step]))
            # each rank iterates once per batch on its share, as one batch
            want = [(shares[s][r], *s) for s in BATCHES if shares[s][r]]
            # the experts: under FSDP each rank's own shard of the stack; under DDP a share
            want.append((e // 2, rows, cols))
            assert got == sorted(want)
    _assert_weights_match_one_process(ranks)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_chunks_of_one_matrix_match_one_process(tmp_path, mode) -> None:
    """CHUNK_BYTES below one matrix: every chunk holds one matrix (rank 0's share; the expert
    stack cut between its experts), one exchange per chunk, the weights still one process's."""
    res = run_worker(tmp_path, WORKER, str(REPO / "tests"), str(REPO), mode, "1")
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    e, rows, cols = EXPERTS
    comms = {
        "fsdp": {"c10d.alltoall_base_": 2 * len(SHAPES)},
        "ddp": {"c10d._allgather_base_": len(SHAPES) + e},
    }
    for step in range(STEPS):
        for r, rank in enumerate(ranks):
            assert rank["comms"][step] == comms[mode]
            want = [(1, *s) for s in SHAPES] if r == 0 else []
            # under FSDP each rank's two experts where they are, under DDP rank 0's share
            experts = e // 2 if mode == "fsdp" else (e if r == 0 else 0)
            want += [(1, rows, cols)] * experts
            assert sorted(map(tuple, rank["orthogonalised"][step])) == sorted(want)
    _assert_weights_match_one_process(ranks)


def _assert_weights_match_one_process(ranks: list[dict]) -> None:
    for r in ranks:
        for got, want in zip(r["weights"], _reference(experts=True), strict=True):
            torch.testing.assert_close(torch.tensor(got), want, rtol=0, atol=1e-5)
