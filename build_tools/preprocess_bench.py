"""The served preprocessing's ``fast`` method against ``exact`` (tcsched.imaging): time and top-1 agreement.

``python -m tcsched.build_tools.preprocess_bench --model R/mobilenet_v2_fp32/1/model.onnx [--data-dir D]``
writes ``preprocess_fast.json`` and ``preprocess_fast.md`` into ``--out`` (default ``reports/preprocess``):

- **time**: in-process ms per image (``preprocess_bytes``, one thread, the two methods interleaved image by
  image, median of ``--runs`` rounds) of 12-Mpixel JPEGs (4000x3000) made from real photos of the data folder
  (bicubic upscale, PIL quality 90 and 95: an upscaled photo has less fine detail than a camera original, so its
  file is smaller and its entropy decoding, the part the DCT-domain downscale cannot skip, cheaper) and of the
  data folder's own JPEGs;
- **agreement**: top-1 of the fp32 classifier (ONNX Runtime) on the ``fast`` pixels vs on the ``exact`` pixels,
  over every image of the folder, with its Wilson 95% interval, and the same on copies upscaled ``--upscale``
  times (bicubic, JPEG quality 90; less where that would pass ``MAX_SOURCE_PIXELS``), where the DCT-domain
  downscale applies (most ImageNet JPEGs are ~500x375, under 2x the resize of 256 on the shorter side); the
  pixel difference in 8-bit steps; top-1 vs the labels; the disagreeing images with exact's softmax margin; and
  a yardstick: ``exact`` vs ``exact`` of the same picture re-encoded at JPEG quality 95 (how many labels an
  imperceptible change of the input flips).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from tcsched.data import ImageItem, list_images
from tcsched.imaging import MAX_SOURCE_PIXELS, decode_image, draft_scale, preprocess_bytes
from tcsched.jsonio import atomic_write_json, atomic_write_text
from tcsched.metrics import softmax, wilson_interval
from tcsched.pixels import PixelDtype
from tcsched.preprocessing import IMAGENET, METHODS, PreprocessSpec

#: a 12-Mpixel phone photo, 4:3
LARGE_SIZE = (4000, 3000)
LARGE_QUALITIES = (90, 95)
#: the yardstick's re-encode: the same picture at this JPEG quality (the test copies are at 90)
REFERENCE_QUALITY = 95


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def upscaled_jpeg(
    data: bytes, size: tuple[int, int] | None = None, factor: int | None = None, quality: int = 90
):
    """The JPEG of ``data`` decoded, resized (bicubic) to ``size`` or ``factor`` x its size, re-encoded."""
    img = decode_image(data)
    if size is None:  # at most MAX_SOURCE_PIXELS (a few imagenet-sample photos are ~1800x1400)
        f = min(float(factor), (MAX_SOURCE_PIXELS / (img.width * img.height)) ** 0.5)
        size = (int(img.width * f), int(img.height * f))
    return jpeg_bytes(img.resize(size, Image.Resampling.BICUBIC), quality)


def time_methods(
    blobs: Sequence[bytes], spec: PreprocessSpec, runs: int, dtype: PixelDtype = "float32"
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per method, per blob: the median wall-clock ms and the median CPU ms of this thread
    (``time.thread_time``: what other jobs on a shared machine take from it does not count) of ``runs`` calls of
    ``preprocess_bytes`` making ``dtype`` pixels (the served model's); methods and blobs interleaved in every
    round, so that a slow stretch hits both."""
    wall = {m: [[] for _ in blobs] for m in METHODS}
    cpu = {m: [[] for _ in blobs] for m in METHODS}
    for _ in range(runs):
        for i, data in enumerate(blobs):
            for m in METHODS:
                t0, c0 = time.perf_counter(), time.thread_time()
                preprocess_bytes(data, spec=spec, method=m, dtype=dtype)
                wall[m][i].append((time.perf_counter() - t0) * 1e3)
                cpu[m][i].append((time.thread_time() - c0) * 1e3)
    med = lambda d: {m: [statistics.median(t) for t in per] for m, per in d.items()}  # noqa: E731
    return med(wall), med(cpu)


def _pixel_steps(a: np.ndarray, b: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """|a - b| in 8-bit steps, per element: of uint8 pixels as they are, of normalised float32 pixels x std x
    255."""
    if a.dtype == np.uint8:
        return np.abs(a.astype(np.int16) - b.astype(np.int16)).astype(np.float32)
    return np.abs(a - b) * (np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1) * 255.0)


