"""``init_from`` under FSDP: each rank of a real 2-process torchrun group (gloo) reads only its
slices of the Hugging Face safetensors (:func:`qwen3.hf.load_sharded`), and ends with exactly the
weights a single process loads (:func:`qwen3.hf.load_pretrained`), for transformers' own files
(bf16, split over an index; Qwen3-MoE with its released per-expert matrices) and, at a 217M
shape, with a peak RSS per process well under the one-process load's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_distributed_support import run_worker
from test_trainer_support import REPO

from qwen3 import Qwen3, Qwen3Config

transformers = pytest.importorskip("transformers")

# Each rank: build on meta, shard (one FSDP group per layer, as training does), allocate without
# initialising, read its slices; then, for the check only, gather tensor by tensor and compare
# with the one-process load on rank 0. argv: tmp dir, then the model directories.
SHARDED_LOAD_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    from qwen3 import Qwen3, Qwen3Config
    from qwen3.hf import load_pretrained, load_sharded
    from trainer.distributed import shard_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = {}
    for path in sys.argv[2:]:
        with torch.device("meta"):
            model = Qwen3(Qwen3Config.from_json_file(f"{path}/config.json"))
        shard_model(model, torch.device("cpu"))
        model.materialize("cpu", init=False)
        load_sharded(model, path)
        got = {"local": sum(p.to_local().numel() for p in model.parameters()),
               "total": model.num_params(), "dtype": str(model.dtype)}
        ref = load_pretrained(path, dtype=torch.float32).state_dict() if rank == 0 else None
        differ = []
        for name, t in model.state_dict().items():
            whole = t.full_tensor()  # collective: every rank gathers
            if ref is not None and not torch.equal(whole, ref[name]):
                differ.append(name)
        got["differ"] = differ
        out[path] = got
    json.dump(out, open(f"{sys.argv[1]}/{rank}.json", "w"))
    dist.destroy_process_group()
    """
)


def _dense(path: Path) -> Path:
    """transformers' Qwen3 in bf16 (as the released checkpoints), split into several files."""
    config = transformers.Qwen3Config(
        vocab_size=211,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def _moe(path: Path) -> Path:
    """transformers' Qwen3-MoE: 3 experts per layer over 2 ranks (2 + 1), per-expert files."""
    config = transformers.Qwen3MoeConfig(
        vocab_size=211,
        hidden_size=64,
        intermediate_size=112,
        moe_intermediate_size=32,
        num_experts=3,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(path)
    return path


def test_one_process_reads_the_same_weights_and_names_a_missing_tensor(tmp_path) -> None:
    """The same reader without a process group (the model whole in this process): the
    one-process load's weights, and a damaged directory is refused before anything is read."""
    from safetensors.torch import load_file, save_file

    from qwen3.hf import load_pretrained, load_sharded

    for path in (_dense(tmp_path / "dense"), _moe(tmp_path / "moe")):
        with torch.device("meta"):
            model = Qwen3(Qwen3Config.from_json_file(path / "config.json"))
        model.materialize("cpu", init=False)
        load_sharded(model, path)
        ref = load_pretrained(path, dtype=torch.float32).state_dict()
        assert all(torch.equal(t, ref[n]) for n, t in model.state_dict().items())
    file = tmp_path / "moe" / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.mlp\.experts\.2\.up"):
        load_sharded(model, tmp_path / "moe")


@pytest.mark.slow  # one 2-process job of two tiny models
def test_each_rank_reads_its_slices_and_the_weights_equal_the_one_process_load(tmp_path) -> None:
    dense, moe = _dense(tmp_path / "dense"), _moe(tmp_path / "moe")
    with open(next((tmp_path / "moe").glob("*.safetensors")), "rb") as f:
        header = f.read(int.from_bytes(f.read(8), "little")).decode()
    assert "mlp.experts.2.gate_proj.weight" in header  # the released per-expert layout
    res = run_worker(tmp_path, SHARDED_LOAD_WORKER, str(dense), str(moe))
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for path in (str(dense), str(moe)):
        got = [r[path] for r in ranks]
        assert got[0]["differ"] == [], path  # every tensor, gathered, equals the one-process load
        assert got[0]["dtype"] == "torch.float32"  # bf16 files, float32 weights to train
        # each rank holds about half (3 experts: 2 on rank 0, 1 on rank 1)
        assert got[0]["local"] + got[1]["local"] == got[0]["total"]
        assert max(g["local"] for g in got) < 0.7 * got[0]["total"]


# Peak resident memory (VmHWM: the process's high-water mark, file pages it maps included) of
# loading the 217M model: sharded over the torchrun group, or whole (WORLD_SIZE unset).
PEAK_RSS_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from qwen3 import Qwen3, Qwen3Config
    from qwen3.hf import load_pretrained, load_sharded
    from trainer.distributed import shard_model

    def peak_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

    tmp, path = sys.argv[1], sys.argv[2]
    if "WORLD_SIZE" not in os.environ:
        model = load_pretrained(path, dtype=torch.float32)
        json.dump({"peak": peak_mb()}, open(f"{tmp}/alone.json", "w"))
        torch.save(model.state_dict(), f"{tmp}/alone.pt")
        sys.exit()
    dist.init_process_group("gloo")
    with torch.device("meta"):
        model = Qwen3(Qwen3Config.from_json_file(f"{path}/config.json"))
    shard_model(model, torch.device("cpu"))
    model.materialize("cpu", init=False)
    load_sharded(model, path)
    out = {"peak": peak_mb()}  # before the check below gathers whole tensors
    ref = torch.load(f"{tmp}/alone.pt", mmap=True, weights_only=True) if dist.get_rank() == 0 else None
    out["differ"] = []
    for name, t in model.state_dict().items():
        whole = t.full_tensor()  # collective: every rank gathers
        if ref is not None and not torch.equal(whole, ref[name]):
            out["differ"].append(name)
    json.dump(out, open(f"{tmp}/{dist.get_rank()}.json", "w"))
    dist.destroy_process_group()
    """
)


@pytest.mark.slow  # ~1 min: a 217M model written in bf16, loaded whole and by 2 processes
def test_two_processes_each_peak_under_0_6_of_the_one_process_load(tmp_path) -> None:
    config = Qwen3Config(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Qwen3(config)
    model.materialize("cpu")
    assert model.num_params() > 200e6
    model.to(torch.bfloat16).save_pretrained(tmp_path / "model")  # bf16, as released
    del model
    (tmp_path / "worker.py").write_text(PEAK_RSS_WORKER)
    alone = subprocess.run(
        [sys.executable, str(tmp_path / "worker.py"), str(tmp_path), str(tmp_path / "model")],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},  # no WORLD_SIZE: the one-process load
        capture_output=True,
        text=True,
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    res = run_worker(tmp_path, PEAK_RSS_WORKER, str(tmp_path / "model"))
    assert res.returncode == 0, res.stderr[-3000:]
    whole = json.loads((tmp_path / "alone.json").read_text())["peak"]
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["differ"] == []  # the same weights as the one-process load
    # the figure in benchmarks/results/checkpoints.md (run with -s)
    print(f"peak RSS: one process {whole:.0f} MB, per rank {[round(r['peak']) for r in ranks]} MB")
    for r in ranks:
        assert r["peak"] < 0.6 * whole, (r["peak"], whole)
