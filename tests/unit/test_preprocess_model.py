"""The ``preprocess`` model's config: the spec written by build_tools.repository and read back as its
``initialize`` reads it (tcsched.imaging.spec_of_model_config on the config as JSON)."""

import json
import os

import pytest
from google.protobuf import json_format

from tcsched.build_tools import repository as r
from tcsched.imaging import method_of_model_config, spec_of_model_config
from tcsched.preprocessing import IMAGENET, METHOD_KEY, PARAMETER_KEY, PreprocessError, PreprocessSpec


def _as_triton_passes_it(cfg) -> dict:
    """The config as the JSON that Triton hands to a Python model's ``initialize`` (``args["model_config"]``):
    protobuf's JSON form with the proto field names (int64 dims come as strings)."""
    return json.loads(json.dumps(json_format.MessageToDict(cfg, preserving_proto_field_name=True)))


SPEC = PreprocessSpec(
    resize_size=292, crop_size=(260, 240), interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3
)


def test_written_spec_reads_back_from_the_config(tmp_path):
    r.write_pipeline(
        tmp_path, [f"class {i}" for i in range(10)], r.ServingOptions(), chw=(3, 260, 240), spec=SPEC
    )
    cfg = r.parse((tmp_path / r.PREPROCESS / "config.pbtxt").read_text())
    assert list(cfg.output[0].dims) == [3, 260, 240]
    assert PreprocessSpec.from_json(cfg.parameters[PARAMETER_KEY].string_value) == SPEC
    assert spec_of_model_config(_as_triton_passes_it(cfg)) == SPEC


def test_default_pipeline_writes_the_imagenet_spec(tmp_path):
    r.write_pipeline(tmp_path, ["a", "b"], r.ServingOptions())
    cfg = r.parse((tmp_path / r.PREPROCESS / "config.pbtxt").read_text())
    assert spec_of_model_config(_as_triton_passes_it(cfg)) == IMAGENET
    assert list(cfg.output[0].dims) == [3, 224, 224]


def test_config_without_the_parameter_is_the_default():
    cfg = r.preprocess_config(r.ServingOptions(), [3, 224, 224])
    del cfg.parameters[PARAMETER_KEY]
    assert spec_of_model_config(_as_triton_passes_it(cfg)) == IMAGENET


def test_writer_refuses_dims_that_differ_from_the_spec():
    with pytest.raises(PreprocessError, match="differs from the model's input height and width"):
        r.preprocess_config(r.ServingOptions(), [3, 224, 224], SPEC)


@pytest.mark.parametrize(
    "value,needle",
    [
        ("{not json", "preprocessing spec"),
        ('{"resize_size": 200, "crop_size": 224}', "larger than resize_size"),
        ('{"interpolation": "bogus"}', "interpolation"),
        ('{"mean": [0.5], "std": [0.5]}', "expected 3 values"),
        ('{"colour": 1}', "colour"),
    ],
)
def test_a_bad_spec_fails_the_load_with_its_reason(value, needle):
    cfg = _as_triton_passes_it(r.preprocess_config(r.ServingOptions(), [3, 224, 224]))
    cfg["parameters"][PARAMETER_KEY] = {"string_value": value}
    if "mean" in value:  # the one-channel spec would fit a [1, 224, 224] output: the refusal is the RGB rule
        cfg["output"][0]["dims"] = ["1", "224", "224"]
    with pytest.raises(PreprocessError, match=needle) as e:
        spec_of_model_config(cfg)
    assert str(e.value).startswith("preprocess model config:")


def test_output_dims_that_differ_from_the_spec_fail_the_load():
    cfg = _as_triton_passes_it(r.preprocess_config(r.ServingOptions(), [3, 224, 224]))
    cfg["output"][0]["dims"] = ["3", "256", "256"]
    with pytest.raises(PreprocessError, match=r"crop_size \[224, 224\] differs"):
        spec_of_model_config(cfg)


def test_the_method_is_written_and_read_back():
    for method in ("exact", "fast"):
        cfg = r.preprocess_config(r.ServingOptions(preprocess_method=method), [3, 224, 224])
        assert cfg.parameters[METHOD_KEY].string_value == method
        assert method_of_model_config(_as_triton_passes_it(cfg)) == method
    cfg = _as_triton_passes_it(r.preprocess_config(r.ServingOptions(), [3, 224, 224]))
    del cfg["parameters"][METHOD_KEY]
    assert method_of_model_config(cfg) == "exact"  # a config written before the parameter: as it served
    cfg["parameters"][METHOD_KEY] = {"string_value": "turbo"}
    with pytest.raises(
        PreprocessError, match="preprocess_method: preprocessing method 'turbo': expected one of"
    ):
        method_of_model_config(cfg)


def test_preprocess_instances_follow_the_cores():
    assert [r.default_preprocess_instances(n) for n in (1, 2, 3, 4, 16, 64)] == [1, 2, 3, 4, 4, 4]
    expected = min(r.MAX_PREPROCESS_INSTANCES, len(os.sched_getaffinity(0)))
    assert r.ServingOptions().preprocess_instances == expected
    cfg = r.preprocess_config(r.ServingOptions(), [3, 224, 224])
    assert cfg.instance_group[0].count == expected
