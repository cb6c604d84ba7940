"""Side-by-side measurement harness shared by the benchmarks: twin models with the same weights,
training steps built alike for every contender, the machine's measured matmul peak, alternating
timed rounds, and a plain-text table."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from optim import OptimConfig, OptimizerSet, build_optimizers
from qwen3 import Qwen3, Qwen3Config

# A contender's training loss: (model, inputs, targets) -> the mean over the target tokens.
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

# A shape between the two presets, for the scaling picture (about 5.2 M parameters).
MID = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=2048,
)

# About 100 M parameters (GPT-2 small's width and depth, a 32k vocabulary tied to the head), the
# size at which activation memory at seq_len 1024 is measured.
BASE_100M = dict(
    vocab_size=32768,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=2048,
)


def config_for(name: str) -> Qwen3Config:
    """A preset by name, ``mid`` (the shape between ``tiny`` and ``small``) or ``100m``."""
    shapes: dict[str, dict[str, Any]] = {"mid": MID, "100m": BASE_100M}
    return Qwen3Config(**shapes[name]) if name in shapes else Qwen3Config.from_preset(name)


def setup(device: str, threads: int | None = None) -> torch.device:
    """Flush denormals on CPU (both sides alike), set the CPU threads, pick the device."""
    torch.set_flush_denormal(True)
    if threads:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def transformers_twin(model: Qwen3) -> torch.nn.Module:
    """``transformers``' Qwen3ForCausalLM with exactly ``model``'s weights, SDPA attention."""
    import transformers

    hf_config = transformers.Qwen3Config(**model.config.to_dict())
    twin = transformers.Qwen3ForCausalLM._from_config(
        hf_config, attn_implementation="sdpa", torch_dtype=model.dtype
    )
    twin.load_state_dict(model.state_dict(), strict=not model.config.tie_word_embeddings)
    twin.tie_weights()
    return twin.to(model.device).train(model.training)


def transformers_twin_from_disk(model: Qwen3, tmp_dir: Path) -> torch.nn.Module:
    """Save ``model`` with ``save_pretrained`` and load it with ``AutoModelForCausalLM``."""
    import transformers

    model.save_pretrained(tmp_dir)
    twin = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_dir, attn_implementation="sdpa", torch_dtype=model.dtype
    )
    return twin.to(model.device).eval()


def ours_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x, targets=y)  # our fused, chunked LM-head loss


def transformers_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # shift_labels: the targets as given (labels alone are shifted there, one target fewer a row).
    return model(input_ids=x, labels=y, shift_labels=y).loss


def training_optimizers(model: torch.nn.Module, name: str = "adamw") -> OptimizerSet:
    """Our optimizer construction for any contender (same AdamW groups and decay split by
    tensor identity and shape, so peers' parameter names do not matter); no warmup."""
    cfg = OptimConfig(name=name, warmup_steps=0, schedule="constant")
    return build_optimizers(model, cfg, max_steps=10**9)


def train_stepper(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batch: torch.Tensor,
    optim_name: str = "adamw",
    amp: bool = False,
) -> Callable[[], float]:
    """A closure running one training step on ``batch`` (B, T+1); returns the loss as a Python
    float (which syncs the device)."""
    opt = training_optimizers(model, optim_name)
    x, y = batch[:, :-1], batch[:, 1:].contiguous()  # transformers' loss views its targets
    device_type = batch.device.type

    def step() -> float:
        ctx = torch.autocast(device_type, torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return float(loss.detach())

    return step


def timed(step: Callable[[], float], steps: int, tokens: int) -> Callable[[], float]:
    """A closure running ``steps`` steps of ``tokens`` tokens each; returns tokens/s."""

    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()  # float(loss) syncs the device
        return steps * tokens / (time.perf_counter() - t0)

    return run


def matmul_peak_gflops(
    device: torch.device, dtype: torch.dtype = torch.float32, repeats: int = 5
) -> float:
    """Best observed GFLOP/s of a square matmul: this machine's practical peak right now."""
    n, reps = (8192, 20) if device.type == "cuda" else (1024, 8)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


def alternate(contenders: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each contender once per round, rotating who goes first; collect what each returns."""
    names = list(contenders)
    results: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            results[name].append(contenders[name]())
    return results


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """A Markdown table, ready to paste into benchmarks/results/ or docs/performance.md."""
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def common_args(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--quick", action="store_true", help="short run (smoke check)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    return parser


def cpu_tensor_growth(fn: Callable[[], object]) -> int:
    """The highest growth of CPU tensor memory while ``fn()`` runs, in bytes: torch's profiler
    with ``profile_memory`` sees every allocation and free. (RSS would also count the C
    library's retained heap and the thread stacks.)"""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The running total counts every block allocated while any profiler was on and not yet
    # freed (also an earlier session's): growth is measured from the total before the first.
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            f = node.extra_fields
            events.append((node.start_time_ns, f.alloc_size, f.total_allocated))
        stack.extend(node.children)
    if not events:
        return 0
    events.sort()
    start = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - start
