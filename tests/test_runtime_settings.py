"""Process-wide settings the trainer applies on CPU (trainer.build.apply_runtime_settings): the
fixed ``malloc`` mmap threshold, checked by what glibc does with a freed tensor's memory, in
fresh processes (the setting is process-wide)."""

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

# Frees a 20 MiB tensor (glibc then raises its threshold to 20 MiB), allocates 6 MiB and prints
# how many bytes of that came from a fresh mapping (mallinfo2's hblkhd: mmapped bytes), which
# glibc unmaps when the tensor is freed; heap memory it keeps.
_PROBE = """
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
big = torch.ones(20 << 20, dtype=torch.uint8)
del big
before = libc.mallinfo2().hblkhd
t = torch.ones(6 << 20, dtype=torch.uint8)
print(libc.mallinfo2().hblkhd - before)
"""


def _mapped_bytes_of_a_6_mib_tensor(mode: str, threshold: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    if threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = threshold
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def test_under_fsdp_on_cpu_tensors_of_4_mib_and_up_get_their_own_mapping_whatever_was_freed() -> (
    None
):
    # glibc's own behaviour, which the setting exists to change: after a 20 MiB block is freed,
    # a 6 MiB tensor comes from the heap, whose freed holes stay resident
    assert _mapped_bytes_of_a_6_mib_tensor("default") == 0
    assert _mapped_bytes_of_a_6_mib_tensor("apply") >= 6 << 20
    # without FSDP glibc is left as it is: there the setting would cost speed, not save memory
    assert _mapped_bytes_of_a_6_mib_tensor("apply-unsharded") == 0


def test_a_threshold_the_user_chose_is_kept() -> None:
    # 16 MiB through the environment: the trainer leaves it, so the 6 MiB tensor is on the heap
    assert _mapped_bytes_of_a_6_mib_tensor("apply", threshold=str(16 << 20)) == 0
