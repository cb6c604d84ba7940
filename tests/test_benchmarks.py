"""The benchmark scripts run end to end (``--quick``) and print their comparison tables; no timing
is asserted, only that both sides ran and agreed where they must."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optim.muon_math import default_dtype

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    res = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--quick", "--threads", "1", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _table(out: str) -> list[dict[str, str]]:
    """The markdown table a benchmark prints, as one dict per row."""
    lines = [ln for ln in out.splitlines() if ln.startswith("|") and not ln.startswith("|--")]
    header, *rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return [dict(zip(header, row, strict=True)) for row in rows]


@pytest.mark.slow
def test_bench_train_prints_ratios_and_mfu() -> None:
    rows = {r["model + optimizer"]: r for r in _table(_run("bench_train.py", "--shapes", "tiny"))}
    assert set(rows) == {
        "transformers AdamW",
        "ours AdamW",
        "ours Muon+AdamW",
        "ours Muon+AdamW, autograd MLP",
    }
    assert float(rows["transformers AdamW"]["ratio"]) == 1.0
    for row in rows.values():
        assert float(row["ratio"]) > 0 and int(row["MFU"].rstrip("%")) > 0


@pytest.mark.slow
def test_bench_train_compile_prints_ratio_and_compile_time() -> None:
    (row,) = _table(_run("bench_train.py", "--compile", "--shapes", "tiny"))
    assert row["shape"] == "tiny" and row["batch"] == "16x256"
    assert float(row["ratio (wall)"]) > 0 and float(row["ratio (CPU)"]) > 0
    assert row["compile"].endswith("s CPU)")
    # Most of a tiny step is matmuls and attention, so the ceiling is finite and above 1.
    share = int(row["library share"].rstrip("%"))
    assert 0 < share < 100 and float(row["ceiling"]) == pytest.approx(100 / share, rel=0.1)


@pytest.mark.slow
def test_bench_cpu_allocator_runs_both_sides_and_the_retained_one_stops_faulting() -> None:
    rows = {r["malloc"]: r for r in _table(_run("bench_cpu_allocator.py"))}
    assert set(rows) == {"glibc default", "retained"}
    assert all(r["shape"] == "tiny" and float(r["s/step"]) > 0 for r in rows.values())
    assert float(rows["glibc default"]["ratio"]) == 1.0 and float(rows["retained"]["ratio"]) > 0
    # counted, not timed: with freed memory kept, a steady step takes no fresh pages
    faults = {k: float(r["page faults/step"].replace(",", "")) for k, r in rows.items()}
    assert faults["retained"] < faults["glibc default"], rows


@pytest.mark.slow
def test_bench_generate_matches_transformers_tokens() -> None:
    out = _run("bench_generate.py", "--batches", "1,2", "--shapes", "tiny,gqa5-160")
    for shape in ("tiny", "gqa5-160"):
        for batch in (1, 2):
            assert f"{shape} batch {batch}: greedy tokens identical to transformers: True" in out
    rows = _table(out)
    assert [(r["shape"], r["batch"]) for r in rows] == [
        ("tiny", "1"),
        ("tiny", "2"),
        ("gqa5-160", "1"),
        ("gqa5-160", "2"),
    ]
    assert all(float(r["ratio"].rstrip("x")) > 0 for r in rows)
    assert "minimum ratio at batch 1:" in out and "minimum ratio at batch 2:" in out


@pytest.mark.slow
def test_bench_fsdp_memory_prints_both_peaks_and_their_ratio() -> None:
    rows = {r["run"]: r for r in _table(_run("bench_fsdp_memory.py", "--steps", "1"))}
    assert set(rows) == {"DDP", "DDP at FSDP's threshold", "FSDP", "FSDP, async save"}
    assert float(rows["DDP"]["ratio to DDP"]) == 1.0
    peaks = {k: float(r["peak RSS, largest process (MiB)"]) for k, r in rows.items()}
    assert all(p > 100 for p in peaks.values())  # a process that imported torch and trained
    ratio = float(rows["FSDP"]["ratio to DDP"])
    assert ratio == pytest.approx(peaks["FSDP"] / peaks["DDP"], abs=0.01)
    for row in rows.values():  # every job saved, and training waited at most the whole save
        assert 0 < float(row["training waited (s)"]) <= float(row["save (s)"])
        assert float(row["CPU (s)"]) > 0


@pytest.mark.slow
def test_bench_recipe_times_each_recipe_against_the_default() -> None:
    out = _run("bench_recipe.py", "--rounds", "1", "--steps", "1", "half:batch_size=8,seq_len=64")
    rows = {r["recipe"]: r for r in _table(out)}
    assert set(rows) == {"default", "half"}
    assert float(rows["default"]["step cost / default"]) == 1.0
    assert float(rows["half"]["step cost / default"]) > 0


@pytest.mark.slow
def test_bench_muon_ddp_times_the_split_against_replicated() -> None:
    out = _run("bench_muon.py", "--ddp", "--models", "tiny")
    (row,) = _table(out)
    assert row["model"] == "tiny" and row["matrices (shapes)"] == "21 in 4"
    assert float(row["replicated ms"]) > 0 and float(row["split ms"]) > 0
    assert float(row["largest weight difference"]) <= 1e-5  # the same weights either way


@pytest.mark.slow
def test_bench_muon_memory_counts_the_steps_tensors_whole_and_in_chunks() -> None:
    rows = {r["step"]: r for r in _table(_run("bench_muon_memory.py"))}
    assert set(rows) == {"whole batches", "chunks of 0.375 MiB"}
    whole, chunked = (float(r["peak transient MiB"]) for r in rows.values())
    assert whole > chunked > 0  # chunks of a sixth of the batch hold less at once


@pytest.mark.slow
def test_bench_loss_checks_the_compiled_step_and_times_both() -> None:
    out = _run("bench_loss.py", "--eager-rows", "64")
    assert "tiny: compiled at 64 rows" in out and "equal to eager" in out
    rows = {r["chunk step"]: r for r in _table(out)}
    assert set(rows) == {
        "eager, 128 rows",  # the CPU default at tiny's vocabulary
        "eager, 64 rows",
        "compiled, 64 rows",
        "compiled, 256 rows",
    }
    assert float(rows["eager, 128 rows"]["ratio (CPU)"]) == 1.0
    assert all(float(r["CPU ms"]) > 0 for r in rows.values())


@pytest.mark.slow
def test_bench_loss_amp_times_the_weight_gradient_per_chunk_against_grouped() -> None:
    out = _run("bench_loss.py", "--amp")
    assert "precision: bf16 autocast" in out and "equal to eager" in out
    rows = {r["chunk step"]: r for r in _table(out)}
    assert set(rows) == {
        "eager, 128 rows",
        "eager, 128 rows, float32 weight GEMM per chunk",
        "compiled, 64 rows",  # --quick's sizes
        "compiled, 256 rows",
    }
    assert all(float(r["CPU ms"]) > 0 for r in rows.values())


@pytest.mark.slow
def test_bench_muon_checks_torchs_step_and_times_ours() -> None:
    out = _run("bench_muon.py", "--rounds", "1")
    for preset in ("tiny", "tiny-moe"):
        assert f"{preset}: " in out and "batched bf16 equal to torch's bit for bit: True" in out
        # float32 on CPUs without native bf16 matmuls, bf16 on those with (optim.muon_math)
        assert f"Newton-Schulz in {default_dtype(torch.device('cpu'))}" in out
    rows = _table(out)
    assert [(r["model"], r["threads"]) for r in rows] == [
        ("tiny", "1"),
        ("tiny", "2"),
        ("tiny-moe", "1"),
        ("tiny-moe", "2"),
    ]
    assert all(float(r["speedup (torch / ours)"]) > 0 for r in rows)


@pytest.mark.slow
def test_bench_packing_compares_stream_bos_and_the_document_mask(tmp_path) -> None:
    corpus = REPO.parent / "shared" / "corpora" / "tinystories-val-1k.txt"
    if not corpus.exists():
        pytest.skip(f"{corpus} is not here (a fresh clone has no ../shared)")
    out = _run("bench_packing.py", "--corpus", str(corpus), "--out-dir", str(tmp_path))
    quality, speed = out.split("training tokens/s")
    rows = {r["packing"]: r for r in _table(quality)}
    assert set(rows) == {"stream", "bos", "bos+mask"}
    for row in rows.values():
        assert 0 < float(row["val bpb, windows"]) < 20 and 0 < float(row["val bpb, documents"]) < 20
    ratios = {r["packing"]: float(r["x stream"]) for r in _table(speed)}
    assert ratios["stream"] == 1.0 and ratios["bos"] > 0 and ratios["bos+mask"] > 0


@pytest.mark.slow
def test_bench_downstream_prints_the_cost_ratio() -> None:
    out = _run("bench_downstream.py")
    rows = {r["measure"]: r for r in _table(out)}
    assert float(rows["training step"]["CPU s"]) > 0
    assert float(rows["one scoring of core_local"]["CPU s"]) > 0
    assert "ratio at the default cadence (1 scoring per 140 steps)" in out
    assert "downstream/core at the last round" in out


@pytest.mark.slow
def test_bench_sft_scores_the_model_before_and_after(tmp_path) -> None:
    out = _run("bench_sft.py", "--cache-dir", str(tmp_path / "cache"))
    rows = {r["model"]: r for r in _table(out.split("| system / user")[0])}
    assert set(rows) == {"pretrained", "after SFT"}
    assert all(float(r["held-out assistant loss"]) > 0 for r in rows.values())
    assert out.count("| You are ") == 3


@pytest.mark.slow
def test_bench_attention_checks_both_kernels_equal_and_times_them() -> None:
    out = _run("bench_attention.py")
    rows = _table(out)
    assert [r["dtype"] for r in rows] == ["bfloat16", "float32"]
    assert all(float(r["SDPA ms"]) > 0 and float(r["ours ms"]) > 0 for r in rows)
