"""Complete-or-absent directories: build under a temporary sibling, rename into place.

A build killed half way leaves only a `.tmp-...` folder that no reader mistakes for a finished
one; the next build on the same host removes it once its process is gone. A finished directory
found damaged is deleted only by the process that builds it, and never for an I/O error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from data.errors import DataError

_TMP_PREFIX = ".tmp-"
T = TypeVar("T")
log = logging.getLogger(__name__)


def load_finished(
    path: Path, load: Callable[[Path], T], what: str, redo: str, repair: bool
) -> T | None:
    """``load(path)`` for a finished directory (e.g. ``what="token cache"``), or None if absent.

    Damage (``load`` raised ValueError, KeyError or TypeError, or a file of it is missing) is
    reported in one line and the directory deleted, so the caller rebuilds it (``redo``: say how),
    only when ``repair``: only the process that builds it may delete it, as others may be reading
    it right then; they fail with a clear message instead. Any other OSError (an I/O error, a
    network filesystem hiccup) proves no damage and deletes nothing: a cache may hold hours of work.
    """
    if not path.is_dir():
        return None
    try:
        return load(path)
    except FileNotFoundError as err:
        if not path.is_dir():
            return None  # removed while we read it: absent
        damage: Exception = err
    except OSError as err:
        raise DataError(
            f"could not read the {what} {path} ({err}); it was left as it is: run again once the "
            f"filesystem answers, or delete it to rebuild it"
        ) from None
    except (ValueError, KeyError, TypeError) as err:
        damage = err
    if not repair:
        raise DataError(
            f"the {what} {path} is damaged ({damage}); only the process that builds it (rank 0) "
            f"may delete it: run again, or delete it and run again"
        )
    log.warning("%s %s is corrupt (%s); %s it", what, path, damage, redo)
    shutil.rmtree(path, ignore_errors=True)
    return None


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
