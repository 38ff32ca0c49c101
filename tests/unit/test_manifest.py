import json

import pytest
from pydantic import ValidationError

from tcsched.manifest import Manifest
from tests.helpers import make_manifest


def test_roundtrip(tmp_path):
    m = make_manifest(
        {"m_fp32": ("fp32", 0.0, {1: 5.0, 8: 30.0}), "m_int8": ("int8", 1.5, {1: 3.0, 8: 12.0})}
    )
    m.write(tmp_path / "manifest.json")
    back = Manifest.read(tmp_path / "manifest.json")
    assert back == m
    assert back.variant("int8").name == "m_int8"
    assert back.variants[1].latency.p50_ms_by_batch[8] == 12.0  # int keys survive JSON


def test_unknown_variant_lists_known():
    m = make_manifest({"m_fp32": ("fp32", 0.0, {1: 5.0})})
    with pytest.raises(KeyError, match="known: m_fp32"):
        m.variant("bogus")


def test_variant_by_name_precision_or_unique_suffix():
    m = make_manifest(
        {
            "m_fp32": ("fp32", 0.0, {1: 5.0}),
            "m_int8": ("int8", 1.0, {1: 3.0}),
            "m_int8_openvino": ("int8", 1.0, {1: 2.0}),
            "m_int8_mixed_openvino": ("int8_mixed", 1.0, {1: 2.0}),
        }
    )
    assert m.variant("m_int8_openvino").name == "m_int8_openvino"
    assert m.variant("int8").name == "m_int8"  # the precision: the first variant of it
    assert m.variant("int8_openvino").name == "m_int8_openvino"  # the name without the model's prefix
    assert m.variant("mixed_openvino").name == "m_int8_mixed_openvino"
    with pytest.raises(KeyError, match="ambiguous variant 'openvino'; known: m_fp32, m_int8"):
        m.variant("openvino")
    with pytest.raises(KeyError, match="unknown variant 'int4'"):
        m.variant("int4")


def test_schema_version_mismatch_is_refused(tmp_path):
    m = make_manifest({"m_fp32": ("fp32", 0.0, {1: 5.0})})
    raw = json.loads(m.model_dump_json())
    raw["schema_version"] = "2.0"
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="rebuild"):
        Manifest.read(tmp_path / "manifest.json")
    with pytest.raises(FileNotFoundError, match="tcsched build"):
        Manifest.read(tmp_path / "missing.json")


def test_validation_rejects_absolute_paths_and_duplicates():
    m = make_manifest({"m_fp32": ("fp32", 0.0, {1: 5.0})})
    raw = json.loads(m.model_dump_json())
    raw["variants"][0]["file"] = "/etc/passwd"
    with pytest.raises(ValidationError, match="relative"):
        Manifest.model_validate(raw)
    raw["variants"][0]["file"] = "a.onnx"
    raw["variants"].append(dict(raw["variants"][0]))
    with pytest.raises(ValidationError, match="unique"):
        Manifest.model_validate(raw)
    raw["variants"][0]["precision"] = "int3"
    with pytest.raises(ValidationError):
        Manifest.model_validate(raw)
