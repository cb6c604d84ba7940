"""Faults a cluster user meets, through the real CLI: a disk that fills up during a save (a real
tmpfs of a few MB), a requeued job launched with the same command line (``resume=auto``), the
scheduler's warning signal (SIGUSR1), and the leftovers of a killed save."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from test_trainer_support import (
    REPO,
    read_metrics,
    run_train,
    small_run_overrides,
    subprocess_env,
    train_cmd,
    write_corpus,
)

from trainer.checkpoint import load_trainer_state
from trainer.checkpointer import remove_leftovers
from trainer.run_layout import LATEST, read_pointer


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture
def small_disk(tmp_path):
    """A real 32 MB tmpfs (mounting needs root, which this project's CI and dev machines have)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()}); needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """A file that leaves ``leave`` bytes free on ``disk``."""
    filler = disk / f"filler-{uuid.uuid4().hex}"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as f:
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        todo = max(free - leave, 0)
        while todo > 0:
            todo -= f.write(chunk[: min(len(chunk), todo)])
    return filler


@pytest.mark.slow
def test_disk_full_during_save_ends_in_one_line_and_resume_continues(tmp_path, small_disk):
    corpus = write_corpus(tmp_path / "play.txt")
    base = [
        *small_run_overrides(tmp_path, corpus),
        f"out_dir={small_disk / 'runs'}",
        "run_name=job",
        "resume=auto",  # the same command line for the first launch and each relaunch
        "optim.schedule=constant",
        "trainer.eval_every=0",
        "trainer.save_every=2",
        "trainer.keep_last=10",
        "sample.max_new_tokens=0",
    ]
    run = small_disk / "runs" / "job"

    first = run_train(tmp_path, *base, "trainer.max_steps=2")
    assert first.returncode == 0, first.stderr
    assert f"resume=auto: no checkpoint in {run} yet; starting a new run" in first.stdout
    ckpt_bytes = _dir_bytes(run / "step-000002")

    # Room for one more checkpoint, not two: step 4 saves, the periodic save at 6 is skipped
    # with one line, and the final save at 8 is tried and runs out of space.
    filler = _fill(small_disk, leave=int(1.5 * ckpt_bytes))
    full = run_train(tmp_path, *base, "trainer.max_steps=8")
    assert full.returncode == 1, full.stderr
    assert "Traceback" not in full.stderr
    assert "step 6: low disk space" in full.stdout + full.stderr
    assert "skipping this save" in full.stdout + full.stderr
    error = [line for line in full.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "out of disk space saving step 8" in error[0], full.stderr
    assert "step-000004 (latest) is intact" in error[0]
    assert "resume=latest" in full.stderr  # the command that continues the run
    assert read_pointer(run, LATEST) == (run / "step-000004").resolve()
    assert not list(run.glob(".tmp-*")) and not list(run.glob(".*.tmp-*"))

    # Space freed, the same command continues from the intact checkpoint to the end.
    filler.unlink()
    again = run_train(tmp_path, *base, "trainer.max_steps=8")
    assert again.returncode == 0, again.stderr
    assert f"resumed from {run / 'step-000004'} at step 4" in again.stdout
    assert load_trainer_state(run / LATEST)["step"] == 8
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 9))


@pytest.mark.slow
def test_sigusr1_saves_and_prints_the_resume_command(tmp_path):
    corpus = write_corpus(tmp_path / "play.txt")
    base = [
        *small_run_overrides(tmp_path, corpus),
        "run_name=warned",
        "trainer.eval_every=0",
        "sample.max_new_tokens=0",
        "trainer.max_steps=100000",
    ]
    run = tmp_path / "runs" / "warned"
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen(
            train_cmd(*base), cwd=REPO, env=subprocess_env(tmp_path), stdout=out, stderr=err
        )
        while not ((run / "metrics.jsonl").exists() and read_metrics(run)):
            assert proc.poll() is None, (tmp_path / "err").read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        proc.wait()
    stdout, stderr = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert proc.returncode == 0, stderr
    assert "SIGUSR1 received" in stderr
    assert "resume=latest" in stdout
    assert load_trainer_state(run / LATEST)["step"] == read_metrics(run)[-1]["step"]


def test_a_new_run_removes_what_a_killed_save_left(tmp_path):
    run = tmp_path / "run"
    (run / "step-000002").mkdir(parents=True)
    (run / ".tmp-step-000004" / "train_state").mkdir(parents=True)
    (run / ".old-step-000002-123").mkdir()
    (run / ".metrics.tmp-99.png").write_bytes(b"x")
    (run / ".latest.tmp-99").symlink_to("step-000002")
    (run / "metrics.jsonl.tmp-99").write_text("{}\n")
    removed = remove_leftovers(run)
    assert removed == sorted(
        [
            ".tmp-step-000004",
            ".old-step-000002-123",
            ".metrics.tmp-99.png",
            ".latest.tmp-99",
            "metrics.jsonl.tmp-99",
        ]
    )
    assert sorted(os.listdir(run)) == ["step-000002"]
