"""data.packing=bos: rows of whole documents packed best-fit, pure in (seed, step, rank, world),
resumable; stream stays today's batches; document ids reach the model in a real run."""

from __future__ import annotations

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

from data import BatchSampler, DataConfig, DataError, val_samples
from data.packing import Packing, document_bounds, pack
from trainer.errors import ConfigError

SEP = 0


def _corpus(n_docs: int = 400, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """A token split as the cache holds one (each document ends with SEP) and its documents
    as packed (SEP first, then the document's tokens)."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, 50, int(rng.integers(1, 40))) for _ in range(n_docs)]
    split = np.concatenate([np.append(d, SEP) for d in docs]).astype(np.uint16)
    return split, [np.concatenate(([SEP], d)) for d in docs]


def _pieces(row: np.ndarray, ids: np.ndarray) -> list[np.ndarray]:
    return [row[ids == d] for d in np.unique(ids)]


def test_document_bounds_start_each_document_at_its_separator() -> None:
    split = np.array([5, 6, SEP, 7, SEP, SEP, 8, 9], dtype=np.uint16)
    bounds = document_bounds(split, SEP)
    assert bounds.tolist() == [-1, 2, 4, 5, 8]  # [5 6] [SEP 7] [SEP] [SEP 8 9]: last uncut
    assert document_bounds(split[:5], SEP).tolist() == [-1, 2, 4]  # a final SEP starts nothing


def test_rows_start_at_documents_and_hold_whole_documents_but_one_crop() -> None:
    split, docs = _corpus()
    rows, ids = pack(split, document_bounds(split, SEP), SEP, 7, rows=12, row_len=65, window=16)
    assert rows.shape == ids.shape == (12, 65)
    seen: list[int] = []
    for row, row_ids in zip(rows, ids, strict=True):
        assert row[0] == SEP and row_ids[0] == 0
        assert np.all(np.diff(row_ids) >= 0) and np.all(np.diff(row_ids) <= 1)
        pieces = _pieces(row, row_ids)
        for k, piece in enumerate(pieces):
            matches = [i for i, d in enumerate(docs) if np.array_equal(d[: len(piece)], piece)]
            whole = [i for i in matches if len(docs[i]) == len(piece)]
            assert matches, "every piece is a document's beginning"
            if k < len(pieces) - 1:  # only a row's last piece may be cropped
                assert whole
            if whole and k < len(pieces) - 1:  # a crop's few tokens can match several
                seen.append(whole[0])
    # one stream per step: no document twice (the corpus has far more than these rows need)
    assert len(seen) == len(set(seen))


def test_best_fit_prefers_the_longest_document_that_fits() -> None:
    # packed lengths 4, 9, 3, 6 (with SEP), then documents too long for a row of 10: the first
    # row opens with the stream's next (4) and fills the 6 left best (6); the next opens with
    # 9, and as nothing fits the last token, crops the oldest at hand (3).
    docs = [np.arange(1, n) for n in (4, 9, 3, 6, 30, 30, 30, 30)]
    split = np.concatenate([np.append(d, SEP) for d in docs])
    rows, ids = pack(split, document_bounds(split, SEP), SEP, 0, rows=2, row_len=10, window=4)
    assert [len(p) for p in _pieces(rows[0], ids[0])] == [4, 6]
    assert [len(p) for p in _pieces(rows[1], ids[1])] == [9, 1]
    assert rows[1, 9] == SEP  # a crop is a document's beginning


def test_stream_packing_is_todays_batches() -> None:
    split, _ = _corpus()
    default = BatchSampler(split, 4, 32, seed=3)
    stream = BatchSampler(split, 4, 32, seed=3, packing=DataConfig().rows(SEP))
    for step in (0, 5):
        batch = stream.sample(step)
        x, y = default.batch(step)
        assert torch.equal(batch.x, x) and torch.equal(batch.y, y)
        assert batch.document_ids is None
    assert stream.state_dict() == default.state_dict()


def _bos(split: np.ndarray, rank: int = 0, world: int = 1, batch: int = 8) -> BatchSampler:
    packing = Packing("bos", 16, document_mask=True, separator=SEP)
    return BatchSampler(split, batch, 64, seed=11, rank=rank, world_size=world, packing=packing)


def test_bos_batches_are_pure_and_do_not_depend_on_the_process_count() -> None:
    split, _ = _corpus()
    one, again = _bos(split), _bos(split)
    later = one.sample(6)
    one.sample(0)
    same = again.sample(6)
    assert torch.equal(later.x, same.x) and torch.equal(later.y, same.y)
    assert later.document_ids is not None and same.document_ids is not None
    assert torch.equal(later.document_ids, same.document_ids)
    assert torch.equal(later.y[:, :-1], later.x[:, 1:])  # targets are the inputs shifted
    assert (later.x[:, 0] == SEP).all()
    assert not torch.equal(one.sample(7).x, later.x)
    # 2 ranks x 4 rows are the 8 rows of 1 process
    halves = [_bos(split, rank=r, world=2, batch=4).sample(6) for r in (0, 1)]
    assert torch.equal(torch.cat([h.x for h in halves]), later.x)
    ids = torch.cat([h.document_ids for h in halves if h.document_ids is not None])
    assert torch.equal(ids, later.document_ids)


def test_a_mixture_packs_each_sources_rows_from_its_own_documents() -> None:
    plays, _ = _corpus(seed=1)
    notes, _ = _corpus(seed=2)
    packing = Packing("bos", 8, document_mask=True, separator=SEP)

    def sampler(rank: int, world: int, batch: int) -> BatchSampler:
        return BatchSampler(
            [plays, notes], batch, 48, 5, rank, world, weights=[3, 1], packing=packing
        )

    whole = sampler(0, 1, 8).sample(4)
    halves = [sampler(r, 2, 4).sample(4) for r in (0, 1)]
    assert torch.equal(torch.cat([h.x for h in halves]), whole.x)
    assert (whole.x[:, 0] == SEP).all()
    streams = {bytes(np.asarray(s, dtype=np.int64)) for s in (plays, notes)}
    assert whole.document_ids is not None
    for row, ids in zip(whole.x.numpy(), whole.document_ids.numpy(), strict=True):
        body = row[1:][ids[1:] == 0].astype(np.int64).tobytes()  # the first document's text
        assert any(body in s for s in streams)


def test_bos_state_round_trips_and_refuses_other_packing() -> None:
    split, _ = _corpus()
    sampler = _bos(split)
    state = sampler.state_dict()
    assert state["packing"] == ["bos", 16]
    fresh = _bos(split)
    fresh.seed = 0
    fresh.load_state_dict(state)
    assert torch.equal(fresh.sample(3).x, sampler.sample(3).x)
    with pytest.raises(DataError, match="packing"):
        BatchSampler(split, 8, 64, seed=11).load_state_dict(state)


def test_val_rows_are_fixed_whole_documents() -> None:
    split, _ = _corpus()
    packing = Packing("bos", 16, document_mask=True, separator=SEP)
    first = list(val_samples(split, 2, 32, 3, packing))
    again = list(val_samples(split, 2, 32, 3, packing))
    assert len(first) == 3
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.x, b.x) and a.document_ids is not None
        assert (a.x[:, 0] == SEP).all()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.document_mask=true", "data.document_mask=true needs .* data.packing=bos"),
        ("data.packing=dense", "data.packing"),
        ("data.packing_window=0", "data.packing_window=0 must be at least 1"),
    ],
)
def test_bad_packing_settings_name_the_key_and_the_fix(override: str, message: str) -> None:
    with pytest.raises((ConfigError, DataError), match=message) as err:
        compose_run_config([override])
    assert "\n" not in str(err.value)


def test_a_run_with_document_masks_trains_evaluates_and_resumes_exactly(tmp_path) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt")
    base = [
        *small_run_overrides(tmp_path, corpus),
        "data.packing=bos",
        "data.document_mask=true",
        "data.packing_window=32",
        "trainer.eval_every=2",
        "trainer.save_every=2",
        "trainer.max_steps=4",
        "sample.max_new_tokens=0",
    ]
    whole = make_trainer(base, tmp_path / "a")
    # a batch whose rows hold several documents (a row opens with one that may fill it)
    batch = next(
        b
        for b in map(whole.parts.sampler.sample, range(50))
        if b.document_ids is not None and int(b.document_ids.max()) > 0
    )
    whole.fit()
    rows = read_metrics(tmp_path / "a")
    assert all(np.isfinite(r["val_bpb"]) for r in rows if "val_bpb" in r)
    resumed = make_trainer(base, tmp_path / "b")
    resumed.resume_from(tmp_path / "a" / "step-000002")
    resumed.fit()
    again = [r["train_loss"] for r in read_metrics(tmp_path / "b")]
    assert again == [r["train_loss"] for r in rows if r["step"] > 2]  # bit for bit
    # the mask changes what the model computes: without it the same rows give another loss
    x, y, docs = batch.x, batch.y, batch.document_ids
    model = whole.parts.model
    with torch.no_grad():
        assert not torch.allclose(model(x, targets=y), model(x, targets=y, document_ids=docs))


def test_documents_longer_than_a_row_are_used_too() -> None:
    """Documents longer than a row are taken (cropped) in about their turn: cropping the
    shortest instead (nanochat's rule) used them about 0.12x as often as the ones that fit."""
    rng = np.random.default_rng(3)
    docs = [rng.integers(1, 50, int(n)) for n in rng.integers(1, 120, 60)]
    split = np.concatenate([np.append(d, SEP) for d in docs]).astype(np.uint16)
    bounds = document_bounds(split, SEP)
    lengths = np.diff(bounds)
    uses = np.zeros(len(docs))
    for step in range(150):
        first = int(np.random.default_rng(step).integers(0, len(docs)))
        rows, ids = pack(split, bounds, SEP, first, rows=4, row_len=65, window=16)
        for row, row_ids in zip(rows, ids, strict=True):
            for piece in _pieces(row, row_ids):
                body = piece[1:]  # a crop of the separator alone names no document
                for i, doc in enumerate(docs):
                    if len(body) and np.array_equal(doc[: len(body)], body):
                        uses[i] += 1
    long, short = uses[lengths > 65].mean(), uses[lengths <= 65].mean()
    assert long > 0.2 * short, (long, short)
