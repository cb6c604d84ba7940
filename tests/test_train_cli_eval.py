"""``train.py eval``: lm-evaluation-harness on our checkpoints, offline, with a local
multiple-choice task the tests write, through real ``train.py`` processes."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_trainer_support import run_train, subprocess_env, tiny_qwen3, train_cmd, write_corpus

from data.tokenizer_training import train_tokenizer
from qwen3 import Qwen3
from qwen3.tokenizer import Qwen3Tokenizer
from trainer.checkpoint import save_checkpoint
from trainer.cli import run_subcommand
from trainer.config import WandbConfig
from trainer.lm_eval_tasks import LOCAL_TASKS
from trainer.metrics import WandbLogger, wandb_run_id
from trainer.run_layout import set_pointer

SPEAKERS = ["ROMEO", "JULIET", "HAMLET", "OPHELIA"]
N_ITEMS, LIMIT = 20, 12


def _write_task(folder: Path) -> Path:
    """A multiple-choice task over a small jsonl: which speaker a line names."""
    rng = random.Random(0)
    items = []
    for _ in range(N_ITEMS):
        who = rng.choice(SPEAKERS)
        items.append(
            {
                "question": f"{who}:\nWho speaks here?",
                "choices": SPEAKERS,
                "answer": SPEAKERS.index(who),
            }
        )
    folder.mkdir(parents=True)
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    task = folder / "speaker_mc.yaml"
    task.write_text(
        "task: speaker_mc\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n"
        "  - metric: acc\n"
    )
    return task


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A run (``runs/r1``) whose best checkpoint is a tiny model, with an offline wandb run,
    and the task YAML."""
    root = tmp_path_factory.mktemp("eval")
    tok = train_tokenizer(write_corpus(root / "play.txt").read_text().split("\n\n"), 300)
    model = tiny_qwen3(tok, max_positions=512)
    # Logits of several nats (not the near-uniform ones of a fresh init), so each item's
    # answer is decided by a clear margin, the same in transformers as in our own forward.
    torch.nn.init.normal_(model.model.embed_tokens.weight, std=1.0)
    run = root / "runs" / "r1"
    run.mkdir(parents=True)
    set_pointer(run, "best", save_checkpoint(run, 10, model, tok, {"step": 10}, "seed: 0\n"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_CACHE", str(root / "hf-datasets"))  # datasets' cache of the task
        mp.setenv("WANDB_DIR", str(root / "wandb-dir"))  # where run_train's processes look
        mp.setenv("WANDB_MODE", "offline")
        logger = WandbLogger(WandbConfig(mode="offline"), run, "r1", {"seed": 0})
        logger.log({"step": 10, "val_loss": 5.0})
        logger.finish()
        import wandb

        wandb.teardown()
        yield root, run, _write_task(root / "tasks")


def _expected_accuracy(ckpt: Path, task: Path) -> float:
    """The task's accuracy computed here with our own model and tokenizer, as lm-eval defines
    it: the choice with the highest summed log-likelihood after "question + ' '", where the
    continuation's tokens are those of the whole text past the context's."""
    tok = Qwen3Tokenizer.from_dir(ckpt)
    model = Qwen3.from_pretrained(ckpt, device=torch.device("cpu")).eval()
    lines = (task.parent / "items.jsonl").read_text().splitlines()[:LIMIT]
    correct = 0
    for item in map(json.loads, lines):
        context = tok.encode(item["question"])
        scores = []
        for choice in item["choices"]:
            whole = tok.encode(f"{item['question']} {choice}")
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).float(), dim=-1)[0]
            cont = range(len(context), len(whole))
            scores.append(sum(logp[i - 1, whole[i]].item() for i in cont))
        ranked = sorted(scores, reverse=True)
        assert ranked[0] - ranked[1] > 1e-3  # a clear winner: the comparison below means something
        correct += scores.index(ranked[0]) == item["answer"]
    return correct / LIMIT


