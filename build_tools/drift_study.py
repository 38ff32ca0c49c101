"""Model analysis: does an input-statistics drift check mark the inputs where INT8 disagrees with fp32?

The rule studied (:func:`drift_check`) flags an image whose mean, standard deviation or share of saturated pixels
falls outside the calibration images' 1st-99th percentile range (widened by ``margin`` x its width). A scheduler
would route flagged inputs away from INT8. :func:`drift_study` applies common corruptions in the style of
ImageNet-C (Hendrycks & Dietterich, ICLR 2019: brightness, contrast, Gaussian noise, blur, JPEG, pixelation; here
written with PIL and numpy) to labeled-split images and measures, per corruption and pooled, the INT8 variant's
top-1 agreement with fp32 on flagged and unflagged images (Wilson 95% intervals).

The rule earns its place only if flagged images agree significantly less often than unflagged ones (the pooled
intervals do not overlap, flagged below). Measured on MobileNetV2 (README, "Input-aware scheduling") it did not:
the scheduler no longer has it, and the confidence cascade's margin marks the uncertain inputs instead.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from tcsched.confidence import confidence_margin
from tcsched.input_stats import saturated_fraction
from tcsched.manifest import InputStatistics
from tcsched.metrics import wilson_interval

DRIFT_MARGIN = 0.25  # widening of the calibration ranges, x their width, as the rule was deployed


@dataclass(frozen=True)
class DriftResult:
    """``out_of_distribution`` with the reason (which statistic, its value, the accepted range)."""

    out_of_distribution: bool
    reason: str = ""


def drift_check(x: np.ndarray, stats: InputStatistics | None, margin: float = DRIFT_MARGIN) -> DriftResult:
    """Is one preprocessed image (float32 [3, H, W], ImageNet-normalised) outside the calibration distribution?

    Three statistics, each against the calibration images' 1st-99th percentile range widened by ``margin`` times
    its width on both sides: the image's mean (very dark or bright), its standard deviation (flat images), and
    its fraction of saturated values (> the calibration's 99th percentile + 0.25, and at least 0.5). Manifests
    without percentiles fall back to the min-max ranges. Taken on every 4th pixel in each direction.
    """
    if stats is None:
        return DriftResult(False)
    x = x[:, ::4, ::4]
    checks = (
        ("mean", float(x.mean()), stats.image_mean_p01_p99 or stats.image_mean_range),
        ("std", float(x.std()), stats.image_std_p01_p99 or stats.image_std_range),
    )
    for what, value, (lo, hi) in checks:
        w = (hi - lo) * margin
        if not lo - w <= value <= hi + w:
            return DriftResult(
                True, f"image {what} {value:.2f} outside calibration range [{lo - w:.2f}, {hi + w:.2f}]"
            )
    if stats.saturated_fraction_p99 is not None:
        limit = max(0.5, stats.saturated_fraction_p99 + 0.25)
        sat = saturated_fraction(x)
        if sat > limit:
            return DriftResult(True, f"{sat:.0%} of the pixels saturated (calibration: <= {limit:.0%})")
    return DriftResult(False)


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _noise(img: Image.Image, sigma: float, seed: int = 0) -> Image.Image:
    a = np.asarray(img, np.float32)
    a = a + np.random.default_rng(seed).normal(0, sigma, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _pixelate(img: Image.Image, factor: int) -> Image.Image:
    w, h = img.size
    return img.resize((max(1, w // factor), max(1, h // factor)), Image.BOX).resize((w, h), Image.NEAREST)


CORRUPTIONS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "brightness x0.3": lambda im: ImageEnhance.Brightness(im).enhance(0.3),
    "brightness x1.8": lambda im: ImageEnhance.Brightness(im).enhance(1.8),
    "contrast x0.3": lambda im: ImageEnhance.Contrast(im).enhance(0.3),
    "gaussian noise sigma 40": lambda im: _noise(im, 40.0),
    "gaussian blur sigma 3": lambda im: im.filter(ImageFilter.GaussianBlur(3)),
    "jpeg quality 8": lambda im: _jpeg(im, 8),
    "pixelate x8": lambda im: _pixelate(im, 8),
}


@dataclass
class DriftRow:
    """One corruption (or 'pooled'): counts, INT8-vs-fp32 agreement on flagged / unflagged images with Wilson 95%
    intervals (``None`` when a group is empty), and the share of images below the cascade threshold."""

    corruption: str
    n_images: int
    flagged: int
    agreement_flagged: float | None
    agreement_flagged_ci95: tuple[float, float] | None
    agreement_unflagged: float | None
    agreement_unflagged_ci95: tuple[float, float] | None
    low_margin_share: float | None = None


def _row(name: str, flag: np.ndarray, agree: np.ndarray, low: np.ndarray | None) -> DriftRow:
    def part(mask):
        n = int(mask.sum())
        if n == 0:
            return None, None
        k = int(agree[mask].sum())
        return k / n, wilson_interval(k, n)

    af, cf = part(flag)
    au, cu = part(~flag)
    return DriftRow(
        name, len(flag), int(flag.sum()), af, cf, au, cu, None if low is None else float(low.mean())
    )


@dataclass
class DriftStudy:
    rows: list[DriftRow]
    rule_earns_place: bool
    verdict: str

    def as_dict(self) -> dict:
        return {
            "rows": [asdict(r) for r in self.rows],
            "rule_earns_place": self.rule_earns_place,
            "verdict": self.verdict,
        }

    def markdown(self) -> str:
        def pct(v, ci):
            return "-" if v is None else f"{100 * v:.1f}% [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"

        lines = [
            "| corruption | images | flagged | int8 agreement, flagged [95%] | unflagged [95%] | below cascade threshold |",
            "| --- | ---: | ---: | --- | --- | ---: |",
        ]
        for r in self.rows:
            low = "-" if r.low_margin_share is None else f"{100 * r.low_margin_share:.0f}%"
            lines.append(
                f"| {r.corruption} | {r.n_images} | {r.flagged} | "
                f"{pct(r.agreement_flagged, r.agreement_flagged_ci95)} | "
                f"{pct(r.agreement_unflagged, r.agreement_unflagged_ci95)} | {low} |"
            )
        return "\n".join(lines) + f"\n\n{self.verdict}\n"


def drift_study(
    images: Sequence[Image.Image],
    preprocess: Callable[[Image.Image], np.ndarray],
    fp32: Callable[[np.ndarray], np.ndarray],
    int8: Callable[[np.ndarray], np.ndarray],
    stats: InputStatistics | None,
    cascade_threshold: float | None = None,
    corruptions: dict[str, Callable[[Image.Image], Image.Image]] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> DriftStudy:
    """Measure the rule on ``images`` (RGB PIL) under every corruption, clean images included.

    Args:
        preprocess: PIL image -> float32 [3, H, W] (the served transform).
        fp32 / int8: float32 [N, 3, H, W] -> logits [N, classes].
        stats: the calibration statistics the rule compares with.
        cascade_threshold: the int8 stage's threshold of the default cascade: reports the share of images that
            the cascade would escalate (margin below it).
        on_step: called with the number of corruptions done (progress).
    """
    table = {"clean": lambda im: im, **(corruptions or CORRUPTIONS)}
    rows, flags, agrees = [], [], []
    for i, (name, corrupt) in enumerate(table.items()):
        x = np.stack([preprocess(corrupt(im)) for im in images])
        a, b = fp32(x), int8(x)
        agree = a.argmax(1) == b.argmax(1)
        flag = np.array([drift_check(r, stats).out_of_distribution for r in x])
        low = None if cascade_threshold is None else confidence_margin(b) < cascade_threshold
        rows.append(_row(name, flag, agree, low))
        flags.append(flag)
        agrees.append(agree)
        if on_step is not None:
            on_step(i + 1)
    pooled = _row("pooled", np.concatenate(flags), np.concatenate(agrees), None)
    rows.append(pooled)
    earns = (
        pooled.agreement_flagged_ci95 is not None
        and pooled.agreement_unflagged_ci95 is not None
        and pooled.agreement_flagged_ci95[1] < pooled.agreement_unflagged_ci95[0]
    )
    if pooled.flagged == 0:
        verdict = "The drift check flagged no image: it cannot mark where INT8 disagrees."
    else:
        verdict = (
            f"Pooled over {pooled.n_images} images: INT8 agrees with fp32 on "
            f"{100 * pooled.agreement_flagged:.1f}% of the {pooled.flagged} flagged images and on "
            f"{100 * pooled.agreement_unflagged:.1f}% of the unflagged ones: the drift check "
            + ("does mark where INT8 disagrees." if earns else "does not mark where INT8 disagrees.")
        )
    return DriftStudy(rows, earns, verdict)
