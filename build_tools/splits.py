"""The build's images: the data splits (calibration, selection, evaluation: the rule in
:mod:`tcsched.build_tools.build`), their preprocessing into float32 arrays with the served preprocess model's
method, and the per-channel and per-image statistics of the manifest's drift check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from rich.progress import Progress

from tcsched.build_tools.config import BuildConfig
from tcsched.data import SPLIT_FRACTIONS, ImageItem, default_photos, list_images, split
from tcsched.imaging import preprocess_bytes
from tcsched.manifest import InputStatistics
from tcsched.preprocessing import IMAGENET, PreprocessSpec


@dataclass
class Splits:
    """The build's images. ``unused``: the calibration images of ``--data-dir`` past ``calib_limit``, which
    only the all-images figures see (:attr:`others`)."""

    calib: list[ImageItem]
    select: list[ImageItem]
    eval: list[ImageItem]
    description: str
    unused: list[ImageItem] = field(default_factory=list)
    whole_folder: bool = False  # every image of --data-dir is in a split (no --eval-limit cut it)

    @property
    def labeled(self) -> bool:
        return all(it.label is not None for it in self.eval)

    @property
    def others(self) -> list[ImageItem]:
        """Every labeled image of ``--data-dir`` outside the evaluation split (calibration, its unused rest,
        selection), for the figures on all its images; empty without ``--data-dir``, when ``--eval-limit`` cut
        the evaluation split, or without labels."""
        rest = [*self.calib, *self.unused, *self.select]
        if not self.whole_folder or not self.labeled or any(it.label is None for it in rest):
            return []
        return rest


def make_splits(cfg: BuildConfig) -> Splits:
    if cfg.data_dir is not None:
        items = list_images(cfg.data_dir)
        calib, select, evaluation = split(items, list(SPLIT_FRACTIONS))
        desc = (
            f"{cfg.data_dir}: hash split of {len(items)} images: calibration {len(calib)}, selection "
            f"{len(select)}, evaluation {len(evaluation)}"
        )
        calib, unused = calib[: cfg.calib_limit], calib[cfg.calib_limit :]
    else:
        calib = (list_images(cfg.calib_dir) if cfg.calib_dir else default_photos())[: cfg.calib_limit]
        select = calib
        evaluation = list_images(cfg.eval_dir) if cfg.eval_dir else list(calib)
        src = cfg.calib_dir or "scikit-image photos"
        desc = f"calibration and selection: {len(calib)} images from {src}; evaluation: {cfg.eval_dir or src}"
        unused = []
    whole = cfg.data_dir is not None and not (cfg.eval_limit and cfg.eval_limit < len(evaluation))
    if cfg.eval_limit:
        evaluation = evaluation[: cfg.eval_limit]
    return Splits(calib, select, evaluation, desc, unused, whole_folder=whole)


def load_images(
    items: Sequence[ImageItem],
    progress: Progress,
    what: str,
    spec: PreprocessSpec = IMAGENET,
    method: str = "exact",
) -> np.ndarray:
    """float32 [N, C, crop_h, crop_w]: ``items`` preprocessed by ``spec`` with ``method`` (the served
    preprocess model's, so that calibration and the build's figures see the pixels the server makes)."""
    task = progress.add_task(f"preprocess {what}", total=len(items))
    out = np.empty((len(items), spec.channels, *spec.crop_size), dtype=np.float32)
    for i, it in enumerate(items):
        out[i] = preprocess_bytes(it.read_bytes(), spec=spec, method=method)
        progress.advance(task)
    return out


def input_statistics(x: np.ndarray, spec: PreprocessSpec = IMAGENET) -> InputStatistics:
    """Per-channel and per-image statistics of float32 [N, C, H, W] images preprocessed by ``spec`` (its
    mean/std locate the saturated pixel values)."""
    from tcsched.input_stats import saturated_fraction

    per_img_mean = x.mean(axis=(1, 2, 3))
    per_img_std = x.std(axis=(1, 2, 3))
    sat = np.array([saturated_fraction(img, spec.mean, spec.std) for img in x])
    return InputStatistics(
        image_mean_p01_p99=tuple(float(v) for v in np.percentile(per_img_mean, [1, 99])),
        image_std_p01_p99=tuple(float(v) for v in np.percentile(per_img_std, [1, 99])),
        saturated_fraction_p99=float(np.percentile(sat, 99)),
        n_images=len(x),
        channel_mean=[float(v) for v in x.mean(axis=(0, 2, 3))],
        channel_std=[float(v) for v in x.std(axis=(0, 2, 3))],
        image_mean_range=(float(per_img_mean.min()), float(per_img_mean.max())),
        image_std_range=(float(per_img_std.min()), float(per_img_std.max())),
    )
