"""The served ensemble through the real tritonclient: right answers, per-request errors, concurrency."""

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tcsched.client.classify import ClassifierClient
from tcsched.data import default_photo, list_images
from tcsched.manifest import Manifest

pytestmark = pytest.mark.integration
CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian cat, Siamese cat, Egyptian cat


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_chelsea_is_a_cat_in_the_top5(server, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url
    with ClassifierClient(url, protocol) as c:
        r = c.classify(default_photo("chelsea").read_bytes(), top_k=5)
    assert {p.index for p in r.topk} & CAT_CLASSES
    assert r.topk[0].index in CAT_CLASSES
    assert r.variant.startswith("mobilenet_v2_")
    assert [p.score for p in r.topk] == sorted((p.score for p in r.topk), reverse=True)


def test_coffee_and_labeled_imagenet_photos(server, imagenet_sample):
    items = list_images(imagenet_sample)[:16]
    with ClassifierClient(server.http_url) as c:
        assert "espresso" in [p.label for p in c.classify(default_photo("coffee").read_bytes()).topk]
        results = c.classify_many([it.read_bytes() for it in items], top_k=5, parameters={"variant": "fp32"})
    hits = sum(it.label in [p.index for p in r.topk] for it, r in zip(items, results, strict=True))
    assert hits >= 13  # top-5 of MobileNetV2 on this sample is ~96%


def test_request_parameters_are_honoured(server, built_repo):
    m = Manifest.read(built_repo / "manifest.json")
    img = default_photo("chelsea").read_bytes()
    with ClassifierClient(server.http_url) as c:
        for v in m.variants:
            assert c.classify(img, parameters={"variant": v.name}).variant == v.name
            if v.runtime == "onnxruntime":  # a precision names its ONNX Runtime variant (pairs: by name)
                assert c.classify(img, parameters={"variant": v.precision}).variant == v.name
        for budget in (0.0, 100.0, "100"):
            r = c.classify(img, parameters={"accuracy_budget": budget})
            served = m.variant(r.variant)
            assert served.name == m.reference_variant or served.accuracy.top1_drop_points <= float(budget)
            assert (
                served.serve_on_cpu_for_speed
            )  # emulated precisions (fp16 on CPU) are never picked for speed
            assert r.decision["code"] == "min_latency" and r.decision["variant"] == r.variant
            assert "fastest within accuracy budget" in r.decision["reason"]
        # a latency budget alone (default min_agreement): the most accurate plan that fits, fp32 alone here
        r = c.classify(img, parameters={"latency_budget_ms": 10_000.0})
        assert r.decision["code"] == "cascade_max_accuracy:reference" and r.variant == m.reference_variant
        # with an accuracy budget, one variant per request: the most accurate that fits
        r = c.classify(img, parameters={"latency_budget_ms": 10_000.0, "accuracy_budget": 1.0})
        assert r.decision["code"] == "max_accuracy" and r.variant in (
            v.name for v in m.variants if v.accuracy.top1_drop_points <= 1.0 and v.serve_on_cpu_for_speed
        )
        r = c.classify(
            img, parameters={"latency_budget_ms": 0.001, "objective": "max_accuracy", "accuracy_budget": 1.0}
        )
        assert (
            r.decision["code"] == "degraded_latency"
            and "no variant within latency budget" in r.decision["reason"]
        )


def _infer_raw(server, data, dtype="BYTES", shape=None, params=None):
    c = httpclient.InferenceServerClient(server.http_url)
    arr = data if isinstance(data, np.ndarray) else np.array([[data]], dtype=object)
    inp = httpclient.InferInput("IMAGE", list(shape or arr.shape), dtype)
    inp.set_data_from_numpy(arr)
    try:
        return c.infer("classifier", [inp], parameters=params)
    finally:
        c.close()


@pytest.mark.parametrize(
    "case,needle",
    [
        ("empty", "empty input"),
        ("corrupt_jpeg", "cannot decode"),
        ("text_file", "cannot decode"),
        ("unknown_variant", "unknown variant 'int4'"),
        ("negative_budget", "'accuracy_budget' must be a finite number >= 0"),
        ("unknown_objective", "'objective' must be one of"),
    ],
)
def test_bad_requests_get_clear_errors(server, case, needle):
    good = default_photo("chelsea").read_bytes()
    data, params = {
        "empty": (b"", None),
        "corrupt_jpeg": (default_photo("rocket").read_bytes()[:3000], None),
        "text_file": (Path(__file__).read_bytes(), None),
        "unknown_variant": (good, {"variant": "int4"}),
        "negative_budget": (good, {"accuracy_budget": -1.0}),
        "unknown_objective": (good, {"objective": "fastest"}),
    }[case]
    with pytest.raises(InferenceServerException, match=needle):
        _infer_raw(server, data, params=params)
    assert server.ready()


def test_wrong_dtype_shape_and_batch_are_rejected(server):
    with pytest.raises(
        InferenceServerException, match="data-type is .FP32., but model .classifier. expects .BYTES."
    ):
        _infer_raw(server, np.zeros((1, 1), np.float32), dtype="FP32")
    with pytest.raises(InferenceServerException, match="shape|dims"):
        _infer_raw(server, np.array([[b"a", b"b"]], dtype=object))
    img = default_photo("chelsea").read_bytes()
    with pytest.raises(InferenceServerException, match="batch.size must be <= 8"):
        _infer_raw(server, np.array([[img]] * 9, dtype=object))
    r = _infer_raw(server, np.array([[img]] * 8, dtype=object))
    assert r.as_numpy("LOGITS").shape == (8, 1000)
    assert server.ready()


def test_eight_concurrent_requests_bad_ones_do_not_fail_good_ones(server):
    img = default_photo("chelsea").read_bytes()
    payloads = [img, b"", img, b"not an image", img, img, img, img]
    results = [None] * 8
    barrier = threading.Barrier(8)

    def worker(i):
        c = (
            grpcclient.InferenceServerClient(server.grpc_url)
            if i % 2
            else httpclient.InferenceServerClient(server.http_url)
        )
        mod = grpcclient if i % 2 else httpclient
        inp = mod.InferInput("IMAGE", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[payloads[i]]], dtype=object))
        out = [mod.InferRequestedOutput("LOGITS", class_count=1), mod.InferRequestedOutput("VARIANT")]
        barrier.wait()
        try:
            results[i] = c.infer("classifier", [inp], outputs=out)
        except InferenceServerException as e:
            results[i] = e
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, r in enumerate(results):
        if payloads[i] is img:
            assert not isinstance(r, Exception), r
            idx = int(r.as_numpy("LOGITS").reshape(-1)[0].decode().split(":")[1])
            assert idx in CAT_CLASSES
        else:
            assert isinstance(r, InferenceServerException)
    assert server.ready()


