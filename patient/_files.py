"""The one atomic file writer (a leaf module: standard library only, so every layer and the JAX-free device path use it).

`write_atomic(path, data)` writes to a temporary file in the destination folder, flushes it to disk (fsync) and renames
it into place, so a reader sees the old file or the whole new one, never half of one. Temporary names carry the
writer's pid; a temporary file left by a killed writer is removed by the next write of the same path.
"""

from __future__ import annotations

import os
import tempfile
from glob import escape as glob_escape
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` (bytes, or text written as UTF-8) to `path` atomically, creating the folder; returns the path."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _remove_stale_temps(path: Path) -> None:
    """Delete temporary files that an earlier write of `path` left when its process was killed (their names carry
    the writer's pid; a file of a process that still runs is left alone)."""
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass  # another user's live process
