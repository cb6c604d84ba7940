"""Checkpoint size and save time: format 3 (the weights once, in ``model-*.safetensors`` written
through DCP's ``HuggingFaceStorageWriter``; ``train_state/`` the optimizer state only) against
format 2 (a gathered ``model.safetensors`` plus the weights and optimizer state again in DCP
shards), for one process and AdamW (two fp32 moments per parameter).

Format 2's save is rebuilt here from the pieces it was made of (``Qwen3.save_pretrained`` and a
``dcp.save`` of weights and optimizer state), as the baseline. The two sides alternate,
``--repeats`` times each; the figures are the medians.

    .venv/bin/python benchmarks/bench_checkpoint.py            # a 0.8M and a 25M shape
    .venv/bin/python benchmarks/bench_checkpoint.py --quick    # the tiny shape only
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save  # noqa: E402

from optim import OptimConfig, OptimizerSet, build_optimizers  # noqa: E402
from qwen3 import Qwen3, Qwen3Config  # noqa: E402
from trainer.run_layout import TRAIN_STATE_DIR  # noqa: E402
from trainer.train_state import finish_weights, save_train_state  # noqa: E402

# (hidden, layers, heads, kv heads, intermediate) over a 320-token vocabulary (tied embeddings)
SHAPES = {"tiny": (128, 4, 4, 2, 384), "small": (512, 8, 8, 4, 1536)}


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _build(shape: tuple[int, int, int, int, int]) -> tuple[Qwen3, OptimizerSet]:
    hidden, layers, heads, kv, inter = shape
    torch.manual_seed(0)
    model = Qwen3(
        Qwen3Config(
            vocab_size=320,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=hidden // heads,
            max_position_embeddings=64,
        )
    )
    optimizers = build_optimizers(model, OptimConfig(name="adamw", warmup_steps=0), 10)
    x = torch.randint(0, 320, (2, 32))
    model(x, targets=x).backward()
    optimizers.step()
    optimizers.zero_grad()
    return model, optimizers


def save_format_2(model: Qwen3, optimizers: OptimizerSet, path: Path) -> None:
    model.save_pretrained(path)
    state = {
        "model": get_model_state_dict(model),
        "optim": {
            n: get_optimizer_state_dict(model, o)
            for n, o in zip(optimizers.names, optimizers.optimizers, strict=True)
        },
    }
    dcp_save(state, checkpoint_id=str(path / TRAIN_STATE_DIR), no_dist=True)


def save_format_3(model: Qwen3, optimizers: OptimizerSet, path: Path) -> None:
    save_train_state(model, optimizers, path)
    finish_weights(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny shape only")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shapes = dict(list(SHAPES.items())[:1]) if args.quick else SHAPES
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, AdamW, one process")
    print("| shape | format | checkpoint | weights + optimizer | ratio | save s (median) |")
    print("|---|---|---|---|---|---|")
    for label, shape in shapes.items():
        model, optimizers = _build(shape)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        label = f"{label} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M)"
        ideal = 3 * weights  # the weights and AdamW's two moments, all fp32
        times: dict[str, list[float]] = {"2": [], "3": []}
        sizes: dict[str, int] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.repeats):
                for fmt, save in (("2", save_format_2), ("3", save_format_3)):  # alternate
                    path = Path(tmp) / f"{fmt}-{i}"
                    path.mkdir()
                    start = time.perf_counter()
                    save(model, optimizers, path)
                    times[fmt].append(time.perf_counter() - start)
                    sizes[fmt] = _dir_bytes(path)
                    shutil.rmtree(path)
        for fmt in ("2", "3"):
            print(
                f"| {label} | {fmt} | {sizes[fmt] / 1e6:.2f} MB | {ideal / 1e6:.2f} MB | "
                f"{sizes[fmt] / ideal:.2f}x | {statistics.median(times[fmt]):.3f} |"
            )


if __name__ == "__main__":
    main()