def agreement(
    items: Sequence[ImageItem],
    classify: Callable[[np.ndarray], np.ndarray],
    spec: PreprocessSpec,
    make: Callable[[bytes], bytes] | None = None,
    reference: Callable[[bytes], bytes] | None = None,
    batch: int = 32,
    dtype: PixelDtype = "float32",
) -> dict:
    """Top-1 of ``classify`` on ``fast`` vs ``exact`` pixels (``dtype``: the input the classifier's graph takes)
    of every item's bytes (through ``make``).

    ``reference``: other bytes of the same picture (e.g. re-encoded at another JPEG quality), whose ``exact``
    top-1 is compared with the ``exact`` top-1 too: how many labels an imperceptible change of the input flips,
    a yardstick for fast's figure. The disagreeing images are listed with exact's softmax margin (top-1 minus
    top-2 probability): near ties flip under any perturbation.
    """
    names = ["exact", "fast", "reference"] if reference is not None else ["exact", "fast"]
    top1, logits = {k: [] for k in names}, []
    max_steps, mean_steps, drafted, ms = [], [], 0, {m: [] for m in METHODS}
    for start in range(0, len(items), batch):
        xs = {k: [] for k in names}
        for it in items[start : start + batch]:
            raw = it.read_bytes()
            data = make(raw) if make is not None else raw
            with Image.open(io.BytesIO(data)) as im:
                drafted += im.format == "JPEG" and draft_scale(*im.size, spec.resize_size) > 1
            for m in METHODS:
                t0 = time.perf_counter()
                xs[m].append(preprocess_bytes(data, spec=spec, method=m, dtype=dtype))
                ms[m].append((time.perf_counter() - t0) * 1e3)
            if reference is not None:
                xs["reference"].append(
                    preprocess_bytes(reference(raw), spec=spec, method="exact", dtype=dtype)
                )
            d = _pixel_steps(xs["exact"][-1], xs["fast"][-1], spec)
            max_steps.append(float(d.max()))
            mean_steps.append(float(d.mean()))
        for k in names:
            lg = classify(np.stack(xs[k]))
            top1[k].append(lg.argmax(1))
            if k == "exact":
                logits.append(lg)
    t = {k: np.concatenate(v) for k, v in top1.items()}
    p = np.sort(softmax(np.concatenate(logits)), axis=1)
    margin = p[:, -1] - p[:, -2]
    n = len(items)
    agree = int((t["exact"] == t["fast"]).sum())
    out = {
        "n": n,
        "drafted": int(drafted),
        "agreement": agree / n,
        "agreement_95": list(wilson_interval(agree, n)),
        "disagreeing": {
            items[i].path.name: round(float(margin[i]), 4) for i in np.flatnonzero(t["exact"] != t["fast"])
        },
        "pixel_steps_max": max(max_steps),
        "pixel_steps_mean": float(np.mean(mean_steps)),
        "median_ms": {m: statistics.median(v) for m, v in ms.items()},
    }
    if reference is not None:
        same = int((t["exact"] == t["reference"]).sum())
        out["reference_agreement"] = same / n
        out["reference_agreement_95"] = list(wilson_interval(same, n))
    labels = np.asarray([-1 if it.label is None else it.label for it in items])
    if (labels >= 0).all():
        for m in METHODS:
            c = int((t[m] == labels).sum())
            out[f"top1_{m}"] = c / n
            out[f"top1_{m}_95"] = list(wilson_interval(c, n))
    return out


