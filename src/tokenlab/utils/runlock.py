"""One training at a time per run directory: an exclusive ``fcntl.flock`` on ``RUN/.lock``.

The kernel drops a ``flock`` when its holder exits, however it exits (SIGKILL, a crash, a power-off of a local
disk), so a lock can never outlive its process: there is no pid polling and no timeout to guess. The file also
records who holds it (pid, host, since when) so the refusal can name the holder; when a new run takes the lock and
finds the record of a process that is gone, it says that it takes the stale lock over. On network file systems
Linux maps ``flock`` to POSIX record locks (NFSv4: lease-backed), which also work across hosts.

The lock is re-entrant within one process (``engine.train`` takes it before reading the data, ``Trainer.fit``
again around the loop) and released when the outermost holder leaves.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["LOCK_FILE", "RunDirLocked", "lock_holder", "run_dir_lock"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"

# path -> (open file descriptor, depth): the locks this process holds
_HELD: dict[Path, tuple[int, int]] = {}


class RunDirLocked(ValueError):
    """Another process trains into the same run directory (a user error: one ``error:`` line)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def lock_holder(run_dir: str | Path) -> dict[str, Any] | None:
    """The holder record of ``RUN/.lock`` (``pid``, ``host``, ``since``), or None when there is none readable."""
    try:
        data = json.loads((Path(run_dir) / LOCK_FILE).read_text() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (no holder record)"
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {when}"


def _acquire(path: Path) -> int:
    """Open and lock ``path`` without waiting; return the descriptor (raises RunDirLocked when held)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirLocked(
                f"run directory {path.parent} is in use by {_describe(lock_holder(path.parent))}: another training "
                f"writes there; wait for it, stop it, or use another --run-dir"
            ) from None
        # the holder we waited on may have removed the file after we opened it: lock the file that is there now
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextmanager
def run_dir_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold the run directory's lock for the ``with`` block (re-entrant within this process).

    Raises:
        RunDirLocked: another live process holds it (the message names its pid, host and start time).
    """
    run_dir = Path(run_dir).resolve()
    path = run_dir / LOCK_FILE
    if path in _HELD:
        fd, depth = _HELD[path]
        _HELD[path] = (fd, depth + 1)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path)
        old = lock_holder(run_dir)
        host = socket.gethostname()
        if old and old.get("pid") != os.getpid():
            stale = old.get("host") == host and isinstance(old.get("pid"), int) and not _pid_alive(old["pid"])
            logger.warning(
                "taking over the %slock of %s on %s (it ended without releasing it)",
                "stale " if stale else "", _describe(old), run_dir,
            )  # fmt: skip
        record = json.dumps({"pid": os.getpid(), "host": host, "since": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        _HELD[path] = (fd, 1)
    try:
        yield path
    finally:
        fd, depth = _HELD[path]
        if depth > 1:
            _HELD[path] = (fd, depth - 1)
        else:
            del _HELD[path]
            try:
                os.unlink(path)  # while still locked: a waiter that opened the old file re-checks the inode
            except OSError:
                pass
            os.close(fd)
