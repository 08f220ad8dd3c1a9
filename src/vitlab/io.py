"""Durable files: atomic writes and the timestamps that name run and report directories.

Every file vitlab writes for a user (configs, weights, metrics, checkpoints, reports) goes
through :func:`atomic_write_bytes` or :func:`atomic_replace`: the content is written to a
temporary file beside the target, flushed and fsynced, then renamed over it, so a process killed
mid-write leaves the previous complete file, never half of a new one.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Callable

__all__ = ["atomic_replace", "atomic_write_bytes", "timestamp"]


def timestamp() -> str:
    """The time, as default run and report directories are named (``20261202-024315``)."""
    return f"{datetime.now():%Y%m%d-%H%M%S}"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is always either the old or the new content."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_replace(path, write)


def atomic_replace(path: str | Path, write: Callable[[Path], None]) -> None:
    """Let ``write(tmp)`` create a temporary file, make it durable, then rename it to ``path``.

    For writers that want a file name rather than bytes (safetensors' ``save_file``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:  # makes the rename itself durable; not possible on every platform
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
