"""Atomic file writes: every file mtpbench writes is whole or absent, never half-written.

A file is written to a temporary name in its directory and renamed over the target. Ctrl-C (SIGINT) is held while
that happens and delivered after, so an interrupt landing between the temporary file's creation and its rename
leaves neither a half file nor a temporary behind. A full disk is one readable line, and the old file stays.

Durable, not only atomic: the temporary file is fsync'ed before the rename and its directory after it (and the
parent of a directory the write created), so a result is final only once it would survive a power loss or a
kernel panic, not just a killed process: never a zero-length manifest or a part the directory forgot.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UserError

TEMP_PREFIX = ".tmp-"
DURABLE = True  # fsync files and directories (off only to measure what it costs)


def fsync_path(path: Path | str) -> None:
    """Flush a file's or a directory's data and metadata to the disk (no-op when DURABLE is off)."""
    if not DURABLE:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # a filesystem that cannot sync a directory
            raise
    finally:
        os.close(fd)


def move(src: Path, dest: Path) -> None:
    """Rename `src` to `dest` (same filesystem), durably: both directories synced after."""
    made = not dest.parent.exists()
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest)
    fsync_path(dest.parent)
    fsync_path(src.parent)
    if made:
        fsync_path(dest.parent.parent)


@contextmanager
def interrupt_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block is done, then deliver it. Main thread only (the only one Python
    delivers signals to); elsewhere a no-op. A SIGINT ignored by the parent shell stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[tuple[int, Any]] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending and callable(previous):
            previous(*pending[0])  # Python's default handler raises KeyboardInterrupt here
        elif pending and previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_with(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` on a temporary path beside `path`, then rename it to `path` (mode 0666 less the umask)."""
    path = Path(path)
    made = not path.parent.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    with interrupt_deferred():
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            fsync_path(tmp)
            os.replace(tmp, path)
            fsync_path(path.parent)
            if made:
                fsync_path(path.parent.parent)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                raise UserError(f"cannot write {path}: {e.strerror} (nothing written there; earlier files are "
                                f"intact)") from None
            raise
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_text(path: Path, text: str) -> None:
    write_with(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: Path, obj: Any) -> None:
    """Serialised inside the write, so an interrupt during a slow dump is held like one during the write."""
    write_with(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n",
                                                      encoding="utf-8"))
