"""Schedule values at step 0, end of warmup, midpoint and end, for every schedule."""

from __future__ import annotations

import itertools
import math
from functools import partial

import pytest

from optim import lr_factor, muon_momentum, wsd_decay_start

# warmup 10, run 110: decay spans steps 10..110, so its midpoint is step 60
cosine = partial(lr_factor, schedule="cosine", warmup_steps=10, max_steps=110, min_lr_ratio=0.1)


def test_cosine_values() -> None:
    assert cosine(0) == pytest.approx(0.1)  # (0 + 1) / 10: the first update is never zero
    assert cosine(9) == pytest.approx(1.0)  # last warmup step runs at the peak
    assert cosine(10) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.55)  # floor + half the way: 0.1 + 0.9 * 0.5
    assert cosine(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine(110) == pytest.approx(0.1)
    assert cosine(500) == pytest.approx(0.1)  # past the end: stays at the floor
    values = [cosine(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_cosine_without_warmup_starts_at_peak() -> None:
    f = partial(lr_factor, schedule="cosine", warmup_steps=0, max_steps=100, min_lr_ratio=0.0)
    assert f(0) == 1.0
    assert f(50) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12)


def test_wsd_values() -> None:
    wsd = partial(
        lr_factor,
        schedule="wsd",
        warmup_steps=10,
        max_steps=110,
        min_lr_ratio=0.0,
        decay_fraction=0.2,
    )
    start = wsd_decay_start(110, 10, 0.2)
    assert start == 88  # 110 - round(0.2 * 110)
    assert wsd(0) == pytest.approx(0.1)
    assert wsd(9) == pytest.approx(1.0)
    assert wsd(60) == 1.0  # midpoint of the run: stable
    assert wsd(start - 1) == 1.0
    assert wsd(start) == 1.0
    assert wsd(99) == pytest.approx(0.5)  # midpoint of the decay
    assert wsd(110) == pytest.approx(0.0, abs=1e-12)


def test_wsd_floor() -> None:
    wsd = partial(
        lr_factor,
        schedule="wsd",
        warmup_steps=0,
        max_steps=100,
        min_lr_ratio=0.1,
        decay_fraction=0.5,
    )
    assert wsd(0) == 1.0
    assert wsd(75) == pytest.approx(0.55)
    assert wsd(100) == pytest.approx(0.1)


def test_constant_values() -> None:
    const = partial(lr_factor, schedule="constant", warmup_steps=4, max_steps=100, min_lr_ratio=0.1)
    assert [const(s) for s in (0, 1, 3, 4, 50, 100)] == pytest.approx([0.25, 0.5, 1, 1, 1, 1])


def test_unknown_schedule_is_named() -> None:
    with pytest.raises(ValueError, match="cosine, wsd, constant"):
        lr_factor(0, schedule="linear", warmup_steps=0, max_steps=10, min_lr_ratio=0.1)


def test_muon_momentum_ramp() -> None:
    ramp = partial(muon_momentum, momentum=0.95, warmup_steps=300, start=0.85)
    assert ramp(0) == pytest.approx(0.85)
    assert ramp(150) == pytest.approx(0.90)
    assert ramp(300) == 0.95
    assert ramp(10_000) == 0.95
    assert muon_momentum(0, momentum=0.9, warmup_steps=0, start=0.5) == 0.9
