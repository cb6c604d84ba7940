"""bench_peers runs its smallest path (tiny, ours against transformers) end to end: both models
hold the same weights, pass its checks of equal parameter counts and first losses, and the table
has a ratio for each; no timing is asserted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_peers_tiny_against_transformers() -> None:
    script = REPO / "benchmarks" / "bench_peers.py"
    args = ["--quick", "--threads", "1", "--shapes", "tiny", "--rounds", "1"]
    res = subprocess.run(
        [sys.executable, str(script), *args, "--peers", "ours,transformers"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    found = re.findall(r"tiny (\w+): ([\d.]+)M params, first loss ([\d.]+)", res.stdout)
    assert [name for name, _, _ in found] == ["ours", "transformers"]
    (_, ours_params, ours_loss), (_, hf_params, hf_loss) = found
    assert ours_params == hf_params and abs(float(ours_loss) - float(hf_loss)) < 1e-3
    row = next(ln for ln in res.stdout.splitlines() if ln.startswith("| tiny "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "tiny" and cells[2] == cells[3] == "not run"  # torchtitan, litgpt
    assert float(cells[1].rstrip("x")) > 0
    assert re.fullmatch(r"1\.00x \([\d,]+ tok/s\)", cells[4])
