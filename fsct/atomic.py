"""Write-then-rename helpers, so that a crash or a bad input never leaves half-written output behind."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fsct.errors import FsctError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(out: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; on success it replaces `out`, on any error it is removed."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FsctError(f"{out}: output exists (pass --overwrite to replace it)")
    tmp = temp_dir(out)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def temp_dir(out: Path) -> Path:
    """A new hidden sibling of `out` (`.NAME.tmp-*`: what remove_stale clears after a kill)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any other folder
    return tmp


def replace_dir(new: Path, out: Path) -> None:
    """Rename the finished folder `new` onto `out`. An existing `out` is renamed aside first and removed
    after, so at every moment `out` is either the old folder or the new one, never a mix."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        new.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(out)


@contextlib.contextmanager
def atomic_file(out: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `out`; it is renamed onto `out` only if the block succeeds."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_umask())  # mkstemp makes 0600
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def fault_point(name: str) -> None:
    """Test hook: makes a crash or a full disk happen at an exact point, with no sleeps or races.
    FSCT_TEST_KILL=name kills this process (as kill -9 would); FSCT_TEST_ENOSPC=name raises ENOSPC."""
    if os.environ.get("FSCT_TEST_KILL") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("FSCT_TEST_ENOSPC") == name:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def remove_stale(out: Path | str) -> list[Path]:
    """Remove the temporaries (`.NAME.tmp-*`, `.NAME.old-*`) that killed writers of `out` left beside it.
    Only call this while holding `out`'s lock: then no live writer owns any of them."""
    out = Path(out)
    gone = []
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for p in out.parent.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p)
    return gone
