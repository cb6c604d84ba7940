"""Complete-or-absent directories: build under a temporary sibling, rename into place.

A build killed half way leaves only a `.tmp-...` folder that no reader mistakes for a finished
one; the next build on the same host removes it once its process is gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

_TMP_PREFIX = ".tmp-"


def _tmp_name(final: Path) -> str:
    return f"{_TMP_PREFIX}{final.name}-{socket.gethostname()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_builds(final: Path) -> list[Path]:
    """Delete temporary builds of `final` left by dead processes on this host; return them."""
    prefix = f"{_TMP_PREFIX}{final.name}-{socket.gethostname()}-"
    removed: list[Path] = []
    if not final.parent.is_dir():
        return removed
    for tmp in final.parent.glob(prefix + "*"):
        pid = tmp.name[len(prefix) :]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def building(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it becomes `final`, on error it is removed.

    If another process published `final` first (two ranks building at once), ours is dropped
    and theirs kept: both were built from the same fingerprint.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(final)
    tmp = final.parent / _tmp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