def test_classify_cli(server):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tcsched.cli",
            "classify",
            str(default_photo("chelsea")),
            "--url",
            server.http_url,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "cat" in out.stdout and "mobilenet_v2_" in out.stdout
    # A narrow terminal (CI has none: rich falls back to 80 columns) must not cut the error message.
    import os

    bad = subprocess.run(
        [sys.executable, "-m", "tcsched.cli", "classify", __file__, "--url", server.http_url],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "40"},
    )
    assert bad.returncode == 2, bad.stderr
    line = next(ln for ln in bad.stderr.splitlines() if ln.startswith("error: "))
    assert __file__ in line and "cannot decode" in line


def test_eval_command_on_a_few_labeled_images(server, built_repo, imagenet_sample, tmp_path):
    """`tcsched eval` through the running server: every variant forced, the scheduler, torchvision eager."""
    import json

    out = tmp_path / "eval.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tcsched.cli",
            "eval",
            str(imagenet_sample),
            "--repo",
            str(built_repo),
            "--url",
            server.http_url,
            "--limit",
            "12",
            "--rounds",
            "2",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    m = Manifest.read(built_repo / "manifest.json")
    cascades = {f"served: cascade, min_agreement={t}" for t in ("0.99", "0.995")}
    assert set(rows) == {"torchvision eager fp32", "served: scheduler (default)"} | cascades | {
        f"served: {v.name}" for v in m.variants
    }
    fp32 = rows[f"served: {m.reference_variant}"]
    assert fp32["n_images"] == 12 and fp32["errors"] == 0
    assert fp32["agreement_with_reference"] == 1.0  # the served fp32 is torchvision eager
    assert fp32["agreement_with_fp32"] == 1.0 and fp32["compute_vs_fp32"] == 1.0
    assert fp32["compute_vs_fp32_rounds"] == [1.0, 1.0]  # 2 rounds, each fp32 against its own pass
    for row in rows.values():  # every served row: a ratio per round, the median of them reported
        if row["name"].startswith("served"):
            per = row["compute_vs_fp32_rounds"]
            assert (
                len(per) == 2
                and all(x > 0 for x in per)
                and row["compute_vs_fp32"] == pytest.approx(sum(per) / 2)
            )
    for (
        name
    ) in cascades:  # a cascade row: escalation share and compute time measured from Triton's statistics
        row = rows[name]
        assert row["errors"] == 0 and 0 <= row["escalation_rate"] <= 1 and row["compute_ms_per_image"] > 0
        assert set(row["variants_used"]) <= {v.name for v in m.variants}
        # the per-variant statistics add up to the row's compute; every variant that served a row ran
        st = row["stage_stats"]
        assert set(row["variants_used"]) <= set(st) <= {v.name for v in m.variants}
        assert all(s["calls"] >= 1 and s["rows"] >= s["calls"] for s in st.values())
        assert sum(s["rows"] for s in st.values()) >= 2 * 12  # every image ran at least once per round
    static = fp32["stage_stats"]
    assert list(static) == [m.reference_variant] and static[m.reference_variant]["rows"] == 2 * 12
    assert fp32["images_per_s"] > 0
    assert fp32["top1"] == rows["torchvision eager fp32"]["top1"]
    lo, hi = fp32["ci95_top1"]
    assert lo <= fp32["top1"] <= hi
