"""Write ``shakespeare_next_speaker.jsonl`` and ``shakespeare_missing_word.jsonl``: two local
multiple-choice tasks of the ``core`` suites, from the held-out plays of the default corpus (its
val split), four choices each, so a model that has learned nothing scores about 0.25.

- next speaker: a speech (its speaker and up to its last four lines), then which of four
  speakers of the same play speaks next;
- missing word: a line and the next one without its last word, then which of four line-final
  words of the same play ends it.

python benchmarks/lm_eval_tasks/make_shakespeare_tasks.py
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from data.shakespeare import shakespeare_documents

N_ITEMS = 200
_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{3,})[^A-Za-z]*$")  # a line's text before its last word


def _speeches(play: str) -> list[list[tuple[str, str]]]:
    """Runs of consecutive speeches (speaker, text): a stage direction or heading between two
    speeches ends a run."""
    runs: list[list[tuple[str, str]]] = [[]]
    for block in play.split("\n\n"):
        head, _, text = block.partition("\n")
        if head.endswith(":") and len(head.split()) <= 3 and text.strip():
            runs[-1].append((head[:-1], text))
        elif runs[-1]:
            runs.append([])
    return [run for run in runs if len(run) >= 2]


def next_speaker_items(plays: list[str], rng: random.Random) -> list[dict[str, object]]:
    items: list[dict[str, object]] = []
    by_play = [(_speeches(p), sorted({s for run in _speeches(p) for s, _ in run})) for p in plays]
    while len(items) < N_ITEMS:
        runs, speakers = rng.choice(by_play)
        run = rng.choice(runs)
        i = rng.randrange(len(run) - 1)
        (who, text), (nxt, _) = run[i], run[i + 1]
        if who == nxt:
            continue
        wrong = rng.sample([s for s in speakers if s != nxt], 3)
        answer = rng.randrange(4)
        lines = "\n".join(text.splitlines()[-4:])
        choices = [f"{s}:" for s in [*wrong[:answer], nxt, *wrong[answer:]]]
        items.append({"context": f"{who}:\n{lines}\n\n", "choices": choices, "answer": answer})
    return items


def missing_word_items(plays: list[str], rng: random.Random) -> list[dict[str, object]]:
    items: list[dict[str, object]] = []
    verse = [[ln for ln in p.splitlines() if len(ln.split()) >= 5] for p in plays]
    ends = [sorted({m.group(2) for ln in lines if (m := _WORD.match(ln))}) for lines in verse]
    while len(items) < N_ITEMS:
        k = rng.randrange(len(plays))
        lines = verse[k]
        i = rng.randrange(1, len(lines))
        m = _WORD.match(lines[i])
        if m is None:
            continue
        word = m.group(2)
        wrong = rng.sample([w for w in ends[k] if w.lower() != word.lower()], 3)
        answer = rng.randrange(4)
        choices = [*wrong[:answer], word, *wrong[answer:]]
        context = f"{lines[i - 1]}\n{m.group(1)}"
        items.append({"context": context, "choices": choices, "answer": answer})
    return items


def main() -> None:
    plays = shakespeare_documents("val", None, 0.05)
    here = Path(__file__).parent
    for name, make, seed in (
        ("shakespeare_next_speaker", next_speaker_items, 1),
        ("shakespeare_missing_word", missing_word_items, 2),
    ):
        items = make(plays, random.Random(seed))
        out = here / f"{name}.jsonl"
        out.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
        print(f"wrote {len(items)} items to {out}")


if __name__ == "__main__":
    main()
