"""OpenVINO variants served by the real tritonserver (Python backend, tcsched.engines.openvino) give the logits
of the same engine in-process; the ensemble serves them by name."""

import numpy as np
import pytest
import tritonclient.http as httpclient

from tcsched.client.bare import serving_threads
from tcsched.client.classify import ClassifierClient
from tcsched.data import list_images
from tcsched.engines import load_engine
from tcsched.imaging import preprocess_bytes
from tcsched.manifest import Manifest

pytestmark = pytest.mark.integration
pytest.importorskip("openvino")


def _openvino_variants(built_repo):
    m = Manifest.read(built_repo / "manifest.json")
    vs = [v for v in m.variants if v.runtime == "openvino"]
    assert vs, f"the build made no OpenVINO pair: {[v.name for v in m.variants]}"
    return m, vs


def test_manifest_lists_the_pairs(built_repo):
    m, vs = _openvino_variants(built_repo)
    names = {v.name for v in vs}
    assert "mobilenet_v2_int8_openvino" in names
    assert names & {"mobilenet_v2_bf16_openvino", "mobilenet_v2_fp32_openvino"}
    for v in vs:
        assert v.latency.runtime == "openvino" and v.accuracy.n_images > 0
        assert v.not_served_reason is None or v.not_served_reason
        if v.precision in ("bf16", "bf16_mixed"):
            assert v.requires_cpu == ["bf16"] and "bf16" in m.build_cpu
    # int8 weights are 8-bit exactly where the build CPU's int8 does not saturate (VNNI), and then required
    for v in m.variants:
        if v.precision == "int8":
            assert ("int8_full_range" in v.requires_cpu) == ("int8_full_range" in m.build_cpu), v.name
    assert m.variant(m.reference_variant).runtime == "onnxruntime"


def test_served_openvino_equals_in_process(server, built_repo, imagenet_sample):
    _, vs = _openvino_variants(built_repo)
    x = np.stack([preprocess_bytes(it.read_bytes()) for it in list_images(imagenet_sample)[:6]])
    c = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    try:
        for v in vs:
            engine = load_engine(
                "openvino",
                built_repo / v.file,
                threads=serving_threads(built_repo, v.name),
                precision=v.precision,
            )
            assert engine.describe().runtime == "openvino"
            want = engine(x)
            inp = httpclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            got = c.infer(v.name, [inp]).as_numpy("logits")
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=v.name)
    finally:
        c.close()


def test_ensemble_serves_a_pair_by_name(server, built_repo, imagenet_sample):
    _, vs = _openvino_variants(built_repo)
    img = list_images(imagenet_sample)[0].read_bytes()
    with ClassifierClient(server.http_url) as cl:
        for v in vs:
            r = cl.classify(img, parameters={"variant": v.name})
            assert r.variant == v.name
