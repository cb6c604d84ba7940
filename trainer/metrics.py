"""Where a run's metrics go: ``metrics.jsonl`` (one JSON row per logged step), the ``metrics.png``
plot, Weights & Biases, and the throughput figures (tokens/s, MFU against a peak FLOP/s, measured
once per machine and cached)."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainer.config import WandbConfig


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends step records to ``path``; on resume, drops the records past the resumed step."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        """Every record so far (a torn last line from a killed run is skipped)."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def truncate_after(self, step: int) -> None:
        """Keep only records with ``step <= step`` (rewritten to a temp file, then renamed)."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + f".tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as a line and flush it to disk."""
        line = json.dumps({k: _clean(v) for k, v in record.items()})
        with self.path.open("a") as f:
            f.write(line + "\n")
            f.flush()


class BackgroundCall:
    """``fn(*args)`` run in its own thread; :meth:`result` waits for it and returns its value, or
    raises, in the caller's thread and with its traceback, what it raised."""

    def __init__(self, fn: Callable[..., Any], *args: Any, name: str, daemon: bool) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._call, args=(fn, args), name=name, daemon=daemon
        )
        self._thread.start()

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            self._value = fn(*args)
        except BaseException as e:  # handed to the caller's thread by result()
            self._error = e

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


class PlotWriter:
    """Draws ``metrics.png`` in a background thread, one plot at a time, so that the next steps
    (or the samples after the last evaluation) run while matplotlib imports and renders, about
    1 s per plot on a 2-core CPU. :meth:`wait` returns when the last plot is on disk and
    re-raises an error raised while drawing it."""

    def __init__(self) -> None:
        self._pending: BackgroundCall | None = None

    def draw(self, records: list[dict[str, Any]], path: Path, title: str = "") -> None:
        self.wait()
        # Not a daemon: the interpreter waits for it, so a plot is never cut off at exit.
        self._pending = BackgroundCall(
            write_plot, records, path, title, name="metrics-plot", daemon=False
        )

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _is_headline(key: str) -> bool:
    """A downstream key worth a curve: the CORE score or a task's accuracy (not its stderr)."""
    return key == "downstream/core" or key.endswith("/acc")


def write_plot(records: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Draw the curves in ``records`` (metrics.jsonl rows) to ``path``, replacing it atomically."""
    # Imported here: matplotlib takes about as long to import as a training step of tiny takes.
    # A bare Figure renders headless (Agg) and needs no pyplot global state.
    from matplotlib.figure import Figure

    # downstream accuracies and the CORE score (trainer.eval_tasks), if the run scores tasks
    tasks = sorted(
        {k for r in records for k in r if k.startswith("downstream/") and _is_headline(k)}
    )
    fig = Figure(figsize=(20 if tasks else 15, 4))
    ax_loss, ax_acc, ax_ppl, *ax_tasks = fig.subplots(1, 4 if tasks else 3)
    ax_loss.plot(*_series(records, "train_loss"), label="train", alpha=0.8)
    ax_loss.plot(*_series(records, "val_loss"), "o-", label="val")
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax_loss.legend()
    ax_acc.plot(*_series(records, "val_acc"), "o-", color="tab:green")
    ax_acc.set(xlabel="step", ylabel="next-token accuracy", title="val accuracy")
    ax_ppl.plot(*_series(records, "val_ppl"), "o-", color="tab:red")
    ax_ppl.set(xlabel="step", ylabel="perplexity", title="val perplexity", yscale="log")
    for ax in ax_tasks:
        for key in tasks:
            ax.plot(*_series(records, key), "o-", label=key.removeprefix("downstream/"))
        ax.set(xlabel="step", ylabel="score", title="downstream")
        ax.legend(fontsize="small")
    for ax in (ax_loss, ax_acc, ax_ppl, *ax_tasks):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    # Fixed margins: tight_layout measures every label with an extra render (40% of the plot's time)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.13, top=0.85, wspace=0.25)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=80)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # a full disk: the plot can be redrawn from metrics.jsonl later; the save says the rest
        print(f"warning: could not write {path} ({err}); training goes on", file=sys.stderr)


_ENV_MODES = {"online": "online", "offline": "offline", "disabled": "disabled", "dryrun": "offline"}


def resolve_mode(mode: str) -> str:
    """``auto`` becomes WANDB_MODE if set, else online when logged in (an API key is found
    without prompting), else offline (sync later with ``wandb sync``)."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").lower()
    if env in _ENV_MODES:
        return _ENV_MODES[env]
    import wandb

    return "online" if wandb.login(prompt=False, verify=False) else "offline"


