"""Qwen3-MoE everywhere the dense model goes: parameter routing (Muon per expert matrix, the router
in AdamW), training with the real CLI (aux loss and expert load logged, exact resume), and the
checkpoint served, demoed and loaded by transformers."""

from __future__ import annotations

import json

import pytest
import torch
from test_trainer_support import read_metrics, run_train, small_run_overrides, write_corpus

from optim import OptimConfig, build_optimizers
from optim.param_groups import split_parameters
from qwen3 import Qwen3, Qwen3Config
from serving.launch import serve_in_subprocess

STEPS = 6

# tiny-moe cut down to test size: 4 experts of 32, 2 per token, the middle layer dense.
MOE_MODEL = [
    "model=tiny-moe",
    "model.vocab_size=384",
    "model.hidden_size=64",
    "model.num_hidden_layers=3",
    "model.num_attention_heads=2",
    "model.num_key_value_heads=1",
    "model.head_dim=32",
    "model.intermediate_size=128",
    "model.max_position_embeddings=128",
    "model.num_experts=4",
    "model.moe_intermediate_size=32",
    "model.mlp_only_layers=[1]",
]


def test_muon_takes_each_expert_matrix_and_adamw_the_router() -> None:
    model = Qwen3(Qwen3Config.from_preset("tiny-moe"))
    split = split_parameters(model)
    matrices = dict(split.matrices)
    assert [n for n, _ in split.routers] == [f"model.layers.{i}.mlp.gate.weight" for i in range(3)]
    # Each layer's experts as two 3-D stacks, in Muon: batches of matrices orthogonalised one by
    # one, the fused gate|up in a group of its own (two matrices per expert: gate and up).
    assert matrices["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 384, 128)
    assert matrices["model.layers.0.mlp.experts.down_proj"].shape == (8, 128, 192)
    opt = build_optimizers(model, OptimConfig(name="muon", warmup_steps=0), max_steps=10)
    (fused,) = [g for g in opt.optimizers[0].param_groups if g["name"] == "fused_gate_up"]
    assert fused["split_rows"] == 2 and len(fused["params"]) == 3
    adamw = opt.optimizers[opt.names.index("adamw")]
    (routers,) = [g for g in adamw.param_groups if g["name"] == "routers"]
    assert routers["weight_decay"] == 0.0 and len(routers["params"]) == 3
    muon = opt.optimizers[opt.names.index("muon")]
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    assert all(id(p) not in muon_ids for _, p in split.routers)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted run, and the same run stopped half way and resumed."""
    tmp = tmp_path_factory.mktemp("moe")
    corpus = write_corpus(tmp / "play.txt")
    base = [
        *small_run_overrides(tmp, corpus),
        *MOE_MODEL,
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        "trainer.eval_every=0",
        "trainer.save_every=3",
        "sample.max_new_tokens=0",
    ]
    full = run_train(tmp, *base, f"trainer.max_steps={STEPS}", "run_name=full")
    assert full.returncode == 0, full.stderr
    half = run_train(tmp, *base, f"trainer.max_steps={STEPS // 2}", "run_name=cut")
    assert half.returncode == 0, half.stderr
    rest = run_train(tmp, *base, f"trainer.max_steps={STEPS}", "run_name=cut", "resume=latest")
    assert rest.returncode == 0, rest.stderr
    return tmp


@pytest.mark.slow  # three CLI runs (about a minute), shared by the tests below
def test_training_logs_aux_loss_and_expert_load(runs) -> None:
    rows = read_metrics(runs / "runs" / "full")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        # 4 experts, 2 per token: the aux loss is 2 when balanced and at most 4 (all on two
        # experts); the largest expert takes between a quarter and a half of the assignments.
        assert 1.9 < r["aux_loss"] <= 4.0
        assert 0.25 <= r["expert_load"] <= 0.5
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


@pytest.mark.slow
def test_resumed_run_equals_the_uninterrupted_one(runs) -> None:
    full = read_metrics(runs / "runs" / "full")
    cut = read_metrics(runs / "runs" / "cut")
    keys = ("train_loss", "aux_loss", "expert_load", "grad_norm")
    assert [[r[k] for k in keys] for r in cut] == [[r[k] for k in keys] for r in full]


@pytest.mark.slow
def test_checkpoint_is_a_qwen3_moe_directory_transformers_loads(runs) -> None:
    transformers = pytest.importorskip("transformers")
    ckpt = runs / "runs" / "full" / "latest"
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert config["mlp_only_layers"] == [1]
    ours = Qwen3.from_pretrained(ckpt)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    x = torch.randint(0, ours.config.vocab_size, (2, 20))
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_demo_and_serve_run_on_the_checkpoint(runs) -> None:
    ckpt = runs / "runs" / "full" / "latest"
    demo = run_train(runs, "demo", f"ckpt={ckpt}", "max_new_tokens=6", "device=cpu")
    assert demo.returncode == 0, demo.stderr
    import openai

    with serve_in_subprocess(ckpt) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        out = client.completions.create(model=model, prompt="ROMEO:", max_tokens=5, temperature=0)
    assert out.usage is not None and out.usage.completion_tokens >= 1


@pytest.mark.slow  # one 2-process run and its reference, about a minute each
@pytest.mark.parametrize("fsdp", [True, False], ids=["fsdp", "ddp"])
def test_two_processes_train_moe_as_one(tmp_path, fsdp: bool) -> None:
    """FSDP2 or DDP over 2 gloo processes (batch 8 each) against one process (batch 8, 2
    accumulation steps): the same rows in each forward, so the same aux losses, the same updates.
    Every expert gets a gradient on every rank (zero when no token reached it), as DDP needs."""
    from test_distributed_support import base_overrides, run_torchrun, single_process_losses

    corpus = write_corpus(tmp_path / "play.txt")
    base = [
        *base_overrides(tmp_path, corpus, tmp_path / "cache"),
        *MOE_MODEL,
        "trainer.batch_size=8",
    ]
    res = run_torchrun(tmp_path, 2, *base, "run_name=two", f"trainer.fsdp={str(fsdp).lower()}")
    assert res.returncode == 0, res.stderr
    ref = single_process_losses([*base, "trainer.grad_accum=2"], tmp_path / "ref")
    got = read_metrics(tmp_path / "runs" / "two")
    assert [r["train_loss"] for r in got] == pytest.approx(ref, rel=1e-4)
    ref_rows = read_metrics(tmp_path / "ref")
    for key in ("aux_loss", "expert_load"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in ref_rows], rel=1e-4)
    ours = Qwen3.from_pretrained(tmp_path / "runs" / "two" / "latest")
    assert ours.config.num_experts == 4


def test_a_per_expert_training_state_says_to_start_from_its_weights(tmp_path) -> None:
    """A training state written when each expert matrix was a parameter of its own cannot resume
    into 3-D experts: one line naming init_from, which loads the same checkpoint's weights (the
    Hugging Face files keep the per-expert names)."""
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    from trainer.errors import CheckpointError
    from trainer.train_state import load_train_state

    cfg = Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=2,
        moe_intermediate_size=8,
    )
    old = {"model.layers.0.mlp.experts.0.gate_proj.weight": torch.zeros(8, 32)}
    dcp_save({"model": old}, checkpoint_id=str(tmp_path / "step-1" / "train_state"), no_dist=True)
    model = Qwen3(cfg)
    opts = build_optimizers(model, OptimConfig(warmup_steps=0), max_steps=2)
    with pytest.raises(CheckpointError, match="one tensor per expert matrix") as err:
        load_train_state(model, opts, tmp_path / "step-1")
    assert f"init_from={tmp_path / 'step-1'}" in str(err.value) and "\n" not in str(err.value)
