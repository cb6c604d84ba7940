"""Weighted mixtures end to end: one tokenizer, a cache per source, batches by weight, per-source
val metrics with a weighted total, exact resume, and one-line refusals of bad mixtures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_trainer_support import (
    compose_run_config,
    make_trainer,
    read_metrics,
    small_run_overrides,
    write_corpus,
)

from data import DataConfig, prepare_data
from trainer.errors import ConfigError

WEIGHTS = (3.0, 1.0)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    plays = write_corpus(root / "plays.txt", n_docs=200, seed=0)
    notes = root / "notes.txt"  # a different kind of text: numbers and units
    rng = np.random.default_rng(1)
    notes.write_text(
        "\n\n".join(
            " ".join(
                f"{int(v)} {u}" for v, u in zip(rng.integers(0, 999, 30), "kgmsAL" * 5, strict=True)
            )
            for _ in range(200)
        )
        + "\n"
    )
    return root, plays, notes


def _sources(plays, notes) -> list[dict]:
    return [
        {"source": "local", "paths": [str(plays)], "weight": WEIGHTS[0], "label": "plays"},
        {"source": "local", "paths": [str(notes)], "weight": WEIGHTS[1], "label": "notes"},
    ]


def _override(plays, notes) -> str:
    entries = [
        f"{{source:local,paths:[{p}],weight:{w},label:{name}}}"
        for p, w, name in ((plays, WEIGHTS[0], "plays"), (notes, WEIGHTS[1], "notes"))
    ]
    return f"data.sources=[{','.join(entries)}]"


def test_one_tokenizer_and_a_cache_per_source(corpora) -> None:
    root, plays, notes = corpora
    cache = root / "cache-prepare"
    cfg = DataConfig(cache_dir=str(cache), sources=_sources(plays, notes))
    data = prepare_data(cfg, 1024, progress=False)
    assert data.is_mixture and [s.label for s in data.sources] == ["plays", "notes"]
    assert [s.weight for s in data.sources] == list(WEIGHTS)
    assert data.sources[0].cache_path != data.sources[1].cache_path
    assert len(data.train) == sum(len(s.train) for s in data.sources)
    # The shared tokenizer learnt from both: on each kind of text it beats a tokenizer trained
    # on the other source alone.
    alone = {
        p: prepare_data(
            DataConfig(source="local", paths=[str(p)], cache_dir=str(cache)), 1024, progress=False
        ).tokenizer
        for p in (plays, notes)
    }
    for text_of, other in ((plays, notes), (notes, plays)):
        text = text_of.read_text()
        assert len(data.tokenizer.encode(text)) < len(alone[other].encode(text))
    # A source's cache is its own: the same source alone, with this tokenizer, reuses it.
    given = DataConfig(
        source="local", paths=[str(notes)], cache_dir=str(cache), tokenizer=str(data.tokenizer_dir)
    )
    single = prepare_data(given, 1024, progress=False)
    assert single.cache_path == data.sources[1].cache_path
    assert prepare_data(cfg, 1024, progress=False).fingerprint == data.fingerprint


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ("[{source:shakespeare,weight:-1}]", r"data.sources\[0\].weight=-1 must be .* >= 0"),
        ("[{source:shakespeare,weight:0}]", "every weight is 0"),
        (
            "[{source:shakespeare,tokenizer:/a,label:x},{source:shakespeare,tokenizer:/b}]",
            "disagree on the tokenizer",
        ),
        ("[{source:shakespeare,vocab_size:300}]", "vocab_size .* set once"),
    ],
)
def test_bad_mixtures_are_refused_in_one_line(sources, message) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        compose_run_config([f"data.sources={sources}"])
    assert "\n" not in str(err.value)


def _mixture_run(corpora, *extra: str) -> list[str]:
    root, plays, notes = corpora
    return [
        *small_run_overrides(root, plays, cache_dir=root / "cache"),
        _override(plays, notes),
        *extra,
    ]


def test_training_draws_by_weight_reports_each_source_and_resumes_exactly(
    corpora, tmp_path
) -> None:
    common = ("trainer.eval_every=2", "trainer.save_every=2", "sample.max_new_tokens=0")
    whole = make_trainer(_mixture_run(corpora, "trainer.max_steps=4", *common), tmp_path / "a")
    whole.fit()
    rows = read_metrics(tmp_path / "a")
    evals = [r for r in rows if "val_loss" in r]
    assert len(evals) == 2
    for ev in evals:
        for label in ("plays", "notes"):
            assert math.isfinite(ev[f"val_loss/{label}"]) and f"val_bpb/{label}" in ev
        total = (WEIGHTS[0] * ev["val_loss/plays"] + WEIGHTS[1] * ev["val_loss/notes"]) / 4
        assert ev["val_loss"] == pytest.approx(total)
        assert ev["val_ppl"] == pytest.approx(math.exp(ev["val_loss"]))
    sampler = whole.parts.sampler
    assert sampler.is_mixture and sampler.weights == list(WEIGHTS)

    # Resume from the step-2 checkpoint in another run directory: steps 3 and 4 again.
    resumed = make_trainer(_mixture_run(corpora, "trainer.max_steps=4", *common), tmp_path / "b")
    resumed.resume_from(tmp_path / "a" / "step-000002")
    assert resumed.step == 2
    resumed.fit()
    again = [r["train_loss"] for r in read_metrics(tmp_path / "b")]
    assert again == [r["train_loss"] for r in rows if r["step"] > 2]  # bit for bit
    x, _ = resumed.parts.sampler.batch(3)
    assert torch.equal(x, whole.parts.sampler.batch(3)[0])
