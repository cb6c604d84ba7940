"""``train.py demo`` and ``train.py interactive`` driven as real subprocesses."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from test_trainer_support import (
    REPO,
    run_train,
    subprocess_env,
    tiny_qwen3,
    train_cmd,
    write_corpus,
)

from data.tokenizer_training import train_tokenizer
from trainer.checkpoint import save_checkpoint
from trainer.cli import run_subcommand
from trainer.run_layout import set_pointer

# The smallest pipe Linux allows (one page); see the Ctrl-C test.
PIPE_PAGE = 4096


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs under one out_dir, each with a best checkpoint; the second is the newer."""
    root = tmp_path_factory.mktemp("gen")
    tok = train_tokenizer(write_corpus(root / "play.txt").read_text().split("\n\n"), 300)
    out = root / "runs"
    for i, name in enumerate(("older", "newer")):
        model = tiny_qwen3(tok, max_positions=8192, seed=i)
        run = out / name
        run.mkdir(parents=True)
        path = save_checkpoint(
            run,
            10,
            model,
            tok,
            {"step": 10},
            f"sample:\n  prompts: ['{name.upper()} SAYS:']\n",
        )
        set_pointer(run, "best", path)
        time.sleep(0.05)  # distinct pointer mtimes
    return root, out


def test_demo_uses_the_best_checkpoint_of_the_most_recent_run(runs) -> None:
    root, out = runs
    res = run_train(root, "demo", f"out_dir={out}", "max_new_tokens=12", "seed=3")
    assert res.returncode == 0, res.stderr
    assert str((out / "newer" / "step-000010").resolve()) in res.stdout
    assert "NEWER SAYS:" in res.stdout  # the run's own sample prompts


def test_demo_with_ckpt_and_sampling_overrides(runs) -> None:
    root, out = runs
    args = [
        "demo",
        f"ckpt={out / 'older' / 'best'}",
        'prompts=["ROMEO:", "JULIET:"]',
        "temperature=0",
        "max_new_tokens=8",
    ]
    first = run_train(root, *args)
    assert first.returncode == 0, first.stderr
    assert "ROMEO:" in first.stdout and "JULIET:" in first.stdout
    assert str((out / "older" / "step-000010").resolve()) in first.stdout
    assert run_train(root, *args).stdout == first.stdout  # greedy: deterministic


def test_demo_errors_are_one_clear_message(runs, tmp_path) -> None:
    root, _ = runs
    res = run_train(root, "demo", f"out_dir={tmp_path}")
    assert res.returncode == 2 and "no trained run" in res.stderr and "ckpt=DIR" in res.stderr
    res = run_train(root, "demo", f"out_dir={tmp_path}", "temprature=0.5")
    assert res.returncode == 2 and "demo.temprature" in res.stderr and "temperature" in res.stderr
    res = run_train(root, "interactive", "top_p=3")
    assert res.returncode == 2 and "error: interactive: top_p=3.0 must lie in (0, 1]" in res.stderr
    assert "Traceback" not in res.stderr
    res = run_train(root, "demo", "device=nonsense")
    assert res.returncode == 2 and "device='nonsense' is not a device" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("command", ["demo", "interactive"])
def test_a_damaged_checkpoint_is_one_line(runs, tmp_path, command) -> None:
    root, out = runs
    ckpt = tmp_path / "step-000010"
    shutil.copytree(out / "older" / "step-000010", ckpt)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    res = run_train(root, command, f"ckpt={ckpt}")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {weights} is damaged ("), res.stderr


def test_out_of_memory_keeps_its_traceback(runs, monkeypatch) -> None:
    """Not the user's mistake: it must reach the user with its traceback, not as one line.
    (A CUDA out-of-memory, raised where attention would allocate, on any machine.)"""
    _, out = runs

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        run_subcommand("demo", [f"ckpt={out / 'older' / 'best'}", "max_new_tokens=2", "device=cpu"])


def test_interactive_prompt_quit_and_eof(runs) -> None:
    root, out = runs
    base = train_cmd("interactive", f"out_dir={out}", "max_new_tokens=10")
    res = subprocess.run(
        base,
        input="ROMEO:\n\n/quit\nnever read\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        env=subprocess_env(root),
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.count(">>> ") == 3 and "ROMEO:" in res.stdout
    res = subprocess.run(
        base, input="JULIET:\n", capture_output=True, text=True, cwd=REPO, env=subprocess_env(root)
    )
    assert res.returncode == 0 and "JULIET:" in res.stdout


def test_interactive_ctrl_c_stops_the_generation_not_the_program(runs) -> None:
    """The SIGINT must land while tokens are being generated, on a machine of any speed.

    The child's stdout is a one-page pipe that the test stops reading once the generation
    has begun: 8000 tokens (about 15 KB here) are far more than a page, so the child is still
    inside the generation (computing, or blocked writing) when the signal arrives, never back
    at the prompt. Reads block on the pipe and fail at end of file, so nothing here can spin forever.

    The child starts with SIGINT ignored, as a background job of a non-interactive shell does
    (how a CI runner may start the tests): Ctrl-C must still stop the generation.
    """
    root, out = runs
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_PAGE)
    proc = subprocess.Popen(
        train_cmd("interactive", f"out_dir={out}", "max_new_tokens=8000", "stop_at_eos=false"),
        stdin=subprocess.PIPE,
        stdout=write_fd,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=subprocess_env(root),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    os.close(write_fd)
    seen = bytearray()

    def read_until(marker: bytes, after: int = 0, start: int = 0) -> int:
        """Read until ``marker`` (searched from ``start``) and ``after`` more bytes have come."""
        while (at := seen.find(marker, start)) < 0 or len(seen) < at + len(marker) + after:
            chunk = os.read(read_fd, 1)
            if not chunk:
                proc.kill()
                pytest.fail(f"interactive exited early: {bytes(seen)!r} {proc.stderr.read()!r}")
            seen.extend(chunk)
        return at + len(marker)

    try:
        read_until(b">>> ")
        proc.stdin.write(b"ROMEO:\n")
        proc.stdin.flush()
        generating = read_until(b">>> ROMEO:", after=40)
        proc.send_signal(signal.SIGINT)  # nothing read since: the child cannot have finished
        # The next prompt comes either way (if the signal were lost, after all 8000 tokens):
        # wait for it, not for the stop message, so a lost signal fails instead of hanging.
        read_until(b">>> ", start=generating)
        assert b"\n[generation stopped]\n>>> " in seen[generating:], bytes(seen[-300:])
        proc.stdin.write(b"/quit\n")
        proc.stdin.flush()
        while chunk := os.read(read_fd, 4096):
            seen.extend(chunk)
        assert proc.wait() == 0, proc.stderr.read()
    finally:
        proc.kill()
        os.close(read_fd)
    assert seen.rstrip().endswith(b">>>")  # back at the prompt, then /quit
