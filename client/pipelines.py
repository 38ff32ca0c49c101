"""The pipeline models the bench serves beside a repository: ``pipeline_<variant>`` = the classifier ensemble
without the scheduler (IMAGE -> preprocess -> variant), to measure what the scheduler adds to the same request.

The one module of ``tcsched.client`` that imports ``tcsched.build_tools`` (an exception declared in the
import-linter contract of pyproject.toml): the configs must be written by the build's own ModelConfig writers
(``tcsched.build_tools.repository``), so that a pipeline is exactly the served ensemble minus the scheduler.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from tcsched.build_tools.repository import ServingOptions, pipeline_config, pipeline_name, render

__all__ = ["pipeline_name", "write_pipelines"]


def write_pipelines(folder: Path, manifest, variants: Sequence[str]) -> Path:
    """Write a model repository holding one plain ensemble preprocess -> variant per variant (configs only; the
    models they call live in the main repository). Returns ``folder``, replaced if it existed."""
    if folder.exists():
        shutil.rmtree(folder)
    opts = ServingOptions(max_batch_size=manifest.max_batch_size)
    classes = manifest.output.shape[-1]
    for v in variants:
        cfg = pipeline_config(v, opts, classes, manifest.input.name, manifest.output.name)
        (folder / cfg.name / "1").mkdir(parents=True)
        (folder / cfg.name / "config.pbtxt").write_text(render(cfg))
    return folder