def wandb_run_id(run_dir: Path) -> str:
    """The wandb run id of a run directory: the same for every resume, and for ``train.py eval``
    of its checkpoints, which logs its scores to that run."""
    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]


class WandbLogger:
    """One wandb run per run directory (a resumed run continues the same wandb run id).

    wandb starts in a background thread: importing it and starting its service take about 3 s on
    a 2-core CPU (2 s of that importing ``wandb.sdk.launch``, which ``wandb.init`` always does),
    as long as the rest of a short run's setup, which goes on meanwhile. The first use of
    :attr:`run` waits for it; an error inside wandb is reported there as before, and a bug in
    this code is raised there with its traceback."""

    def __init__(
        self,
        cfg: WandbConfig,
        run_dir: Path,
        run_name: str,
        config: dict[str, Any],
        background: bool = True,
    ) -> None:
        self._run: Any = None
        self._pending: BackgroundCall | None = None
        if cfg.mode == "disabled":
            return
        args = (cfg, run_dir, run_name, config)
        if background:
            self._pending = BackgroundCall(self._start, *args, name="wandb-init", daemon=True)
        else:
            self._run = self._start(*args)

    @staticmethod
    def _start(cfg: WandbConfig, run_dir: Path, run_name: str, config: dict[str, Any]) -> Any:
        mode = resolve_mode(cfg.mode)
        if mode == "disabled":
            return None
        import wandb

        wandb_dir = Path(os.environ.get("WANDB_DIR") or run_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        try:
            return wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=run_name,
                id=wandb_run_id(run_dir),
                resume="allow",
                tags=list(cfg.tags),
                dir=str(wandb_dir),
                mode=mode,  # type: ignore[arg-type]  # resolve_mode returns one of wandb's modes
                config=config,
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as e:  # wandb raises many types (network, auth, service start)
            print(
                f"wandb: could not start a {mode} run ({e}); training continues without "
                "wandb (set wandb.mode=offline, or disabled to silence this)",
                file=sys.stderr,
            )
            return None

    @property
    def run(self) -> Any:
        """The wandb run, once started (None when disabled or when it could not start)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._run = pending.result()
        return self._run

    @property
    def run_path(self) -> Path | None:
        """The local folder wandb writes this run's files to."""
        return Path(self.run.dir).parent if self.run is not None else None

    def log(self, record: dict[str, Any]) -> None:
        run = self.run
        if run is not None:
            step = record["step"]
            run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=step)

    def finish(self, exit_code: int = 0) -> None:
        run = self.run
        if run is not None:
            run.finish(exit_code=exit_code)
            self._run = None


# Dense bf16 tensor-core peaks (FLOP/s) from NVIDIA's data sheets, by the exact name
# torch.cuda.get_device_name gives: the variants of one chip differ (an H100 PCIe has 76% of the
# SXM's peak), so a name not listed here is measured rather than matched by a prefix.
GPU_BF16_PEAKS = {
    "NVIDIA B200": 2250e12,
    "NVIDIA H200": 989e12,  # SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12,
}


