"""The ramp's served agreement, measured per response: DECISION outputs in a profile export, and the image a
cascade row came from identified by its confidence margin."""

import json

import pytest

from tcsched.client.agreement import Probe, measured_agreement
from tcsched.client.perf_analyzer import parse_profile_export
from tcsched.client.perf_analyzer.parsers import RequestRecord
from tests.helpers import make_manifest


def _escaped(d: dict) -> bytes:
    """A DECISION as perf_analyzer writes a BYTES output: a JSON string inside the JSON export."""
    return json.dumps(json.dumps(d)).encode()


def test_profile_export_keeps_json_escaped_decisions():
    d = {"variant": "m_int8", "cascade": "int8>fp32", "escalated": False, "confidence_margin": 0.61852}
    export = (
        b'{"experiments":[{"experiment":{"mode":"concurrency","value":1},"requests":[{"timestamp":10,'
        b'"request_inputs":{"IMAGE":"\\u0000"},"response_timestamps":[20],"response_outputs":[{"VARIANT":"m_int8",'
        b'"DECISION":'
        + _escaped(d)
        + b',"LOGITS":[1.0,2.0]}]}],"window_boundaries":[0,30]}],"version":"2.51.0"}'
    )
    import io

    (exp,) = parse_profile_export(io.BytesIO(export), string_outputs=("VARIANT", "DECISION"))
    (r,) = exp.requests
    assert r.outputs["VARIANT"] == "m_int8" and json.loads(r.outputs["DECISION"]) == d


@pytest.fixture
def probe_and_manifest():
    m = make_manifest({"m_fp32": ("fp32", 0.0, {1: 5.0}), "m_int8": ("int8", 2.5, {1: 3.0})})
    from tcsched.manifest import CascadeProfile

    m.cascades = [
        CascadeProfile(stages=["m_int8", "m_fp32"], label="int8>fp32", calibration="t", operating_points=[])
    ]
    # 3 images: int8 agrees with fp32 on image 0 and 2, not on image 1 (a low-margin one)
    probe = Probe(
        top1={"m_fp32": [1, 2, 3], "m_int8": [1, 9, 3]},
        margin={"m_int8": [0.9, 0.05, 0.5]},
        reference="m_fp32",
    )
    return probe, m


def _rec(variant, **decision):
    return RequestRecord(0, 1, {"VARIANT": variant, "DECISION": json.dumps(decision)})


def test_cascade_rows_are_judged_on_their_own_image(probe_and_manifest):
    probe, m = probe_and_manifest
    casc = {"cascade": "int8>fp32"}
    records = [
        _rec("m_int8", **casc, escalated=False, confidence_margin=0.90001),  # image 0: agrees
        _rec("m_fp32", **casc, escalated=True, confidence_margin=0.05),  # image 1, escalated: agrees
        _rec("m_int8", **casc, escalated=False, confidence_margin=0.05),  # image 1 not escalated: disagrees
        _rec("m_int8", **casc, escalated=False, confidence_margin=0.7),  # matches no image: int8's mean (2/3)
    ]
    agree, escalated, unknown = measured_agreement(records, probe, m)
    assert agree == pytest.approx((1 + 1 + 0 + 2 / 3) / 4)
    assert escalated == pytest.approx(1 / 4) and unknown == 1


def test_single_variant_rows_count_with_their_variants_agreement(probe_and_manifest):
    probe, m = probe_and_manifest
    agree, escalated, unknown = measured_agreement([_rec("m_int8"), _rec("m_fp32")], probe, m)
    assert agree == pytest.approx((2 / 3 + 1) / 2) and escalated is None and unknown == 0
