"""FSDP2 (trainer.fsdp=true) under torchrun on CPU (gloo): the sharded run trains as the
unsharded one (Muon orthogonalising gathered whole matrices), its checkpoints are plain Hugging
Face directories, and it resumes exactly."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from test_distributed_support import (
    STEPS,
    base_overrides,
    losses,
    run_torchrun,
    run_worker,
    single_process_losses,
)
from test_trainer_support import read_metrics, write_corpus

from qwen3 import Qwen3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    return write_corpus(tmp / "play.txt")


@pytest.mark.slow  # 15-40 s here (one 2-process run, one reference run)
def test_sharded_run_matches_the_unsharded_one_and_saves_a_transformers_dir(
    corpus, tmp_path
) -> None:
    from transformers import AutoModelForCausalLM

    base = base_overrides(tmp_path, corpus, tmp_path / "cache")
    # Evaluations between training steps: the no-grad forward of the sharded model must follow
    # the updated weights (no stale inference-only copies of them).
    base = [*base, "trainer.eval_every=2"]
    res = run_torchrun(
        tmp_path,
        2,
        *base,
        "run_name=fsdp",
        "trainer.fsdp=true",
        "trainer.batch_size=4",
        "trainer.grad_accum=2",
        "sample.max_new_tokens=4",
    )
    assert res.returncode == 0, res.stderr
    assert "== samples ==" in res.stdout  # every rank sampled from its shards
    ref = single_process_losses([*base, "trainer.batch_size=16"], tmp_path / "ref")
    got = losses(tmp_path / "runs" / "fsdp")
    assert len(got) == STEPS
    assert got == pytest.approx(ref, rel=1e-4)
    # Validation batches follow trainer.batch_size: compare with one process at batch 4 x 4.
    ref4 = tmp_path / "ref4"
    single_process_losses([*base, "trainer.batch_size=4", "trainer.grad_accum=4"], ref4)
    val = [r["val_loss"] for r in read_metrics(tmp_path / "runs" / "fsdp") if "val_loss" in r]
    ref_val = [r["val_loss"] for r in read_metrics(ref4) if "val_loss" in r]
    assert len(val) == len(ref_val) >= 2 and len(set(val)) == len(val)
    assert val == pytest.approx(ref_val, rel=1e-4)

    # The gathered checkpoint is a transformers model directory with the reference's weights
    # (to float tolerance: logits move by ~0.1 per step here, rounding by ~1e-3).
    ckpt = tmp_path / "runs" / "fsdp" / "latest"
    assert sorted(load_file(ckpt / "model-00001-of-00001.safetensors")) == sorted(
        load_file(tmp_path / "ref" / "latest" / "model-00001-of-00001.safetensors")
    )
    hf = AutoModelForCausalLM.from_pretrained(ckpt)
    x = torch.randint(0, hf.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = Qwen3.from_pretrained(ckpt)(x)
        torch.testing.assert_close(hf(x).logits, ours, rtol=1e-4, atol=1e-4)
        reference = Qwen3.from_pretrained(tmp_path / "ref" / "latest")(x)
        torch.testing.assert_close(ours, reference, rtol=0, atol=3e-3)


@pytest.mark.slow
def test_sharded_run_matches_ddp_with_adamw_and_resumes_exactly(corpus, tmp_path) -> None:
    base = [
        *base_overrides(tmp_path, corpus, tmp_path / "cache"),
        "optim=adamw",
        "trainer.batch_size=8",
    ]
    ddp = run_torchrun(tmp_path, 2, *base, "run_name=ddp")
    assert ddp.returncode == 0, ddp.stderr
    fsdp = run_torchrun(tmp_path, 2, *base, "run_name=fsdp", "trainer.fsdp=true")
    assert fsdp.returncode == 0, fsdp.stderr
    full = losses(tmp_path / "runs" / "fsdp")
    assert full == pytest.approx(losses(tmp_path / "runs" / "ddp"), rel=1e-5)

    ckpt = tmp_path / "runs" / "fsdp" / "step-000002"
    resumed = run_torchrun(
        tmp_path, 2, *base, "run_name=resumed", "trainer.fsdp=true", f"resume={ckpt}"
    )
    assert resumed.returncode == 0, resumed.stderr
    assert losses(tmp_path / "runs" / "resumed") == full[2:]


MIXED_PRECISION_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    from qwen3 import Qwen3, Qwen3Config
    from trainer.distributed import shard_model

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = Qwen3(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=8, max_position_embeddings=32))
    shard_model(model, torch.device("cpu"), torch.bfloat16)
    seen = []
    attn = model.model.layers[0].self_attn
    attn.register_forward_pre_hook(lambda m, a: seen.append(str(m.q_proj.weight.dtype)))
    x = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, targets=x).backward()
    q = attn.q_proj.weight
    out = {"gathered": seen, "sharded": str(q.dtype), "grad": str(q.grad.dtype),
           "local_rows": q.to_local().shape[0], "rows": q.shape[0]}
    json.dump(out, open(f"{sys.argv[1]}/{dist.get_rank()}.json", "w"))
    dist.destroy_process_group()
    """
)