def data_sheet_peak(gpu_name: str) -> float | None:
    """The dense bf16 peak of the GPU named exactly ``gpu_name``, if :data:`GPU_BF16_PEAKS`
    lists it."""
    return GPU_BF16_PEAKS.get(gpu_name.strip())


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None
) -> float:
    """FLOP/s of a square ``n`` x ``n`` matmul on ``device`` (default 1024 on a CPU, 8192 on a
    GPU, which a smaller one leaves mostly idle): the best of a few timed repeats. float32 is
    measured as float32, with TF32 off for the measurement: the precision the name promises.

    A peak is what the hardware can do, so the fastest repeat counts (a median taken while
    another process shares the cores underestimates it and pushes MFU past 100%).
    """
    n = n or (1024 if device.type == "cpu" else 8192)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 8 if device.type == "cpu" else 20

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        torch.mm(a, b)
        sync()
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            sync()
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_float32_matmul_precision(before)
    return 2 * n**3 * reps / min(times)


def peak_cache_path() -> Path:
    """Where measured peaks are kept: ``$XDG_CACHE_HOME/qwen3-pretrain/peak_flops.json``."""
    # XDG's rule by hand: platformdirs, which follows it on Linux, is not one of our dependencies.
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "qwen3-pretrain" / "peak_flops.json"


def _processor_name() -> str:
    try:  # Linux names the CPU model here; platform.processor() is often empty there
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_key(device: torch.device, dtype: torch.dtype) -> str:
    """What a measured peak depends on: the device's model (on a CPU, also the threads torch
    uses), the dtype and the torch version."""
    if device.type == "cuda":  # (fp32 since measured without TF32)
        name = torch.cuda.get_device_name(device) + (", no TF32" if dtype == torch.float32 else "")
    elif device.type == "cpu":
        name = f"{_processor_name()}, {torch.get_num_threads()} threads"
    else:
        name = device.type
    return (
        f"{device.type}: {name} | {str(dtype).removeprefix('torch.')} | torch {torch.__version__}"
    )


def _read_peaks(path: Path) -> dict[str, Any]:
    try:
        figures = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}
    return figures if isinstance(figures, dict) else {}


def _write_peaks(path: Path, figures: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)  # concurrent runs (torchrun ranks) each write whole files
    except OSError:  # a read-only home: the figure still serves this run
        tmp.unlink(missing_ok=True)


def quieter_now(measured_at: float, load: float, cores: int) -> bool:
    """Whether a CPU peak measured at load average ``measured_at`` is worth measuring again at
    ``load``: lower by 1 or more, and below the core count."""
    return load + 1 <= measured_at and load < cores


def peak_flops(
    device: torch.device,
    dtype: torch.dtype | None,
    configured: float | None,
    cache: Path | None = None,
) -> float:
    """``configured`` if set; on a known GPU its data-sheet bf16 peak; else the figure cached
    for this device, dtype and torch version in ``cache`` (default :func:`peak_cache_path`),
    measured with a matmul and cached the first time (delete the file to measure again).

    Other processes slow a CPU measurement down, so a CPU figure is measured again when the
    machine is quieter than it was then (load average lower by 1 or more and below the core
    count), and the higher figure is kept."""
    if configured:
        return float(configured)
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        known = data_sheet_peak(torch.cuda.get_device_name(device))
        if known is not None:
            return known
    dtype = dtype or torch.float32
    path = cache or peak_cache_path()
    key = peak_key(device, dtype)
    load = os.getloadavg()[0] if device.type == "cpu" and hasattr(os, "getloadavg") else 0.0
    entry = _read_peaks(path).get(key)
    best = 0.0
    if isinstance(entry, dict) and isinstance(entry.get("flops"), int | float):
        best = float(entry["flops"])
        then = float(entry.get("load_average", 0.0))
        if best > 0 and not quieter_now(then, load, os.cpu_count() or 1):
            return best
    measured = measure_matmul_flops(device, dtype)
    if measured > best:
        figure = {"flops": measured, "load_average": round(load, 2)}
        _write_peaks(path, {**_read_peaks(path), key: figure})
    return max(measured, best)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Fraction of ``peak`` the training step reaches."""
    return tokens_per_s * flops_per_token / peak
