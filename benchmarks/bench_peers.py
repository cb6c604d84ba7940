"""Training steps against the Qwen3 peers: torchtitan's and litgpt's Qwen3 (when installed) and
transformers' Qwen3ForCausalLM, each holding our model's weights, with the same AdamW and batch.

Each model runs its own forward and the loss its trainer uses (litgpt's chunked cross-entropy,
torchtitan's summed cross-entropy over the token count, transformers' loss). Before timing,
every peer must have our parameter count and our first loss. Forward + backward + optimizer
step, the contenders alternating within each round; the table gives each one's tokens/s over
transformers' in the same round (median over rounds) and transformers' own median tokens/s.

    make peers                                                      # .venv-peers: the peers
    .venv-peers/bin/python benchmarks/bench_peers.py --threads 1               # tiny, mid, small
    .venv-peers/bin/python benchmarks/bench_peers.py --threads 1 --compile     # add compiled rows
    .venv/bin/python benchmarks/bench_peers.py --quick --shapes tiny   # peers "not installed"
"""

from __future__ import annotations

import time
from collections.abc import Callable

import harness
import torch
from bench_train import SHAPES

from qwen3 import Qwen3

# What a peer's builder returns: its model holding ``base``'s weights, and its training loss.
Built = tuple[torch.nn.Module, harness.LossFn]
PEER_ORDER = ["ours", "torchtitan", "litgpt", "transformers"]


def build_ours(base: Qwen3) -> Built:
    model = Qwen3(base.config).to(base.device).train()
    model.load_state_dict(base.state_dict())
    return model, harness.ours_loss


def build_transformers(base: Qwen3) -> Built:
    return harness.transformers_twin(base), harness.transformers_loss


