#!/usr/bin/env python3
"""Run import-linter (``lint-imports``) on the tcsched package as it is installed.

The subpackages ``tcsched.build_tools``, ``tcsched.client`` and ``tcsched.scheduler`` live in their own folders
of the repository, mapped by ``[tool.setuptools.package-dir]`` in pyproject.toml. import-linter (grimp) finds
the modules of a package by walking the folder of its ``__init__.py``, so it would not see them under
``tcsched/``. This script copies every ``.py`` file into a temporary folder laid out as the installed package
(the mapping read from pyproject.toml) and runs ``lint-imports`` there with this repository's pyproject.toml:
the contracts in ``[tool.importlinter]`` are checked against the real import graph.

Exit status: that of ``lint-imports`` (0 when every contract is kept).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip's vendored copy of the same parser (tomli)
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def _copy_py(src: Path, dst: Path) -> None:
    """Every ``.py`` file under ``src`` (not under another mapped package, not in __pycache__) to ``dst``."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
    for p in sorted(dst.rglob("*"), reverse=True):
        if p.is_file() and p.suffix != ".py":
            p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()


def main() -> int:
    pyproject = ROOT / "pyproject.toml"
    mapping: dict[str, str] = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-dir"]
    lint_imports = Path(sys.executable).parent / "lint-imports"
    with tempfile.TemporaryDirectory(prefix="tcsched-lint-imports-") as tmp:
        # parents first, so that a subpackage's folder is laid over its parent's copy
        for package, folder in sorted(mapping.items(), key=lambda kv: kv[0].count(".")):
            _copy_py(ROOT / folder, Path(tmp, *package.split(".")))
        env = dict(os.environ, PYTHONPATH=tmp, PYTHONDONTWRITEBYTECODE="1")
        cmd = [str(lint_imports if lint_imports.exists() else "lint-imports"), "--no-cache", str(pyproject)]
        return subprocess.run(cmd, cwd=tmp, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
