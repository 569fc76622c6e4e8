"""One writer per output: an advisory `fcntl` lock on a sibling file `.NAME.lock`.

The kernel drops the lock when its holder dies (kill -9 included), so a crash never leaves a stale lock;
the file holds the holder's pid so that a refused second writer can say who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from fsct.errors import FsctError


def lock_path(out: Path | str) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.lock"


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid else "another process"


def acquire(out: Path | str, what: str = "output") -> int:
    """Lock `out` for writing (it need not exist yet); returns the fd to pass to `release`.
    Raises FsctError naming the holder's pid when another process holds it."""
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FsctError(f"{out}: {what} is being written by {_holder(path)} (lock {path}); "
                            "wait for it to finish or stop it") from None
        # The previous holder unlinks the file before unlocking: if we locked an unlinked inode, retry.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def release(out: Path | str, fd: int) -> None:
    # Unlink while still holding the lock, so nobody can lock this inode after we let go of it.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lock_path(out))
    os.close(fd)


@contextlib.contextmanager
def locked(out: Path | str, what: str = "output", enabled: bool = True) -> Iterator[None]:
    """Hold the write lock of `out` for the block (a no-op when not `enabled`, e.g. on ranks other than 0)."""
    if not enabled:
        yield
        return
    fd = acquire(out, what)
    try:
        yield
    finally:
        release(out, fd)