def run(
    data_dir: Path,
    model: Path,
    out: Path,
    upscale: int = 4,
    runs: int = 21,
    limit: int | None = None,
    timing_only: bool = False,
) -> dict:
    """Measure and write ``preprocess_fast.{json,md}`` into ``out``; ``timing_only``: re-time only and keep the
    agreement figures of an earlier run's JSON there."""
    from tcsched.ort_runtime import OrtClassifier

    spec = IMAGENET
    items = list_images(data_dir)[:limit] if limit else list_images(data_dir)
    clf = OrtClassifier(model, threads=2)
    classify = lambda x: clf.predict(x, batch_size=16)  # noqa: E731
    # the pixels the served preprocess makes for this graph: uint8 where it normalises them itself (--pixels)
    pixels: PixelDtype = "uint8" if clf.input_dtype == np.uint8 else "float32"

    sources = items[:: max(1, len(items) // 5)][:5]
    large = {
        q: [upscaled_jpeg(it.read_bytes(), LARGE_SIZE, quality=q) for it in sources] for q in LARGE_QUALITIES
    }
    timing = {}
    for q, blobs in large.items():
        wall, cpu = time_methods(blobs, spec, runs, pixels)
        timing[f"12mpix_q{q}"] = {
            "images": [it.path.name for it in sources],
            "size": list(LARGE_SIZE),
            "bytes": [len(b) for b in blobs],
            "median_ms": {m: statistics.median(v) for m, v in wall.items()},
            "median_cpu_ms": {m: statistics.median(v) for m, v in cpu.items()},
            "per_image_ms": wall,
        }
    wall, cpu = time_methods([it.read_bytes() for it in items[:16]], spec, runs, pixels)
    timing["originals_16"] = {
        "median_ms": {m: statistics.median(v) for m, v in wall.items()},
        "median_cpu_ms": {m: statistics.median(v) for m, v in cpu.items()},
        "per_image_ms": wall,
    }

    result = {
        "spec": json.loads(spec.to_json()),
        "data_dir": str(data_dir),
        "model": str(model),
        "pixels": pixels,
        "runs": runs,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "load_average_1min": os.getloadavg()[0],
        },
        "timing": timing,
    }
    if timing_only:
        earlier = json.loads((out / "preprocess_fast.json").read_text())
        result.update({k: v for k, v in earlier.items() if k.startswith("agreement_")})
    else:
        result["agreement_originals"] = agreement(
            items,
            classify,
            spec,
            reference=lambda d: jpeg_bytes(decode_image(d), REFERENCE_QUALITY),
            dtype=pixels,
        )
        result[f"agreement_upscaled_x{upscale}"] = agreement(
            items,
            classify,
            spec,
            make=lambda d: upscaled_jpeg(d, factor=upscale),
            reference=lambda d: upscaled_jpeg(d, factor=upscale, quality=REFERENCE_QUALITY),
            dtype=pixels,
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "preprocess_fast.json", result)
    atomic_write_text(out / "preprocess_fast.md", markdown(result, upscale))
    return result


def markdown(r: dict, upscale: int) -> str:
    lines = [
        "# Served preprocessing: `fast` vs `exact`",
        "",
        f"`python -m tcsched.build_tools.preprocess_bench` on {r['data_dir']}, fp32 model {r['model']} "
        f"({r['pixels']} pixels); "
        f"{r['machine']['cores']} cores, load average {r['machine']['load_average_1min']:.1f} at the end.",
        "",
        "## Time per image (in-process `preprocess_bytes`, one thread, median over images of each image's median "
        f"of {r['runs']} interleaved runs)",
        "",
        "| images | bytes (median) | exact ms | fast ms | speed-up | exact / fast CPU ms of the thread |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, t in r["timing"].items():
        e, f = t["median_ms"]["exact"], t["median_ms"]["fast"]
        size = f"{int(statistics.median(t['bytes']))}" if "bytes" in t else "-"
        label = name.replace("12mpix_q", "12 Mpixel (4000x3000), JPEG quality ").replace(
            "originals_16", "16 imagenet-sample JPEGs"
        )
        c = t.get("median_cpu_ms")
        cpu = f"{c['exact']:.2f} / {c['fast']:.2f}" if c else "-"
        lines.append(f"| {label} | {size} | {e:.2f} | {f:.2f} | {e / f:.1f}x | {cpu} |")
    lines += [
        "",
        "## Top-1 agreement of the fp32 model, fast pixels vs exact pixels",
        "",
        "| images | n | DCT-downscaled | agreement [95%] | max / mean pixel diff (8-bit steps) | top-1 exact / fast "
        "(labels) | exact / fast ms | yardstick: exact vs exact of a quality-95 re-encode [95%] |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    keys = (("agreement_originals", "originals"), (f"agreement_upscaled_x{upscale}", f"upscaled x{upscale}"))
    for key, label in keys:
        a = r[key]
        lo, hi = a["agreement_95"]
        top1 = f"{100 * a['top1_exact']:.2f} / {100 * a['top1_fast']:.2f}" if "top1_exact" in a else "-"
        ref = "-"
        if "reference_agreement" in a:
            rlo, rhi = a["reference_agreement_95"]
            ref = f"{100 * a['reference_agreement']:.2f} [{100 * rlo:.1f}, {100 * rhi:.1f}]"
        lines.append(
            f"| {label} | {a['n']} | {a['drafted']} | {100 * a['agreement']:.2f} [{100 * lo:.1f}, {100 * hi:.1f}] | "
            f"{a['pixel_steps_max']:.1f} / {a['pixel_steps_mean']:.3f} | {top1} | "
            f"{a['median_ms']['exact']:.2f} / {a['median_ms']['fast']:.2f} | {ref} |"
        )
    lines += ["", "Disagreeing images (exact's softmax margin top-1 minus top-2):", ""]
    for key, label in keys:
        dis = r[key]["disagreeing"]
        lines.append(f"- {label}: " + (", ".join(f"{k} ({v:.3f})" for k, v in dis.items()) or "none"))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/imagenet-sample"
    )
    ap.add_argument(
        "--model", type=Path, required=True, help="the fp32 ONNX graph (model_repository/*_fp32/1/model.onnx)"
    )
    ap.add_argument("--out", type=Path, default=Path("reports/preprocess"))
    ap.add_argument("--upscale", type=int, default=4)
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--timing-only", action="store_true", help="re-time; keep the agreement of --out's JSON")
    a = ap.parse_args(argv)
    r = run(a.data_dir, a.model, a.out, a.upscale, a.runs, a.limit, a.timing_only)
    print(markdown(r, a.upscale))


if __name__ == "__main__":
    main()
