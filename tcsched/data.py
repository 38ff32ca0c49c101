"""Image sets: labeled folders (``labels.csv`` or ImageFolder layout), plain folders, and default photos.

Default photos are the natural photographs that scikit-image ships inside its wheel (``skimage/data``), so a
fresh machine without any dataset still has real images to calibrate on and classify.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}

# Natural photographs shipped in scikit-image's wheel (no download). Expected ImageNet classes in comments.
DEFAULT_PHOTOS = (
    "chelsea.png",  # tabby / tiger cat / Egyptian cat
    "coffee.png",  # cup / espresso
    "astronaut.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "camera.png",  # grayscale
    "coins.png",  # grayscale
    "brick.png",
    "grass.png",
    "gravel.png",
    "clock_motion.png",
)
# Not used: hubble_deep_field, moon, retina (mostly black), cell, ihc (microscopy): not the natural photos an
# ImageNet classifier sees, they would widen the calibration ranges and the drift check's idea of "normal".


@dataclass(frozen=True)
class ImageItem:
    """One image file; ``label`` is the ImageNet-1k class index or ``None`` when unlabeled."""

    path: Path
    label: int | None = None

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()


def _skimage_data_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "scikit-image is not installed: `pip install scikit-image` for the default photos"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def default_photos() -> list[ImageItem]:
    """The default photos from scikit-image's wheel, unlabeled (their files, read without importing skimage)."""
    d = _skimage_data_dir()
    items = [ImageItem(d / n) for n in DEFAULT_PHOTOS if (d / n).is_file()]
    if not items:
        raise FileNotFoundError(f"no default photos found in {d}")
    return items


def default_photo(name: str) -> Path:
    """Path of one default photo by stem, e.g. ``default_photo('chelsea')``."""
    for n in DEFAULT_PHOTOS:
        if Path(n).stem == name:
            return _skimage_data_dir() / n
    raise KeyError(f"unknown default photo {name!r}; known: {[Path(n).stem for n in DEFAULT_PHOTOS]}")


def list_images(folder: str | Path) -> list[ImageItem]:
    """Images of a folder, labeled when it can tell.

    Layouts, in this order:
      1. ``labels.csv`` with columns ``file`` and ``class_index`` (as ``../shared/data/imagenet-sample``);
      2. ImageFolder: one subfolder per class; subfolder names sorted give the class index (as torchvision's
         ``ImageFolder``; for ImageNet synset folders that is the standard index);
      3. a flat folder of images: unlabeled.

    Raises:
        FileNotFoundError: the folder does not exist or holds no image.
        ValueError: ``labels.csv`` lacks a needed column or names a missing file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    csv_path = folder / "labels.csv"
    items: list[ImageItem] = []
    if csv_path.is_file():
        with csv_path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = {"file", "class_index"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{csv_path} lacks column(s) {sorted(missing)}; expected file,class_index")
            for row in reader:
                p = folder / row["file"]
                if not p.is_file():
                    raise ValueError(f"{csv_path} names {row['file']!r}, which is not in {folder}")
                items.append(ImageItem(p, int(row["class_index"])))
    else:
        subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
        if subdirs:
            for idx, d in enumerate(subdirs):
                items += [
                    ImageItem(p, idx) for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES
                ]
        else:
            items = [ImageItem(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise FileNotFoundError(f"no images in {folder} (suffixes {sorted(IMAGE_SUFFIXES)})")
    return items


# calibration / selection / evaluation shares of a labeled --data-dir (tcsched build; tcsched eval --evaluation-split)
SPLIT_FRACTIONS = (0.25, 0.25, 0.5)


def split(
    items: Sequence[ImageItem], fractions: Iterable[float], salt: str = "tcsched"
) -> list[list[ImageItem]]:
    """Deterministic split by a hash of each file name (stable across machines and runs).

    ``fractions`` must sum to 1; returns one list per fraction, each in the input order.

    Raises:
        ValueError: fractions do not sum to 1 or one is negative.
    """
    fr = list(fractions)
    if any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fr}")
    edges, acc = [], 0.0
    for f in fr:
        acc += f
        edges.append(acc)
    out: list[list[ImageItem]] = [[] for _ in fr]
    for it in items:
        h = int(hashlib.sha256(f"{salt}:{it.path.name}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        k = next((i for i, e in enumerate(edges) if h <= e), len(fr) - 1)
        out[k].append(it)
    return out
