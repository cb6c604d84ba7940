"""Qwen3-MoE: config fields and presets, parity with transformers' Qwen3MoeForCausalLM both ways
(logits, loss, auxiliary loss), dispatch by expert, generation with the KV cache."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qwen3 import KVCache, Qwen3, Qwen3Config, Sampling, generate
from qwen3.moe import (
    Routing,
    SparseMoeBlock,
    expert_counts,
    expert_load,
    grouped_swiglu,
    load_balancing_loss,
    pop_routings,
)

transformers = pytest.importorskip("transformers")

BASE = dict(
    vocab_size=211,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
)
CONFIGS = {
    "e4-top1-norm-tied": dict(
        num_experts=4, num_experts_per_tok=1, moe_intermediate_size=32, norm_topk_prob=True
    ),
    "e6-top2-raw-dense1-untied": dict(
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=40,
        norm_topk_prob=False,
        mlp_only_layers=[1],
        tie_word_embeddings=False,
    ),
    "e8-top3-norm-step2-untied": dict(
        num_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=24,
        norm_topk_prob=True,
        decoder_sparse_step=2,
        tie_word_embeddings=False,
    ),
}


def _randomise(module: torch.nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))


def _theirs(name: str) -> transformers.Qwen3MoeForCausalLM:
    cfg = {**BASE, "tie_word_embeddings": True, **CONFIGS[name]}
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**cfg)).eval()
    _randomise(model)
    return model


# ---- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("qwen3-30b-a3b", 30_532_122_624),
        # 36 k expert matrices: ~20 s to build even on meta.
        pytest.param("qwen3-235b-a22b", 235_093_634_560, marks=pytest.mark.slow),
    ],
)
def test_moe_presets_match_released_parameter_counts(name: str, count: int) -> None:
    with torch.device("meta"):
        model = Qwen3(Qwen3Config.from_preset(name))
    assert model.num_params() == count


def test_tiny_moe_is_tiny_in_active_parameters() -> None:
    tiny = Qwen3(Qwen3Config.from_preset("tiny"))
    moe = Qwen3(Qwen3Config.from_preset("tiny-moe"))
    c = moe.config
    experts = sum(p.numel() for n, p in moe.named_parameters() if ".experts." in n)
    active = moe.num_params() - experts * (1 - c.num_experts_per_tok / c.num_experts)
    assert abs(active - tiny.num_params()) / tiny.num_params() < 0.01
    assert moe.num_params() > 1.5 * tiny.num_params()
    # MFU counts the active matmuls only: tiny-moe costs tiny's FLOPs plus its routers'.
    router_flops = 6 * c.num_hidden_layers * c.num_experts * c.hidden_size
    assert moe.estimate_flops(256) == pytest.approx(tiny.estimate_flops(256) + router_flops)


def test_sparse_layers_follow_transformers_rule() -> None:
    for extra in (
        dict(num_experts=4, decoder_sparse_step=2, mlp_only_layers=[3]),
        dict(num_experts=4, decoder_sparse_step=1, mlp_only_layers=[0, 4]),
        dict(num_experts=4, decoder_sparse_step=3),
    ):
        cfg = dict(BASE, num_hidden_layers=6, moe_intermediate_size=8, **extra)
        ours = Qwen3(Qwen3Config(**cfg))
        theirs = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**cfg))
        for mine, ref in zip(ours.model.layers, theirs.model.layers, strict=True):
            assert isinstance(mine.mlp, SparseMoeBlock) == (
                type(ref.mlp).__name__ == "Qwen3MoeSparseMoeBlock"
            )


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok=5 exceeds num_experts=4"),
        (
            dict(num_experts=4, moe_intermediate_size=0),
            "moe_intermediate_size=0: must be a positive",
        ),
        (dict(num_experts=4, decoder_sparse_step=0), "decoder_sparse_step=0"),
        (dict(num_experts=-1), "num_experts=-1"),
        (dict(num_experts=4, mlp_only_layers=[3]), "mlp_only_layers has 3"),
        (dict(num_experts=4, router_aux_loss_coef=-1.0), "router_aux_loss_coef=-1.0"),
    ],
)
def test_invalid_moe_configs_get_one_line(overrides: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as err:
        Qwen3Config(**dict(BASE, **overrides))
    assert "\n" not in str(err.value)


def test_qwen3_moe_config_json_round_trip(tmp_path) -> None:
    cfg = Qwen3Config.from_preset("qwen3-30b-a3b")
    d = cfg.to_dict()
    assert d["model_type"] == "qwen3_moe" and d["architectures"] == ["Qwen3MoeForCausalLM"]
    assert Qwen3Config.from_dict(json.loads(json.dumps(d))) == cfg
    (tmp_path / "config.json").write_text(json.dumps(d))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(theirs).__name__ == "Qwen3MoeConfig"
    assert theirs.num_experts == 128 and theirs.norm_topk_prob is True
    # A dense config keeps writing Qwen3ForCausalLM, without the MoE keys.
    dense = Qwen3Config.from_preset("tiny").to_dict()
    assert dense["model_type"] == "qwen3" and "num_experts" not in dense
    # A qwen3_moe config.json that leaves keys out gets transformers' defaults.
    short = {k: v for k, v in d.items() if k not in ("norm_topk_prob", "decoder_sparse_step")}
    loaded = Qwen3Config.from_dict(short)
    assert loaded.norm_topk_prob is False and loaded.decoder_sparse_step == 1


# ---- parity with transformers -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_theirs_loaded_into_ours_gives_the_same_logits(name: str, tmp_path) -> None:
    theirs = _theirs(name)
    theirs.save_pretrained(tmp_path, max_shard_size="100KB")  # sharded, as the releases are
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = Qwen3.from_pretrained(tmp_path)
    x = torch.randint(0, BASE["vocab_size"], (2, 40))
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ours_saved_and_loaded_by_theirs_gives_the_same_logits(name: str, tmp_path) -> None:
    ours = Qwen3(Qwen3Config(**dict(BASE, **CONFIGS[name]))).eval()
    _randomise(ours)
    ours.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    i = next(i for i in range(BASE["num_hidden_layers"]) if ours.config.is_sparse_layer(i))
    assert f"model.layers.{i}.mlp.experts.0.gate_proj.weight" in saved  # the released layout
    assert f"model.layers.{i}.mlp.gate.weight" in saved
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == "Qwen3MoeForCausalLM"
    x = torch.randint(0, BASE["vocab_size"], (3, 33))
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max().item() <= 1e-4


def test_loss_and_aux_loss_equal_transformers(tmp_path) -> None:
    theirs = _theirs("e6-top2-raw-dense1-untied").train()
    theirs.save_pretrained(tmp_path)
    ours = Qwen3.from_pretrained(tmp_path).train()
    x = torch.randint(0, BASE["vocab_size"], (2, 24))
    # transformers predicts labels[t + 1] at t; our targets are already shifted.
    y = torch.cat([x[:, 1:], torch.full((2, 1), -100)], dim=1)
    loss = ours(x, targets=y)
    routings = pop_routings(ours)
    assert len(routings) == 2  # layers 0 and 2; layer 1 is dense
    aux = load_balancing_loss(routings, num_experts=6)
    ref = theirs(x, labels=x, output_router_logits=True)
    assert aux.item() == pytest.approx(ref.aux_loss.item(), rel=1e-5)
    coef = theirs.config.router_aux_loss_coef
    assert (loss + coef * aux).item() == pytest.approx(ref.loss.item(), rel=1e-5)
    assert pop_routings(ours) == []  # taken once


def test_gradients_equal_transformers(tmp_path) -> None:
    theirs = _theirs("e8-top3-norm-step2-untied").train()
    theirs.save_pretrained(tmp_path)
    ours = Qwen3.from_pretrained(tmp_path).train()
    x = torch.randint(0, BASE["vocab_size"], (2, 20))
    y = torch.cat([x[:, 1:], torch.full((2, 1), -100)], dim=1)
    (ours(x, targets=y) + 0.001 * load_balancing_loss(pop_routings(ours), 8)).backward()
    theirs(x, labels=x, output_router_logits=True).loss.backward()
    mine = dict(ours.named_parameters())
    layer = "model.layers.1.mlp"
    assert torch.allclose(
        mine[f"{layer}.gate.weight"].grad,
        theirs.get_parameter(f"{layer}.gate.weight").grad,
        atol=1e-5,
    )
    for proj in ("gate_up_proj", "down_proj"):  # the same (E, out, in) layout as transformers 5
        ref = theirs.get_parameter(f"{layer}.experts.{proj}").grad
        assert torch.allclose(mine[f"{layer}.experts.{proj}"].grad, ref, atol=1e-5), proj


def test_fused_layout_loads_and_the_released_one_is_written(tmp_path) -> None:
    """A directory holding the experts fused (transformers 5's in-memory names) loads as the
    released per-expert one does; saving writes the released names, each expert's matrices the
    slices of the fused parameters."""
    from safetensors.torch import save_file

    ours = Qwen3(Qwen3Config(**dict(BASE, **CONFIGS["e6-top2-raw-dense1-untied"]))).eval()
    _randomise(ours)
    ours.save_pretrained(tmp_path / "released")
    saved = load_file(tmp_path / "released" / "model.safetensors")
    experts = ours.model.layers[2].mlp.experts
    for e in range(6):
        gate, up = experts.gate_up_proj[e].chunk(2)
        assert torch.equal(saved[f"model.layers.2.mlp.experts.{e}.gate_proj.weight"], gate)
        assert torch.equal(saved[f"model.layers.2.mlp.experts.{e}.up_proj.weight"], up)
        assert torch.equal(
            saved[f"model.layers.2.mlp.experts.{e}.down_proj.weight"], experts.down_proj[e]
        )
    assert not any(n.endswith(("gate_up_proj", "experts.down_proj")) for n in saved)
    (tmp_path / "fused").mkdir()
    (tmp_path / "fused" / "config.json").write_text(
        (tmp_path / "released" / "config.json").read_text()
    )
    state = {
        n: t
        for n, t in ours.state_dict().items()
        if n != "lm_head.weight" or not ours.config.tie_word_embeddings
    }
    save_file(
        {n: t.contiguous() for n, t in state.items()}, tmp_path / "fused" / "model.safetensors"
    )
    for where in ("released", "fused"):
        loaded = Qwen3.from_pretrained(tmp_path / where)
        for name, t in ours.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], t), (where, name)


# ---- the block itself ---------------------------------------------------------------------------


def test_block_under_cpu_autocast_runs_its_experts_in_bf16() -> None:
    torch.manual_seed(0)
    cfg = Qwen3Config(**dict(BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32))
    block = SparseMoeBlock(cfg)
    x = torch.randn(2, 8, BASE["hidden_size"])
    ref = block(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, atol=0.05, rtol=0.05)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in block.parameters())


def test_padding_groups_places_each_expert_s_rows_first_in_a_multiple_of_rows() -> None:
    from qwen3.moe_experts import pad_groups

    order = torch.tensor([4, 0, 2, 1, 3])  # experts' groups of 2, 0 and 3 rows
    padded, counts = pad_groups(order, [2, 0, 3], 4, pad_index=9)
    assert counts == [4, 0, 4]
    assert padded.tolist() == [4, 0, 9, 9, 2, 1, 3, 9]
    assert pad_groups(order, [2, 0, 3], 1, pad_index=9) == (order, [2, 0, 3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_on_padded_groups_give_the_same_outputs_and_gradients(dtype) -> None:
    """Zero rows padding each expert's group (what bf16 on CPU runs, so that oneDNN sees few
    matmul shapes) change no output and no gradient, of the rows, the routing weights or the
    experts, one of which has no rows."""
    from qwen3.moe_experts import swiglu_experts

    torch.manual_seed(0)
    n, k, e, c, f = 37, 2, 4, 16, 24
    ids = torch.stack([torch.randperm(e - 1)[:k] for _ in range(n)])  # expert 3: no rows
    sorted_ids, order = ids.reshape(-1).sort(stable=True)
    counts = expert_counts(sorted_ids, e).tolist()
    inputs = (torch.randn(n, c), torch.rand(n, k), torch.randn(e, 2 * f, c), torch.randn(e, c, f))
    runs = []
    for multiple in (1, 8):
        leaves = [t.to(dtype).requires_grad_() for t in inputs]
        out = swiglu_experts(
            leaves[0], leaves[1], order, counts, *leaves[2:], row_multiple=multiple
        )
        out.float().square().sum().backward()
        runs.append([out.detach(), *(t.grad for t in leaves)])
    # bf16: assert_close's own bf16 tolerance (a reduction over more rows may round differently)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {}
    for unpadded, padded in zip(*runs, strict=True):
        assert padded.shape == unpadded.shape
        torch.testing.assert_close(padded, unpadded, **tol)
    assert not runs[1][3][3].any() and not runs[1][4][3].any()


def test_block_without_gradients_equals_the_training_forward() -> None:
    """Without gradients the experts skip what only backward needs (SiLU's derivative)."""
    torch.manual_seed(0)
    cfg = Qwen3Config(**dict(BASE, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=24))
    block = SparseMoeBlock(cfg)
    x = torch.randn(2, 9, BASE["hidden_size"], requires_grad=True)
    with torch.inference_mode():
        inferred = block(x)
    assert torch.equal(inferred, block(x).detach())


def test_block_equals_each_token_through_its_experts_and_unused_experts_get_zero_grads() -> None:
    """The dispatch (rows sorted by expert, scattered back) against the definition: every token
    through its top-k expert modules, scaled and summed, in value and gradient. An expert no token
    picks gets a zero gradient, not none (DDP and FSDP need one from every rank)."""
    torch.manual_seed(0)
    cfg = Qwen3Config(**dict(BASE, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16))
    block = SparseMoeBlock(cfg)
    x = torch.rand(3, 10, BASE["hidden_size"])  # positive, so that expert 7's logit is lowest
    with torch.no_grad():
        block.gate.weight[7] = -1.0
    flat = x.reshape(-1, BASE["hidden_size"])
    _, weights, ids = block.route(flat)
    assert ids.unique().tolist() == list(range(7))
    results = {}
    for run in ("loop", "grouped_mm", "definition"):
        block.experts.implementation = "loop" if run == "definition" else run  # type: ignore[assignment]
        xi = flat.detach().clone().requires_grad_()
        if run != "definition":
            out = block(xi.view(x.shape)).reshape(flat.shape)
        else:
            _, weights, ids = block.route(xi)
            rows = [
                sum(weights[t, j] * _expert(block.experts, ids[t, j], xi[t]) for j in range(2))
                for t in range(flat.shape[0])
            ]
            out = torch.stack(rows)
        out.square().sum().backward()
        grads = {n: p.grad for n, p in block.named_parameters()}
        results[run] = (out.detach(), xi.grad, grads)
        block.zero_grad(set_to_none=True)
    out1, gx1, g1 = results["definition"]
    for run in ("loop", "grouped_mm"):
        out0, gx0, g0 = results[run]
        assert torch.allclose(out0, out1, atol=1e-5) and torch.allclose(gx0, gx1, atol=1e-5), run
        for name, grad in g0.items():
            assert torch.allclose(grad, g1[name], atol=1e-5), (run, name)
        for name in ("experts.gate_up_proj", "experts.down_proj"):
            assert not g0[name][7].any(), (run, name)  # a zero gradient, not none


def _expert(experts: torch.nn.Module, e: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` on one row ``x``, written out from its definition."""
    gate, up = (experts.gate_up_proj[e] @ x).chunk(2)
    return experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up)


def test_expert_load_reads_balance() -> None:
    n, e = 64, 4
    # Each token goes to a different expert in turn, or every token to expert 0.
    balanced = torch.arange(n).remainder(e).unsqueeze(1)
    collapsed = torch.zeros(n, 1, dtype=torch.int64)
    probs = torch.full((n, e), 1 / e)
    assert expert_load([Routing(probs, balanced)], e).item() == pytest.approx(1 / e)
    routings = [Routing(probs, collapsed), Routing(probs, balanced)]
    assert expert_load(routings, e).item() == pytest.approx((1 + 1 / e) / 2)


def test_generation_with_cache_equals_full_recompute() -> None:
    """Padded prompts of different lengths, then a continuation through the same cache: every
    token as greedy decoding without a cache picks it."""
    torch.manual_seed(0)
    model = Qwen3(Qwen3Config(**dict(BASE, **CONFIGS["e6-top2-raw-dense1-untied"]))).eval()
    prompts = [[5, 17, 33, 2, 9, 41, 7], [101, 3]]
    greedy = Sampling(max_new_tokens=6, temperature=0.0)
    cache = KVCache(model.config, batch_size=2, max_len=40)
    first = generate(model, prompts, greedy, cache=cache)
    more = generate(model, [[12], [13, 14]], greedy, cache=cache)
    for row, prompt in enumerate(prompts):
        seq = list(prompt)
        with torch.no_grad():
            for added in (first[row], [[12], [13, 14]][row], more[row]):
                for token in added:
                    if added is not first[row] and added is not more[row]:
                        seq.append(token)
                        continue
                    assert model(torch.tensor([seq]))[0, -1].argmax().item() == token
                    seq.append(token)


def test_grouped_matmul_path_equals_the_loop_over_experts() -> None:
    """The CUDA path's F.grouped_mm (whose CPU kernel runs it here in float32) against the loop
    over experts: same outputs and gradients, an expert with no rows included."""
    torch.manual_seed(0)
    cfg = Qwen3Config(**dict(BASE, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24))
    experts = SparseMoeBlock(cfg).experts
    xs = torch.randn(40, BASE["hidden_size"], requires_grad=True)
    counts = torch.tensor([7, 0, 13, 5, 11, 4])
    params = [xs, experts.gate_up_proj, experts.down_proj]
    ys = torch.cat(
        [
            torch.stack([_expert(experts, e, row) for row in rows]) if len(rows) else rows
            for e, rows in enumerate(xs.split(counts.tolist()))
        ]
    )
    grads = torch.autograd.grad(ys.square().sum(), params)
    grouped = grouped_swiglu(
        xs, counts.cumsum(0).to(torch.int32), experts.gate_up_proj, experts.down_proj
    )
    assert torch.allclose(grouped, ys, atol=1e-5)
    grads2 = torch.autograd.grad(grouped.square().sum(), params)
    for a, b in zip(grads, grads2, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert not grads2[1][1].any() and not grads2[2][1].any()  # expert 1 had no rows


@pytest.mark.slow
def test_bench_moe_runs_and_agrees_with_transformers() -> None:
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = repo / "benchmarks" / "bench_moe.py"

    def run(*flags: str) -> str:
        res = subprocess.run(
            [sys.executable, str(script), "--quick", "--threads", "1", *flags],
            cwd=repo,
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout

    out = run()
    assert "default experts implementation grouped_mm" in out  # what the README compares to
    assert "transformers grouped_mm: output and input gradient equal to ours: True" in out
    assert "transformers eager: output and input gradient equal to ours: True" in out
    assert "| transformers eager" in out
    out = run("--amp")  # the layers under bf16 autocast, as the trainer runs them on bf16 CPUs
    assert "bf16 autocast" in out
    assert "transformers eager: output and input gradient equal to ours: True" in out
    out = run("--models")
    assert "| tiny-moe" in out
    from trainer.build import resolve_precision  # the trainer's auto precision, here

    assert f"in {resolve_precision('auto', torch.device('cpu')).name}," in out


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_loss_aux_loss_and_gradients(mode: str) -> None:
    """The router logits escape the checkpointed block for the aux loss; recomputing the block in
    backward must give the same gradients as keeping its activations."""
    cfg = Qwen3Config(**dict(BASE, **CONFIGS["e6-top2-raw-dense1-untied"]))
    x = torch.randint(0, BASE["vocab_size"], (2, 16))
    y = torch.randint(0, BASE["vocab_size"], (2, 16))
    results = []
    for checkpointing in ("none", mode):
        torch.manual_seed(0)
        model = Qwen3(cfg).train()
        model.set_activation_checkpointing(checkpointing)  # type: ignore[arg-type]
        loss = model(x, targets=y)
        aux = load_balancing_loss(pop_routings(model), 6)
        (loss + 0.01 * aux).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.item(), aux.item(), grads))
    (l0, a0, g0), (l1, a1, g1) = results
    assert l0 == pytest.approx(l1, abs=1e-6) and a0 == pytest.approx(a1, abs=1e-6)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-6), name
