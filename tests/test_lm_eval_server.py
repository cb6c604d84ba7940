"""lm-eval itself, through serve.py: its `local-completions` model scores a local multiple-choice
task exactly as its `hf` backend does on the same checkpoint (a real server on loopback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_serve_support import build_tiny_checkpoint

from serving.launch import serve_in_subprocess

lm_eval = pytest.importorskip("lm_eval")
# lm-eval's `hf` backend, the reference here, needs accelerate (its `hf` extra), and its API
# models tenacity (its `api` extra).
pytest.importorskip("accelerate", reason="lm-eval's hf backend needs accelerate (lm_eval[hf])")
pytest.importorskip("tenacity", reason="lm-eval's local-completions needs tenacity (lm_eval[api])")
from lm_eval.tasks import TaskManager  # noqa: E402

CONTEXT = 128
QUESTIONS = [
    ("Tom liked to play in the", ["garden", "river", "moon"], 0),
    ("One day Tom saw a big red", ["ball", "tree", "hill", "cat"], 0),
    ("A girl named Lily found the ball by the", ["river", "garden"], 0),
    ("The moon came up over the", ["hill", "ball", "girl"], 0),
    ("They played together all", ["afternoon", "night", "morning"], 0),
    ("Tom went home and slept", ["well", "badly"], 0),
    ("She smiled and gave it back to", ["Tom", "Lily", "the sun"], 0),
    ("The ball rolled down the", ["hill", "river", "tree"], 0),
]


def write_task(folder: Path) -> str:
    """A multiple-choice task over a jsonl file, as a user would write one; returns its name."""
    data = folder / "tiny_mc.jsonl"
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_mc.yaml").write_text(
        f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
    )
    return "tiny_mc"


def evaluate(model: str, model_args: dict, tasks: Path) -> tuple[dict, list[list[float]]]:
    """lm-eval's scores and each item's per-choice log-likelihoods, in document order."""
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[write_task(tasks)],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        batch_size=4,
        log_samples=True,
    )
    samples = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    lls = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    return out["results"]["tiny_mc"], lls


def test_local_completions_scores_like_the_hf_backend(tmp_path: Path) -> None:
    ckpt = build_tiny_checkpoint(tmp_path / "tiny", max_positions=CONTEXT)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    hf_scores, hf_lls = evaluate(
        "hf", {"pretrained": str(ckpt), "dtype": "float32", "device": "cpu"}, tasks
    )
    with serve_in_subprocess(ckpt) as url:
        api_args = {
            "base_url": f"{url}/v1/completions",
            "model": "tiny",
            "tokenizer_backend": "huggingface",
            "tokenizer": str(ckpt),
            "max_length": CONTEXT,
        }
        api_scores, api_lls = evaluate("local-completions", api_args, tasks)
    assert len(api_lls) == len(QUESTIONS)
    for api, hf in zip(api_lls, hf_lls, strict=True):
        assert api == pytest.approx(hf, abs=1e-4)
    for metric in ("acc,none", "acc_norm,none"):
        assert api_scores[metric] == hf_scores[metric]
