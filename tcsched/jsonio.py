"""Atomic writes of reports and other small text files (import path ``tcsched.jsonio``).

A reader never sees a half-written file: the text goes to a temporary file in the target's folder, is flushed
to disk, and is renamed over the target (``os.replace``, atomic on POSIX within one file system). On an error the
temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: int = 0o644) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; creates the parent folder.

    Args:
        path: the target file.
        text: the whole content.
        mode: permission bits of the result (``mkstemp`` would leave 0o600; reports are meant to be read).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: the folder cannot be created or written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix or ".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2, default=None) -> Path:
    """``json.dumps(obj, indent=indent, default=default)`` written with :func:`atomic_write_text`."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=default))
