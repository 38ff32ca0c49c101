"""Atomic folder replacement: build into a temporary sibling, then swap it in with renames; and the check that
the folder being replaced is one a build may replace."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tcsched.manifest import MANIFEST_FILENAME


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on clean exit it replaces ``target``.

    On an exception (or KeyboardInterrupt) the temporary folder is removed and ``target`` is left untouched.
    Before the swap every folder and file of the new tree gets the permissions ``mkdir`` and ``open`` give
    under the process's umask (:func:`normalise_permissions`): ``tempfile`` makes 0700 folders and 0600 files,
    which a server running as another user could not read. The swap is two ``rename`` calls on the same file
    system (old -> backup, new -> target); if the second fails, the backup is renamed back.

    It replaces whatever is at ``target``: call :func:`check_replaceable_output` first where ``target`` comes
    from a user.
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        normalise_permissions(tmp)
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


def normalise_permissions(root: str | os.PathLike) -> None:
    """Give ``root`` and every folder under it the mode ``mkdir`` gives (0o777 & ~umask: 0755 under the usual
    022), and every file the mode ``open`` gives (0o666 & ~umask: 0644), plus the execute bits (masked the same
    way) for files whose owner could execute them. Symbolic links are left as they are and not followed.

    The umask is read from a probe folder made with ``os.mkdir`` (reading it with ``os.umask`` means setting it,
    which races with other threads creating files).
    """
    root = Path(root)
    probe = Path(tempfile.mkdtemp(dir=root))  # only to get a unique name
    probe.rmdir()
    os.mkdir(probe)
    try:
        dir_mode = stat.S_IMODE(os.stat(probe).st_mode)
    finally:
        probe.rmdir()
    file_mode = dir_mode & 0o666
    exec_mode = dir_mode & 0o111
    os.chmod(root, dir_mode)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, dir_mode)
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                os.chmod(p, file_mode | (exec_mode if st.st_mode & stat.S_IXUSR else 0))


class OutputFolderError(ValueError):
    """The output folder exists and is not one a build may replace; nothing was touched."""


# model_repository/README.md as tracked in git (build_tools/templates/model_repository_README.md) says this
_PLACEHOLDER_README = ("README.md", "Written by `tcsched build`")
_LISTED_ENTRIES = 8


def check_replaceable_output(target: str | os.PathLike) -> None:
    """Refuse ``target`` as the output of a build that replaces it, unless it is absent or a tcsched repository.

    A tcsched repository is a folder that is empty, holds a ``manifest.json`` that parses as a JSON object with
    ``schema_version`` and ``variants`` (a tcsched manifest of any version: a web app's manifest.json does not
    count), or holds nothing but the placeholder README.md that git tracks in ``model_repository/``. Reads
    only; nothing is created, changed or removed.

    Raises:
        OutputFolderError: ``target`` is a file or a dangling link, or a folder that is not a tcsched repository;
            the message names it, says what it holds (the first 8 entries and their count), and what to do.
    """
    p = Path(target)
    if not p.exists():
        if p.is_symlink():
            raise OutputFolderError(
                f"refusing to write the repository at {p}: it is a dangling symbolic link"
            )
        return
    if not p.is_dir():
        raise OutputFolderError(
            f"refusing to replace {p}: it exists and is a file, not a folder; choose another output folder"
        )
    entries = sorted(os.listdir(p))
    if not entries:
        return
    manifest = p / MANIFEST_FILENAME
    if manifest.is_file():
        try:
            raw = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            why = f"its {MANIFEST_FILENAME} does not parse ({type(e).__name__})"
        else:
            if isinstance(raw, dict) and "schema_version" in raw and "variants" in raw:
                return
            why = f"its {MANIFEST_FILENAME} is not a tcsched manifest (no schema_version and variants)"
    elif entries == [_PLACEHOLDER_README[0]] and _file_says(p / entries[0], _PLACEHOLDER_README[1]):
        return
    else:
        why = f"it has no {MANIFEST_FILENAME}"
    shown = ", ".join(entries[:_LISTED_ENTRIES])
    if len(entries) > _LISTED_ENTRIES:
        shown += ", ..."
    raise OutputFolderError(
        f"refusing to replace {p}: it exists and is not a tcsched model repository ({why}); it holds "
        f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}: {shown}. A build replaces its whole output "
        f"folder: choose another output folder, or remove this one yourself"
    )


def _file_says(path: Path, phrase: str, limit: int = 64 * 1024) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return phrase in f.read(limit)
    except OSError:
        return False
