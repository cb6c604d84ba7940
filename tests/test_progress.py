"""Progress while training: a tqdm bar on a terminal, one line per logged step in a file or pipe
(the line's format, and a real ``train.py`` run with stdout to a pipe)."""

from __future__ import annotations

import io
import re

from test_trainer_support import run_train, small_run_overrides, write_corpus

from trainer.progress import Progress, duration, facts

ROW = {
    "step": 120,
    "train_loss": 5.0123,
    "grad_norm": 0.4812,
    "lr": 6.5e-3,
    "tokens_per_s": 6650.4,
    "mfu": 0.412,
}
LINE = re.compile(
    r"^step (\d+)/(\d+) \| loss [\d.]+ \| lr [\d.]+e-?\d+ \| grad [\d.e+-]+ \| [\d,]+ tok/s"
    r" \| MFU [\d.]+% \| (\d+h\d\dm|\d+m\d\ds|\d+s) left$"
)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_facts_of_a_row_as_the_issue_shows_them() -> None:
    assert facts(ROW) == [
        "loss 5.01",
        "lr 6.5e-3",
        "grad 0.481",
        "6,650 tok/s",
        "MFU 41%",
    ]
    assert facts({**ROW, "mfu": 0.0123, "skipped_steps": 2})[-2:] == ["MFU 1.2%", "2 skipped"]
    assert [duration(s) for s in (0.4, 45, 130, 3900)] == ["0s", "45s", "2m10s", "1h05m"]


def test_a_file_gets_one_line_per_logged_row_and_no_bar() -> None:
    out = io.StringIO()
    progress = Progress(total=400, initial=100, enabled=True, stream=out)
    progress.update(20)
    progress.log(ROW)
    progress.close()
    (line,) = out.getvalue().splitlines()
    match = LINE.match(line)
    assert match, line
    assert match.group(1, 2) == ("120", "400")
    assert "loss 5.01 | lr 6.5e-3 | grad 0.481 | 6,650 tok/s | MFU 41%" in line


def test_a_terminal_gets_the_bar_not_lines_and_other_ranks_get_nothing() -> None:
    terminal = _Terminal()
    progress = Progress(total=10, initial=0, enabled=True, stream=terminal)
    progress.update(1)
    progress.log(ROW)
    progress.close()
    assert terminal.getvalue() == ""  # the facts went to the bar (tqdm draws on stderr)
    assert not progress.lines
    quiet = io.StringIO()
    other_rank = Progress(total=10, initial=0, enabled=False, stream=quiet)
    other_rank.log(ROW)
    assert quiet.getvalue() == ""


def test_a_run_with_stdout_to_a_pipe_prints_a_line_every_log_step(tmp_path) -> None:
    corpus = write_corpus(tmp_path / "play.txt")
    args = [
        *small_run_overrides(tmp_path, corpus),
        "trainer.max_steps=6",
        "trainer.log_every=2",
        "trainer.eval_every=0",
        "run_name=piped",
    ]
    res = run_train(tmp_path, *args)  # stdout is a pipe here, as under nohup or Slurm
    assert res.returncode == 0, res.stderr
    lines = [m for m in map(LINE.match, res.stdout.splitlines()) if m]
    assert [m.group(1, 2) for m in lines] == [("2", "6"), ("4", "6"), ("6", "6")], res.stdout
    assert "it/s]" not in res.stdout + res.stderr  # no tqdm bar in a file
