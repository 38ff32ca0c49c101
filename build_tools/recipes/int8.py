"""int8: static QDQ quantization (:func:`tcsched.build_tools.quantize.quantize_int8`), calibration method chosen
by measurement, then an optional quantization-aware fine-tune of the weights (:mod:`qdq_finetune`).

Each calibration method of ``cfg.calib_methods`` is tried; the lowest KL vs fp32 on the selection views wins
(higher agreement on a tie). The fine-tune is kept only if it lowers that KL.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import onnx

from tcsched.build_tools.quantize import int8_weight_bits, parse_calib_method, quantize_int8
from tcsched.build_tools.recipes.base import BuildContext, BuiltVariant, Recipe
from tcsched.build_tools.scoring import Score


def _quiet():
    """ONNX Runtime's calibrators print to stdout: keep the progress display clean."""
    return contextlib.redirect_stdout(io.StringIO())


@dataclass(frozen=True)
class Calibrated:
    """The int8 graph of the winning calibration method, its score on the selection views, and the note."""

    path: Path
    method: str
    score: Score
    note: str


def _choose_calibration(ctx: BuildContext) -> Calibrated:
    """Quantize with every method of ``cfg.calib_methods`` and keep the best (see the module docstring)."""
    scores: dict[str, Score] = {}
    paths: dict[str, Path] = {}
    for spec in ctx.cfg.calib_methods:
        method, pct = parse_calib_method(spec)
        paths[spec] = ctx.work / f"int8_{spec.replace(':', '_')}.onnx"
        with _quiet():
            quantize_int8(ctx.fp32_path, paths[spec], ctx.calib, method=method, percentile=pct)
        scores[spec] = ctx.evaluate(paths[spec])
    best = min(scores, key=lambda m: (scores[m].kl, -scores[m].agreement))
    tried = "; ".join(f"{m}: agreement {s.agreement:.3f}, KL {s.kl:.4f}" for m, s in scores.items())
    bits = int8_weight_bits(onnx.load(str(paths[best]), load_external_data=False))
    weights = (
        "7-bit weights (reduce_range: this x86 CPU has no VNNI, and 8-bit weights saturate its u8s8 GEMM "
        "kernels; depthwise Conv weights 8-bit, their kernels accumulate in int32)"
        if bits == 7
        else "8-bit weights"
    )
    note = (
        f"onnxruntime quantize_static QDQ, per-channel int8 {weights}, uint8 activations, every supported op "
        f"(Clip folded into the ranges), logits left float; calibration on {len(ctx.calib)} images; "
        f"method chosen on the selection split by KL vs fp32: {best} ({tried})"
    )
    return Calibrated(paths[best], best, scores[best], note)


def _fine_tune(ctx: BuildContext, ptq: Calibrated) -> tuple[Path, str]:
    """Fine-tune the int8 graph's weights by distillation from fp32 on the calibration images; keep the result
    only if its KL vs fp32 on the selection views is lower. Returns (the graph kept, the note)."""
    from tcsched.build_tools.qdq_finetune import distill_qdq

    steps = ctx.cfg.qat_steps
    task = ctx.progress.add_task(f"int8: quantization-aware fine-tune ({steps} steps)", total=steps)
    tuned = distill_qdq(
        onnx.load(str(ptq.path)),
        ctx.calib,
        ctx.fp32_session,
        steps=steps,
        threads=ctx.cfg.threads,
        on_step=lambda i, loss: ctx.progress.update(task, completed=i + 1),
    )
    path = ctx.work / "int8_qat.onnx"
    onnx.save(tuned, str(path))
    s = ctx.evaluate(path)
    kept = s.kl < ptq.score.kl
    note = (
        f"quantization-aware fine-tune of the int8 weights and biases (build_tools/qdq_finetune.py: the QDQ graph "
        f"in torch with fake quantization, distilled from fp32 on augmented calibration images, {steps} "
        f"steps; scales, zero points and nodes unchanged): selection split KL {ptq.score.kl:.4f} -> {s.kl:.4f}, "
        f"agreement {ptq.score.agreement:.3f} -> {s.agreement:.3f}: {'kept' if kept else 'not kept (no gain)'}"
    )
    return (path if kept else ptq.path), note


class Int8(Recipe):
    name = "int8"
    precision = "int8"
    step = "int8: calibration method chosen by measurement"

    def build(self, ctx: BuildContext) -> BuiltVariant:
        calibrated = _choose_calibration(ctx)
        path, notes = calibrated.path, [calibrated.note]
        cfg = ctx.cfg
        if cfg.qat_steps and len(ctx.calib) >= cfg.qat_min_images:
            path, qat_note = _fine_tune(ctx, calibrated)
            notes.append(qat_note)
        elif cfg.qat_steps:
            notes.append(
                f"no quantization-aware fine-tune: {len(ctx.calib)} calibration images, fewer than "
                f"{cfg.qat_min_images} (with so few it learns them by heart)"
            )
        return self.built(path, ctx.plan("int8"), notes)
