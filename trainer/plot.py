"""A PNG of train/val loss, val accuracy and val perplexity against steps (headless matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_plot(records: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Draw the curves in ``records`` (metrics.jsonl rows) to ``path``, replacing it atomically."""
    fig, (ax_loss, ax_acc, ax_ppl) = plt.subplots(1, 3, figsize=(15, 4))
    ax_loss.plot(*_series(records, "train_loss"), label="train", alpha=0.8)
    ax_loss.plot(*_series(records, "val_loss"), "o-", label="val")
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax_loss.legend()
    ax_acc.plot(*_series(records, "val_acc"), "o-", color="tab:green")
    ax_acc.set(xlabel="step", ylabel="next-token accuracy", title="val accuracy")
    ax_ppl.plot(*_series(records, "val_ppl"), "o-", color="tab:red")
    ax_ppl.set(xlabel="step", ylabel="perplexity", title="val perplexity", yscale="log")
    for ax in (ax_loss, ax_acc, ax_ppl):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
