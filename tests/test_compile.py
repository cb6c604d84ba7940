"""torch.compile of the training path: the dense training forward traces as one graph (0 graph
breaks) in every precision and activation-checkpointing mode, one compiled block serves every
layer, and under bf16 autocast with float32 parameters every block returns bf16 and SDPA sees
q, k, v in bf16."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F
from test_distributed_support import run_worker
from torch._dynamo.testing import CompileCounterWithBackend
from torch.overrides import TorchFunctionMode

import qwen3.layers
import qwen3.projections
from qwen3 import Qwen3, Qwen3Config, Sampling, generate
from qwen3.compile import compile_for_training, graph_breaks
from qwen3.cpu_attention import causal_attention

CFG = Qwen3Config(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
)


def _model(mode: str = "none") -> tuple[Qwen3, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Qwen3(CFG).train()
    model.set_activation_checkpointing(mode)  # type: ignore[arg-type]
    x = torch.randint(0, CFG.vocab_size, (2, 16))
    return model, x, torch.roll(x, -1, dims=1)


def _precision(name: str) -> contextlib.AbstractContextManager[object]:
    if name == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "separate"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_dense_training_forward_has_no_graph_breaks(
    mode: str, precision: str, stacked: bool, monkeypatch
) -> None:
    if not stacked:  # large models project q/k/v and gate/up one by one
        monkeypatch.setattr(qwen3.projections, "_STACK_MAX_NUMEL", 0)
    model, x, y = _model(mode)
    with _precision(precision):
        found = graph_breaks(model, x, y)
    assert found.breaks == 0, found.reasons
    assert found.graphs == 1


class _SdpaDtypes(TorchFunctionMode):
    """Records the dtypes of q, k, v at every ``F.scaled_dot_product_attention`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.dtype, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is F.scaled_dot_product_attention:
            self.seen.append(tuple(t.dtype for t in args[:3]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kernel", ["sdpa", "cpu"])
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "separate"])
def test_bf16_autocast_keeps_blocks_and_attention_in_bf16(
    stacked: bool, kernel: str, monkeypatch
) -> None:
    """Under bf16 autocast with float32 parameters, q, k and v reach the attention kernel in
    bf16: SDPA, or on a CPU with native bf16 matmuls qwen3.cpu_attention's (both forced here,
    whatever this CPU has)."""
    if not stacked:
        monkeypatch.setattr(qwen3.projections, "_STACK_MAX_NUMEL", 0)
    monkeypatch.setattr(qwen3.layers, "use_cpu_attention", lambda *_: kernel == "cpu")
    hand_made: list[tuple[torch.dtype, ...]] = []

    def recorded(q, k, v):  # type: ignore[no-untyped-def]
        hand_made.append((q.dtype, k.dtype, v.dtype))
        return causal_attention(q, k, v)

    monkeypatch.setattr(qwen3.layers, "causal_attention", recorded)
    model, x, y = _model()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    outputs: list[torch.dtype] = []
    for layer in model.model.layers:
        layer.register_forward_hook(lambda _m, _a, out: outputs.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16), _SdpaDtypes() as sdpa:
        loss = model(x, targets=y)
    loss.backward()
    seen = hand_made if kernel == "cpu" else sdpa.seen
    assert seen == [(torch.bfloat16,) * 3] * CFG.num_hidden_layers
    assert not (sdpa.seen if kernel == "cpu" else hand_made)
    assert outputs == [torch.bfloat16] * CFG.num_hidden_layers
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_one_compiled_graph_serves_every_block() -> None:
    model, x, y = _model("selective")
    ref, _, _ = _model("selective")
    counter = CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    compile_for_training(model, backend=counter)
    for _ in range(2):
        model(x, targets=y).backward()
    # one frame for the block (shared by all 3 layers), one for the loss's chunk step
    assert counter.frame_count == 2
    with torch.no_grad():  # evaluation and generation run eagerly: nothing more compiles
        model(x, targets=y)
        model(x, targets=y, token_stats=True)
    generate(model.eval(), x[:, :4].tolist(), Sampling(max_new_tokens=3, temperature=0.0))
    assert counter.frame_count == 2
    model.train()
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()  # HF names kept
    (2 * ref(x, targets=y)).backward()
    for (name, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    torch._dynamo.reset()


FSDP_WORKER = """
import json, sys
import torch
import torch.distributed as dist
from torch._dynamo.testing import CompileCounterWithBackend
from qwen3 import Qwen3, Qwen3Config, Sampling, generate
from qwen3.compile import compile_for_training
from trainer.distributed import shard_model

dist.init_process_group("gloo")
cfg = Qwen3Config.from_dict(json.loads(sys.argv[2]))
result = {}
for precision in ("fp32", "bf16"):
    for mode in ("none", "full", "selective"):
        torch.manual_seed(0)
        model = Qwen3(cfg).train()
        model.set_activation_checkpointing(mode)
        counter = CompileCounterWithBackend("aot_eager")
        torch._dynamo.reset()
        compile_for_training(model, backend=counter)
        shard_model(model, torch.device("cpu"), torch.bfloat16 if precision == "bf16" else None)
        x = torch.randint(0, cfg.vocab_size, (2, 16))
        ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        for _ in range(2):
            with ctx:
                loss = model(x, targets=x)
            loss.backward()
        result[f"{precision} {mode}"] = [counter.frame_count, bool(torch.isfinite(loss))]
(__import__("pathlib").Path(sys.argv[1]) / f"{dist.get_rank()}.json").write_text(json.dumps(result))
dist.destroy_process_group()
"""


@pytest.mark.slow  # two processes tracing 6 configurations (~1 min)
def test_blocks_compile_as_one_graph_each_under_fsdp(tmp_path) -> None:
    """``fullgraph=True`` makes any break inside a block an error; FSDP2's hooks around it must
    not add one, and all layers share the one compiled block."""
    res = run_worker(tmp_path, FSDP_WORKER, json.dumps(CFG.to_dict()))
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in range(2):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got == {key: [2, True] for key in got} and len(got) == 6