def test_bf16_training_gathers_bf16_and_keeps_fp32_shards(tmp_path) -> None:
    """trainer.precision=bf16 under FSDP: the forward sees bf16 weights (gathered at half the
    traffic), while each rank's shard of the weights and of the gradients stays float32."""
    res = run_worker(tmp_path, MIXED_PRECISION_WORKER)
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in range(2):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["gathered"] == ["torch.bfloat16"]
        assert got["sharded"] == got["grad"] == "torch.float32"
        assert got["local_rows"] * 2 == got["rows"]


@pytest.mark.slow
def test_bf16_sharded_run_trains_as_one_process(corpus, tmp_path) -> None:
    base = [
        *base_overrides(tmp_path, corpus, tmp_path / "cache"),
        "optim=adamw",
        "trainer.precision=bf16",
        "trainer.grad_accum=2",
    ]
    res = run_torchrun(
        tmp_path, 2, *base, "run_name=fsdp", "trainer.fsdp=true", "trainer.batch_size=4"
    )
    assert res.returncode == 0, res.stderr
    got = losses(tmp_path / "runs" / "fsdp")
    ref = single_process_losses([*base, "trainer.batch_size=8"], tmp_path / "ref")
    assert len(got) == STEPS and all(math.isfinite(v) for v in got)
    # bf16 weights in the forward (FSDP) against float32 weights autocast per matmul (one
    # process): the same training to bf16 rounding
    assert got == pytest.approx(ref, rel=1e-2)


META_INIT_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    from qwen3 import Qwen3, Qwen3Config
    from trainer.distributed import full_model_copy, shard_model

    dist.init_process_group("gloo")
    cfg = Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=32)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Qwen3(cfg)
    shard_model(model, torch.device("cpu"))
    model.materialize("cpu")
    local = sum(p.to_local().numel() for p in model.parameters())
    whole = full_model_copy(model, dist.get_rank() == 0)
    out = {"local": local, "total": model.num_params()}
    if whole is not None:
        torch.manual_seed(0)
        with torch.device("meta"):
            alone = Qwen3(cfg)
        alone.materialize("cpu")
        x = torch.randint(0, 96, (2, 16))
        with torch.no_grad():
            out["same_logits"] = bool(torch.equal(whole(x), alone(x)))
        out["same_weights"] = all(
            torch.equal(a, b) for a, b in zip(whole.state_dict().values(), alone.state_dict().values())
        )
        out["tied"] = whole.lm_head.weight is whole.model.embed_tokens.weight
    json.dump(out, open(f"{sys.argv[1]}/{dist.get_rank()}.json", "w"))
    dist.destroy_process_group()
    """
)


def test_sharded_init_holds_only_shards_and_equals_the_one_process_init(tmp_path) -> None:
    """Built on meta, sharded, then materialised: each rank allocates half the parameters, and
    the gathered weights are exactly the ones a single process initialises from the seed."""
    res = run_worker(tmp_path, META_INIT_WORKER)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert [r["local"] for r in ranks] == [ranks[0]["total"] // 2] * 2
    assert ranks[0]["same_weights"] and ranks[0]["same_logits"] and ranks[0]["tied"]
