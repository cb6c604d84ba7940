"""Process-wide settings the trainer applies on CPU (trainer.build.apply_runtime_settings): glibc's
``malloc`` (a fixed mmap threshold under FSDP, freed memory kept for reuse otherwise), checked by
what glibc does with a tensor's memory, in fresh processes (the setting is process-wide)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _glibc(), reason="glibc >= 2.33 (mallinfo2) only")

# The probes' common start: glibc's counters, and the trainer's settings as ``mode`` asks.
_SETUP = """
import ctypes, sys, torch
sys.path.insert(0, "tests")
from test_trainer_support import compose_run_config
from trainer.build import apply_runtime_settings
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "apply":
    apply_runtime_settings(compose_run_config(["trainer.fsdp=true"]), torch.device("cpu"))
if sys.argv[1] == "apply-unsharded":
    apply_runtime_settings(compose_run_config([]), torch.device("cpu"))
"""

# Frees a 20 MiB tensor (glibc then raises its threshold to 20 MiB), allocates 6 MiB and prints
# how many bytes of that came from a fresh mapping (mallinfo2's hblkhd: mmapped bytes), which
# glibc unmaps when the tensor is freed; heap memory it keeps.
_PROBE = (
    _SETUP
    + """
big = torch.ones(20 << 20, dtype=torch.uint8)
del big
before = libc.mallinfo2().hblkhd
t = torch.ones(6 << 20, dtype=torch.uint8)
print(libc.mallinfo2().hblkhd - before)
"""
)

# A 64 MiB tensor, above any mmap threshold glibc picks by itself (32 MiB at most), allocated and
# freed twice: prints the bytes of the second that came from a fresh mapping, and by how much
# the heap has grown once both are freed (arena: heap bytes glibc holds, not returned).
_PROBE_LARGE = (
    _SETUP
    + """
heap = libc.mallinfo2().arena
torch.ones(64 << 20, dtype=torch.uint8)  # allocated and freed at once
before = libc.mallinfo2().hblkhd
t = torch.ones(64 << 20, dtype=torch.uint8)
mapped = libc.mallinfo2().hblkhd - before
del t
print(mapped, libc.mallinfo2().arena - heap)
"""
)


def _run_probe(probe: str, mode: str, threshold: str | None = None) -> list[int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = threshold
    out = subprocess.run(
        [sys.executable, "-c", probe, mode],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return [int(v) for v in out.stdout.strip().splitlines()[-1].split()]


def _mapped_bytes_of_a_6_mib_tensor(mode: str, threshold: str | None = None) -> int:
    return _run_probe(_PROBE, mode, threshold)[0]


def test_under_fsdp_on_cpu_tensors_of_4_mib_and_up_get_their_own_mapping_whatever_was_freed() -> (
    None
):
    # glibc's own behaviour, which the setting exists to change: after a 20 MiB block is freed,
    # a 6 MiB tensor comes from the heap, whose freed holes stay resident
    assert _mapped_bytes_of_a_6_mib_tensor("default") == 0
    assert _mapped_bytes_of_a_6_mib_tensor("apply") >= 6 << 20
    # without FSDP no block gets a mapping of its own (next test): there it would cost speed
    assert _mapped_bytes_of_a_6_mib_tensor("apply-unsharded") == 0


def test_without_fsdp_on_cpu_a_freed_64_mib_tensor_is_kept_for_the_next_one() -> None:
    # glibc's own behaviour: 64 MiB is above any threshold it picks, so each such tensor is a
    # fresh mapping (its pages faulted in again on every step) and nothing of it stays
    mapped, kept = _run_probe(_PROBE_LARGE, "default")
    assert mapped >= 64 << 20
    assert kept < 64 << 20
    # the trainer's setting: the second tensor reuses the heap the first left, which is kept
    mapped, kept = _run_probe(_PROBE_LARGE, "apply-unsharded")
    assert mapped == 0
    assert kept >= 64 << 20
    # a choice the user made in the environment is left alone
    mapped, _ = _run_probe(_PROBE_LARGE, "apply-unsharded", threshold=str(16 << 20))
    assert mapped >= 64 << 20


def test_a_threshold_the_user_chose_is_kept() -> None:
    # 16 MiB through the environment: the trainer leaves it, so the 6 MiB tensor is on the heap
    assert _mapped_bytes_of_a_6_mib_tensor("apply", threshold=str(16 << 20)) == 0
