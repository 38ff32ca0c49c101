"""The scheduler inside the real tritonserver: fallback when a variant fails, metrics, upstream time."""

import io
import re
import shutil
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image

from tcsched.client.classify import ClassifierClient
from tcsched.data import default_photo
from tcsched.manifest import Manifest
from tcsched.server import TritonServer
from tcsched.settings import DEFAULTS

pytestmark = pytest.mark.integration
INT8 = ("int8", "int8_mixed")


@pytest.fixture(scope="module")
def sched_repo(built_repo, tmp_path_factory):
    """A copy of the built repository whose manifest profiles int8 as by far the fastest, so that the scheduler
    tries it first whatever the live latency corrections say (the test makes exactly that variant fail)."""
    repo = tmp_path_factory.mktemp("sched") / "model_repository"
    shutil.copytree(built_repo, repo)
    m = Manifest.read(repo / "manifest.json")
    for v in m.variants:
        if v.precision == "int8" and v.runtime == "onnxruntime":
            v.latency.p50_ms_by_batch = {b: 0.01 * b for b in v.latency.p50_ms_by_batch}
            v.on_pareto_front, v.not_served_reason = True, None  # by far the fastest now
    m.write(repo / "manifest.json")
    return repo


@pytest.fixture(scope="module")
def explicit_server(sched_repo):
    """A server whose models can be unloaded at run time (a variant "fails": BLS to it errors)."""
    extra = ["--model-control-mode=explicit", "--load-model=*"]
    with TritonServer(sched_repo, http_port=0, grpc_port=0, metrics_port=0, extra_args=extra) as s:
        yield s


def metric(server, name: str, **labels) -> float:
    """A metric's value once what came before is flushed: the scheduler sums its metrics and pushes them every
    ``metrics_flush_interval_ms`` (250 ms by default), so this waits three intervals before reading."""
    time.sleep(3 * DEFAULTS.metrics_flush_interval_ms / 1e3)
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_failed_variant_falls_back_and_is_counted(explicit_server, sched_repo):
    img = default_photo("chelsea").read_bytes()
    params = {"accuracy_budget": 100.0}
    with ClassifierClient(explicit_server.http_url) as c:
        first = c.classify(img, parameters=params).variant
        assert first == "mobilenet_v2_int8"  # the profiled-fastest variant within a loose budget
        before = metric(explicit_server, "tcsched_fallbacks_total", from_variant=first)
        admin = httpclient.InferenceServerClient(explicit_server.http_url)
        admin.unload_model(first, headers=explicit_server.admin_headers())
        try:
            r = c.classify(img, parameters=params)
            assert r.variant != first and r.decision["fallback_from"] == first
            assert r.topk[0].index in range(281, 286)  # still the right answer
            assert metric(explicit_server, "tcsched_fallbacks_total", from_variant=first) == before + 1
            # during the cool-down the failed variant is not tried first any more: no second fallback
            r2 = c.classify(img, parameters=params)
            assert r2.variant != first and r2.decision["fallback_from"] is None
            # forcing the unloaded variant is a clear error, not a hang
            with pytest.raises(Exception, match=first):
                c.classify(img, parameters={"variant": first})
        finally:
            admin.load_model(first, headers=explicit_server.admin_headers())
            admin.close()
    assert explicit_server.ready()


def test_decision_metrics_and_latency_gauges(explicit_server):
    img = default_photo("coffee").read_bytes()
    with ClassifierClient(explicit_server.http_url) as c:
        r = c.classify(img, parameters={"variant": "fp32"})
        before = metric(explicit_server, "tcsched_decisions_total", variant=r.variant, reason="forced")
        r = c.classify(img, parameters={"variant": "fp32"})
    assert r.decision["code"] == "forced" and r.decision["predicted_latency_ms"] > 0
    assert (
        metric(explicit_server, "tcsched_decisions_total", variant=r.variant, reason="forced") == before + 1
    )
    # histograms in seconds (README "Metrics"): observations and their sum
    for hist in ("tcsched_bls_duration_seconds", "tcsched_predicted_latency_seconds"):
        assert metric(explicit_server, f"{hist}_count", variant=r.variant) >= 2, hist
        assert 0 < metric(explicit_server, f"{hist}_sum", variant=r.variant) < 60, hist


def test_scheduler_reads_the_time_spent_in_preprocess_from_triton_metrics(explicit_server):
    """The UpstreamProbe scrapes this server's metrics endpoint ($TCSCHED_METRICS_URL, set by TritonServer)."""
    img = default_photo("coffee").read_bytes()
    seen = []
    with ClassifierClient(explicit_server.http_url) as c:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(u > 0 for u in seen):
            r = c.classify(img, parameters={"latency_budget_ms": 500.0})
            seen.append(r.decision["upstream_ms"])
    assert any(0 < u < 500 for u in seen), seen  # preprocess decodes a JPEG in a few ms here