def test_eval_runs_a_local_task_end_to_end(setup) -> None:
    root, run, task = setup
    res = run_train(
        root,
        "eval",
        f"ckpt={run}",
        f"tasks=[{task}]",
        f"limit={LIMIT}",
        "num_fewshot=0",
        "batch_size=4",
        "device=cpu",
    )
    assert res.returncode == 0, res.stderr
    ckpt = (run / "step-000010").resolve()
    assert f"checkpoint {ckpt}" in res.stdout
    table = [line.replace(" ", "") for line in res.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("|Tasks|Version|Filter|n-shot|Metric|")
    (row,) = (line for line in table if line.startswith("|speaker_mc|"))
    assert "|acc|" in row

    (written,) = (run / "eval").glob("*.json")
    assert f"scores written to {written} (the run directory)" in res.stdout
    record = json.loads(written.read_text())
    assert record["checkpoint"] == str(ckpt) and record["step"] == 10
    scores = record["results"]["speaker_mc"]
    assert scores["sample_len"] == LIMIT and record["n-shot"]["speaker_mc"] == 0
    assert scores["acc,none"] == pytest.approx(_expected_accuracy(ckpt, task), abs=1e-9)
    assert f"|{scores['acc,none']:.4f}|" in row

    # The scores went to the run's own wandb run (same id, resumed offline).
    run_id = wandb_run_id(run)
    assert f"scores logged to the run's wandb run {run_id}" in res.stdout
    runs = sorted((root / "wandb-dir" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2  # training's, then eval's
    logged = next(runs[-1].glob("run-*.wandb")).read_bytes()  # protobuf: keys, values as text
    assert b"downstream/speaker_mc/acc" in logged and repr(scores["acc,none"]).encode() in logged


def test_eval_defaults_to_the_newest_run_and_writes_beside_a_plain_dir(
    setup, tmp_path, capsys, monkeypatch
) -> None:
    _, run, task = setup
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    args = [f"tasks={task}", "limit=0.25", "device=cpu", "wandb=false"]
    assert run_subcommand("eval", [f"out_dir={run.parent}", *args]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {(run / 'step-000010').resolve()}" in out
    assert "wandb" not in out and not (tmp_path / "wandb-dir").exists()
    newest = max((run / "eval").glob("*.json"), key=lambda p: p.stat().st_mtime)
    assert json.loads(newest.read_text())["results"]["speaker_mc"]["sample_len"] == N_ITEMS // 4

    plain = tmp_path / "models" / "speaker-model"
    shutil.copytree(run / "step-000010", plain, ignore=shutil.ignore_patterns("trainer_state*"))
    assert run_subcommand("eval", [f"ckpt={plain}", *args]) == 0
    out = capsys.readouterr().out
    (written,) = (tmp_path / "models" / "eval").glob("*.json")
    assert f"scores written to {written} (beside the model directory)" in out
    assert json.loads(written.read_text())["step"] is None


def test_the_shipped_tasks_read_their_items_from_any_directory(setup, tmp_path) -> None:
    """core_local's YAMLs name their jsonl files beside them; ``train.py eval`` run from outside
    the repository scores every item (datasets alone reads a relative path from the working
    directory)."""
    root, run, _ = setup
    plain = tmp_path / "model"
    shutil.copytree(run / "step-000010", plain, ignore=shutil.ignore_patterns("trainer_state*"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    args = [f"ckpt={plain}", "tasks=[core_local]", "limit=3", "device=cpu", "wandb=false"]
    res = subprocess.run(
        train_cmd("eval", *args),
        cwd=elsewhere,
        env=subprocess_env(root),
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (written,) = (tmp_path / "eval").glob("*.json")
    results = json.loads(written.read_text())["results"]
    assert sorted(results) == sorted(LOCAL_TASKS)
    assert all(results[t]["sample_len"] == 3 for t in LOCAL_TASKS)
    assert list(elsewhere.iterdir()) == []


def _one_line_error(res, after_progress_bars: bool = False) -> str:
    """The one line of a user's mistake (after transformers' weight-loading bar, where the
    mistake shows only once the model is loaded), and no traceback."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    if not after_progress_bars:
        assert len(lines) == 1, res.stderr
    assert lines[-1].startswith("error: ")
    return lines[-1]


def test_eval_mistakes_are_one_line(setup, tmp_path, capsys) -> None:
    root, run, task = setup
    ckpt = f"ckpt={run}"
    line = _one_line_error(run_train(root, "eval", ckpt, f"tasks=[{tmp_path}/missing.yaml]"))
    assert "missing.yaml: no such task file" in line

    def error(*args: str) -> str:  # the same in process, quicker
        assert run_subcommand("eval", list(args)) == 2
        captured = capsys.readouterr().err.strip()
        assert captured.startswith("error: ") and "\n" not in captured, captured
        return captured

    line = error(ckpt)
    assert "tasks=[] must name at least one task" in line and "tasks=[hellaswag" in line
    not_a_task = tmp_path / "notes.yaml"
    not_a_task.write_text("just: notes\n")
    assert "notes.yaml is not an lm-eval task YAML" in error(ckpt, f"tasks=[{not_a_task}]")
    no_data = tmp_path / "no_data.yaml"
    no_data.write_text(task.read_text().replace(str(task.parent / "items.jsonl"), "absent.jsonl"))
    line = error(ckpt, f"tasks=[{no_data}]")
    assert "tasks: speaker_mc: Unable to find" in line and "absent.jsonl" in line
    assert "read from the task YAML's folder, else from the working directory" in line
    line = error(ckpt, f"tasks=[{task}]", "limit=0")
    assert "limit=0 must be a count >= 1 or a fraction in (0, 1)" in line
    line = error(ckpt, f"tasks=[{task}]", "lmit=5")
    assert "eval.lmit is not a known config key; did you mean eval.limit?" in line
    assert "no trained run" in error(f"out_dir={tmp_path}", f"tasks=[{task}]")


def test_eval_without_lm_eval_says_how_to_install(setup, capsys, monkeypatch) -> None:
    """lm-eval absent: Python's import machinery refuses a module whose sys.modules entry is
    None."""
    _, run, task = setup
    args = [f"ckpt={run}", f"tasks=[{task}]"]
    with monkeypatch.context() as mp:
        for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
            mp.setitem(sys.modules, name, None)
        mp.setitem(sys.modules, "lm_eval", None)
        assert run_subcommand("eval", args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: eval needs lm-eval") and "pip install -e '.[eval]'" in err
    assert "\n" not in err


@pytest.mark.slow  # each indexes lm-eval's thousands of task YAMLs (about 30 s)
def test_eval_unknown_task_and_no_network_are_one_line(setup, tmp_path, monkeypatch) -> None:
    root, run, _ = setup
    line = _one_line_error(run_train(root, "eval", f"ckpt={run}", "tasks=[hellaswagg]"))
    assert "'hellaswagg' is not an lm-eval task; did you mean hellaswag" in line
    # Offline (as every test is), a task whose data is on the hub: its data is not cached here.
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    res = run_train(root, "eval", f"ckpt={run}", "tasks=[arc_easy]", "limit=2")
    line = _one_line_error(res, after_progress_bars=True)
    assert "must come from the Hugging Face hub, which cannot be reached" in line
    assert "unset HF_DATASETS_OFFLINE" in line and "local task YAML" in line
