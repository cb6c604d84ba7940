"""Write ``shakespeare_next_line.jsonl``: a local multiple-choice task for ``train.py eval``.

Each item is a line of verse from a held-out play (the default corpus's val split) and four
candidate next lines: the true one and three lines of the same play drawn at random. A model
that has learned nothing scores about 0.25.

python benchmarks/lm_eval_tasks/make_shakespeare_next_line.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from data.shakespeare import shakespeare_documents

N_ITEMS = 200


def main() -> None:
    rng = random.Random(0)
    items = []
    plays = [
        [ln for ln in play.splitlines() if len(ln.split()) >= 5 and not ln.endswith(":")]
        for play in shakespeare_documents("val", None, 0.05)
    ]
    while len(items) < N_ITEMS:
        lines = rng.choice(plays)
        i = rng.randrange(len(lines) - 1)
        wrong = rng.sample([ln for ln in lines if ln != lines[i + 1]], 3)
        answer = rng.randrange(4)
        choices = [*wrong[:answer], lines[i + 1], *wrong[answer:]]
        items.append({"line": lines[i], "choices": choices, "answer": answer})
    out = Path(__file__).with_name("shakespeare_next_line.jsonl")
    out.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    print(f"wrote {len(items)} items to {out}")


if __name__ == "__main__":
    main()