def build_litgpt(base: Qwen3) -> Built:
    from litgpt.config import Config
    from litgpt.model import GPT
    from litgpt.scripts.convert_hf_checkpoint import copy_weights_qwen_3
    from litgpt.utils import chunked_cross_entropy

    c = base.config
    # The fields of litgpt's own Qwen3 entries (litgpt/config.py, "Qwen3-0.6B"), at our shape.
    config = Config(
        name="qwen3-bench",
        block_size=c.max_position_embeddings,
        vocab_size=c.vocab_size,
        padded_vocab_size=c.vocab_size,
        n_layer=c.num_hidden_layers,
        n_head=c.num_attention_heads,
        n_embd=c.hidden_size,
        n_query_groups=c.num_key_value_heads,
        head_size=c.head_dim,
        rotary_percentage=1.0,
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        mlp_class_name="LLaMAMLP",
        intermediate_size=c.intermediate_size,
        norm_eps=c.rms_norm_eps,
        rope_base=int(c.rope_theta),
        norm_qk=True,
    )
    model = GPT(config)
    if c.tie_word_embeddings:
        # litgpt has no tied head (its converter copies the embedding): share it as ours and
        # transformers do, so the parameter count, the AdamW state and the gradient match.
        model.lm_head.weight = model.transformer.wte.weight
    state: dict[str, torch.Tensor] = {}
    copy_weights_qwen_3(config, {}, state, dict(base.state_dict()))  # litgpt's HF converter
    model.load_state_dict(state)

    def loss(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return chunked_cross_entropy(m(x), y)  # as litgpt's pretrain.py

    return model.to(base.device).train(), loss


def build_torchtitan(base: Qwen3) -> Built:
    from torchtitan.components.loss import cross_entropy_loss
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.qwen3 import Qwen3Model, _build_qwen3_layers, _qwen3_norm
    from torchtitan.models.qwen3.state_dict_adapter import Qwen3StateDictAdapter

    c = base.config
    # torchtitan's own Qwen3 presets are built by these helpers; only the shape is ours.
    layers = _build_qwen3_layers(
        n_layers=c.num_hidden_layers,
        dim=c.hidden_size,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        hidden_dim=c.intermediate_size,
        attn_backend="flex",
        rope=CosSinRoPE.Config(
            dim=c.head_dim, max_seq_len=c.max_position_embeddings, theta=c.rope_theta
        ),
    )
    for layer in layers:
        # Its language-model backends (flex, varlen) have no CPU backward: its causal SDPA module.
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    config = Qwen3Model.Config(
        vocab_size=c.vocab_size,
        dim=c.hidden_size,
        norm=_qwen3_norm(c.hidden_size),
        enable_weight_tying=c.tie_word_embeddings,
        tok_embeddings=Embedding.Config(num_embeddings=c.vocab_size, embedding_dim=c.hidden_size),
        lm_head=Linear.Config(in_features=c.hidden_size, out_features=c.vocab_size),
        layers=layers,
    )
    model = config.build()
    adapter = Qwen3StateDictAdapter(config, None)  # torchtitan's HF -> torchtitan names
    model.load_state_dict(adapter.from_hf(dict(base.state_dict())))

    def loss(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Summed, then over the token count, as its trainer normalises.
        return cross_entropy_loss(m(x), y) / y.numel()

    return model.to(base.device).train(), loss


BUILDERS: dict[str, Callable[[Qwen3], Built]] = {
    "ours": build_ours,
    "torchtitan": build_torchtitan,
    "litgpt": build_litgpt,
    "transformers": build_transformers,
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied tensor counts once


def prepare(
    name: str, base: Qwen3, batch: torch.Tensor, steps: int, compiled: bool
) -> tuple[Callable[[], float] | None, float, str]:
    """The timed closure of one peer, its first loss and a status line; ``None`` if the peer
    is not installed."""
    try:
        model, loss_fn = BUILDERS[name](base)
    except ImportError as e:
        return None, float("nan"), f"not installed ({e})"
    params, ours = n_params(model), n_params(base)
    assert params == ours, f"{name}: {params:,} parameters against our {ours:,}: shapes differ"
    step = harness.train_stepper(torch.compile(model) if compiled else model, loss_fn, batch)
    t0 = time.perf_counter()
    try:
        first_loss = step()
        for _ in range(2 if compiled else 0):
            step()
    except Exception as e:
        if not compiled or name == "ours":
            raise
        # A peer that torch.compile cannot take is a row cell, not the end of the table.
        return None, float("nan"), f"compile failed ({type(e).__name__}: {str(e)[:120]!r})"
    status = f"{params / 1e6:.2f}M params, first loss {first_loss:.5f}, warm-up "
    status += f"{time.perf_counter() - t0:.1f}s"
    tokens = batch.shape[0] * (batch.shape[1] - 1)
    return harness.timed(step, steps, tokens), first_loss, status


def bench_shape(name: str, args, device: torch.device, compiled: bool) -> list[str]:
    batch_size, seq_len = SHAPES[name]
    cfg = harness.config_for(name)
    torch.manual_seed(args.seed)
    base = Qwen3(cfg).to(device).train()
    batch = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), device=device)
    label = f"{name} compiled" if compiled else name
    runs: dict[str, Callable[[], float]] = {}
    losses: dict[str, float] = {}
    missing: dict[str, str] = {}  # peer -> its cell: not installed, compile failed
    for peer in args.peers:
        run, loss, status = prepare(peer, base, batch, args.steps, compiled)
        print(f"  {label} {peer}: {status}")
        if run is None:
            missing[peer] = status.split(" (")[0]
        else:
            runs[peer], losses[peer] = run, loss
    for peer, loss in losses.items():
        # float32 with different op orders: equal to about 1e-6; a wrong weight moves it far more.
        assert abs(loss - losses["ours"]) < 1e-3, (
            f"{peer}: first loss {loss:.6f} against our {losses['ours']:.6f}: weights differ"
        )
    if compiled:
        # Compiled rows are measured against transformers eager, like the eager table.
        model, loss_fn = build_transformers(base)
        runs["transformers eager"] = harness.timed(
            harness.train_stepper(model, loss_fn, batch), args.steps, batch_size * seq_len
        )
    ref_name = "transformers eager" if compiled else "transformers"
    results = harness.alternate(runs, args.rounds)
    ref = results[ref_name]
    row = [label]
    for peer in PEER_ORDER:
        if peer not in results:
            row.append(missing.get(peer, "not run"))
            continue
        ratios = [r / t for r, t in zip(results[peer], ref, strict=True)]
        print(f"  {label} {peer}: ratio per round " + " ".join(f"{r:.2f}" for r in ratios))
        row.append(f"{harness.median(ratios):.2f}x")
    row[-1] += f" ({harness.median(ref):,.0f} tok/s{' eager' if compiled else ''})"
    return row


def main() -> None:
    parser = harness.common_args(__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,mid,small", help="comma list: tiny, mid, small")
    parser.add_argument("--steps", type=int, default=None, help="steps per side per round")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows")
    parser.add_argument("--peers", default=",".join(PEER_ORDER), help="comma list of contenders")
    args = parser.parse_args()
    args.peers = [p for p in PEER_ORDER if p in args.peers.split(",")]
    if not {"ours", "transformers"} <= set(args.peers):
        parser.error(
            "--peers must include ours (the reference weights) and transformers (the unit)"
        )
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.steps = args.steps or (1 if args.quick else 2)
    device = harness.setup(args.device, args.threads)
    print(f"machine: {harness.machine_line(device)}")
    rows = []
    for name in args.shapes.split(","):
        batch_size, seq_len = SHAPES[name]
        print(f"{name}: batch {batch_size} x {seq_len}")
        rows.append(bench_shape(name, args, device, compiled=False))
        if args.compile:
            rows.append(bench_shape(name, args, device, compiled=True))
    print(
        f"\n{args.rounds} alternating rounds x {args.steps} steps, AdamW, float32; each cell: "
        "median over rounds of its tokens/s over transformers' in the same round "
        "(transformers eager for compiled rows), with transformers' median tokens/s"
    )
    harness.print_table(["preset", *PEER_ORDER], rows)


if __name__ == "__main__":
    main()
