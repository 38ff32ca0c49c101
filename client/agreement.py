"""Served agreement with fp32, measured per response (``tcsched ramp``).

Before a load run every image is classified once by each variant forced (:func:`probe_images`); then each
profiled response's ``VARIANT`` and ``DECISION`` say whether its top-1 is fp32's: a cascade's DECISION carries the
first stage's confidence margin, which identifies the image (distinct floats for distinct images). A response
without a margin (a single-variant plan) counts with its variant's agreement over the probed images, which
perf_analyzer sends in turn. :func:`served_accuracy` is the estimate from the manifest's figures instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from tcsched.confidence import confidence_margin
from tcsched.manifest import Manifest
from tcsched.names import DECISION, IMAGE, LOGITS, VARIANT

MARGIN_MATCH = 2e-4  # a DECISION's margin (5 decimals) matches a probed image's within this


@dataclass
class Probe:
    """Every ramp image classified once by each variant: ``top1[variant][i]``, and the confidence margin of each
    cascade's first stage on image ``i`` (``margin[variant][i]``, for the variants that start a cascade)."""

    top1: dict[str, list[int]]
    margin: dict[str, list[float]]
    reference: str

    def agreement(self, variant: str) -> float:
        ref, got = self.top1[self.reference], self.top1[variant]
        return sum(a == b for a, b in zip(ref, got, strict=True)) / len(ref)

    def image_of(self, first_stage: str, margin: float) -> int | None:
        ms = self.margin.get(first_stage)
        if not ms:
            return None
        i = min(range(len(ms)), key=lambda k: abs(ms[k] - margin))
        return i if abs(ms[i] - margin) <= MARGIN_MATCH else None


def probe_images(grpc_url: str, images: Sequence[bytes], manifest: Manifest) -> Probe:
    """Classify each image with each variant forced (raw LOGITS over gRPC): top-1s and first-stage margins."""
    import numpy as np
    import tritonclient.grpc as tc

    firsts = {c.stages[0] for c in manifest.cascades}
    top1: dict[str, list[int]] = {}
    margin: dict[str, list[float]] = {}
    with tc.InferenceServerClient(grpc_url) as client:
        for v in manifest.variants:
            top1[v.name], ms = [], []
            for img in images:
                inp = tc.InferInput(IMAGE, [1, 1], "BYTES")
                inp.set_data_from_numpy(np.array([[img]], dtype=np.object_))
                r = client.infer(
                    manifest.ensemble,
                    [inp],
                    outputs=[tc.InferRequestedOutput(LOGITS)],
                    parameters={"variant": v.name},
                )
                logits = r.as_numpy(LOGITS).reshape(1, -1)
                top1[v.name].append(int(logits.argmax()))
                ms.append(float(confidence_margin(logits)[0]))
            if v.name in firsts:
                margin[v.name] = ms
    return Probe(top1, margin, manifest.reference_variant)


def measured_agreement(
    records: Sequence, probe: Probe, manifest: Manifest
) -> tuple[float | None, float | None, int]:
    """(served agreement with fp32, share escalated, rows not identified) over profiled requests' outputs."""
    by_first = {c.label: c.stages[0] for c in manifest.cascades}
    agree, escalated, cascaded, unknown = [], 0, 0, 0
    for r in records:
        v = r.outputs.get(VARIANT)
        if v is None:
            continue
        d = json.loads(r.outputs[DECISION]) if DECISION in r.outputs else {}
        i = None
        if d.get("cascade") and d.get("confidence_margin") is not None:
            cascaded += 1
            escalated += bool(d.get("escalated"))
            i = probe.image_of(by_first.get(d["cascade"], ""), d["confidence_margin"])
            unknown += i is None
        if v not in probe.top1:
            continue
        agree.append(
            probe.agreement(v) if i is None else float(probe.top1[v][i] == probe.top1[probe.reference][i])
        )
    return (
        sum(agree) / len(agree) if agree else None,
        escalated / cascaded if cascaded else None,
        unknown,
    )


def served_accuracy(manifest: Manifest, counts: dict[str, int]) -> tuple[float | None, float | None]:
    """(agreement with fp32, top-1) of the variants that served, weighted by their request counts."""
    n = sum(counts.values())
    if n == 0:
        return None, None
    agree = sum(manifest.variant(v).accuracy.agreement_with_fp32 * c for v, c in counts.items()) / n
    tops = [manifest.variant(v).accuracy.top1 for v in counts]
    top1 = (
        None
        if any(t is None for t in tops)
        else sum(manifest.variant(v).accuracy.top1 * c for v, c in counts.items()) / n
    )
    return agree, top1
