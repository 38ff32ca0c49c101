"""Atomic folder replacement: build into a temporary sibling, then swap it in with renames."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on clean exit it replaces ``target``.

    On an exception (or KeyboardInterrupt) the temporary folder is removed and ``target`` is left untouched.
    The swap is two ``rename`` calls on the same file system (old -> backup, new -> target); if the second fails,
    the backup is renamed back.
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if target.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        backup.rmdir()
        os.rename(target, backup)
    try:
        os.rename(tmp, target)
    except BaseException:
        if backup is not None:
            os.rename(backup, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def clean_stale_temporaries(target: str | os.PathLike) -> None:
    """Remove ``.NAME.tmp-*`` / ``.NAME.old-*`` left by a build that was killed (SIGKILL skips cleanup)."""
    target = Path(target).resolve()
    for p in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    if target.exists():
        for p in target.parent.glob(f".{target.name}.old-*"):
            shutil.rmtree(p, ignore_errors=True)
