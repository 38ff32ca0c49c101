import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from tcsched.build_tools import repository as r
from tcsched.fsutil import atomic_directory, clean_stale_temporaries
from tests.helpers import tiny_classifier


@pytest.fixture
def tiny_onnx(tmp_path_factory):
    return tiny_classifier(tmp_path_factory.mktemp("onnx") / "tiny.onnx", classes=10)


def test_configs_roundtrip_through_model_config_proto(tmp_path):
    opts = r.ServingOptions(max_batch_size=16)
    r.write_pipeline(tmp_path, [f"class {i}" for i in range(1000)], opts)
    for name in (r.PREPROCESS, r.SCHEDULER, r.ENSEMBLE):
        cfg = r.parse((tmp_path / name / "config.pbtxt").read_text())
        assert cfg.name == name and cfg.max_batch_size == 16
    ens = r.parse((tmp_path / "classifier" / "config.pbtxt").read_text())
    assert ens.platform == "ensemble"
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["preprocess", "scheduler"]
    assert ens.output[0].label_filename == "labels.txt"
    assert len((tmp_path / "classifier" / "labels.txt").read_text().splitlines()) == 1000
    assert "import triton_python_backend_utils" in (tmp_path / "scheduler" / "1" / "model.py").read_text()


def test_variant_config_python_and_onnxruntime_backends():
    py = r.variant_config("v", r.ServingOptions(), "input", "logits", [3, 224, 224], 1000)
    assert py.backend == "python" and py.parameters["onnx_file"].string_value == "model.onnx"
    assert py.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    # batch 1 only: valid under any max_batch_size a tool derives from this config (the model warms up at its
    # own max_batch_size in initialize)
    assert [(w.batch_size, w.inputs["input"].zero_data) for w in py.model_warmup] == [(1, True)]
    ort = r.variant_config(
        "v", r.ServingOptions(variant_backend="onnxruntime"), "input", "logits", [3, 224, 224], 1000
    )
    assert ort.backend == "onnxruntime" and ort.default_model_filename == "model.onnx"
    assert ort.HasField("dynamic_batching")
    assert (
        ort.dynamic_batching.max_queue_delay_microseconds == r.ServingOptions().max_queue_delay_microseconds
    )
    text = r.render(ort)
    assert text_format.Parse(text, mc.ModelConfig()) == ort


def test_pipeline_config_is_the_ensemble_without_the_scheduler():
    cfg = r.pipeline_config("v8", r.ServingOptions(max_batch_size=4), 1000, "input", "logits")
    assert cfg.name == r.pipeline_name("v8") == "pipeline_v8" and cfg.platform == "ensemble"
    assert cfg.max_batch_size == 4 and [i.name for i in cfg.input] == ["IMAGE"]
    pre, var = cfg.ensemble_scheduling.step
    assert (pre.model_name, dict(pre.input_map), dict(pre.output_map)) == (
        r.PREPROCESS,
        {"IMAGE": "IMAGE"},
        {"INPUT": "preprocessed"},
    )
    assert (var.model_name, dict(var.input_map), dict(var.output_map)) == (
        "v8",
        {"input": "preprocessed"},
        {"logits": "LOGITS"},
    )
    assert r.parse(r.render(cfg)) == cfg


def test_every_classifier_model_has_its_labels(tmp_path, tiny_onnx):
    opts = r.ServingOptions()
    labels = [f"class {i}" for i in range(10)]
    for v in ("m_fp32", "m_int8"):
        r.write_variant(tmp_path, v, tiny_onnx, opts, classes=10)
    r.write_pipeline(tmp_path, labels, opts)
    for model in ("m_fp32", "m_int8", r.SCHEDULER, r.ENSEMBLE):
        cfg = r.parse((tmp_path / model / "config.pbtxt").read_text())
        (logits,) = [o for o in cfg.output if list(o.dims) == [10]]
        assert logits.label_filename == r.LABELS_FILE, model
        assert (tmp_path / model / r.LABELS_FILE).read_text().splitlines() == labels, model
    assert not r.parse((tmp_path / r.PREPROCESS / "config.pbtxt").read_text()).output[0].label_filename
    with pytest.raises(ValueError, match="not 3 classes"):
        r.write_labels(tmp_path, labels[:3])


def test_a_smaller_max_batch_size_keeps_a_loadable_warmup():
    """Model Analyzer derives configs with max_batch_size 1, 2, 4, ... from the served one."""
    cfg = r.variant_config("v", r.ServingOptions(max_batch_size=8), "input", "logits", [3, 224, 224], 1000)
    cfg.max_batch_size = 1
    assert all(w.batch_size <= cfg.max_batch_size for w in cfg.model_warmup)
    with pytest.raises(ValueError, match="exceed max_batch_size"):
        r._warmup(cfg, "input", [3, 224, 224], [2])


def test_labels_must_be_single_lines(tmp_path):
    with pytest.raises(ValueError, match="single-line"):
        r.write_pipeline(tmp_path, ["a", "b\nc"], r.ServingOptions())


def test_atomic_directory_replaces_on_success_and_keeps_old_on_failure(tmp_path):
    target = tmp_path / "repo"
    with atomic_directory(target) as d:
        (d / "v1").write_text("one")
    assert (target / "v1").read_text() == "one"
    with pytest.raises(RuntimeError), atomic_directory(target) as d:
        (d / "v2").write_text("two")
        raise RuntimeError("build failed half way")
    assert sorted(p.name for p in target.iterdir()) == ["v1"]
    with pytest.raises(KeyboardInterrupt), atomic_directory(target) as d:
        raise KeyboardInterrupt
    assert (target / "v1").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no temporaries left
    with atomic_directory(target) as d:
        (d / "v3").write_text("three")
    assert sorted(p.name for p in target.iterdir()) == ["v3"]


def test_stale_temporaries_of_a_killed_build_are_cleaned(tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / ".repo.tmp-abc").mkdir()
    (tmp_path / ".repo.old-def").mkdir()
    clean_stale_temporaries(tmp_path / "repo")
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]
