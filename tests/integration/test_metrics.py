"""The scheduler's metrics on the real server's metrics port, parsed with prometheus_client: names, types, base
units, every label set present at zero before the first request, and counts that follow real requests."""

import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tcsched.client.classify import ClassifierClient
from tcsched.data import default_photo
from tcsched.manifest import Manifest
from tcsched.scheduler.policy import decision_label_sets

pytestmark = pytest.mark.integration

#: name -> (Prometheus type, label names of each series) the scheduler exports (README "Metrics")
EXPECTED = {
    "tcsched_decisions": ("counter", {"variant", "reason"}),
    "tcsched_fallbacks": ("counter", {"from_variant", "to_variant"}),
    "tcsched_escalations": ("counter", {"cascade"}),
    "tcsched_bls_duration_seconds": ("histogram", {"variant"}),
    "tcsched_predicted_latency_seconds": ("histogram", {"variant"}),
}


def scrape(server) -> dict:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("tcsched")}


def value(family, sample_name: str, **labels) -> float:
    hits = [s.value for s in family.samples if s.name == sample_name and labels.items() <= s.labels.items()]
    assert hits, (sample_name, labels)
    return sum(hits)


@pytest.fixture(scope="module")
def before(server):
    """The metrics before this module sends anything (the session's server may have served other tests)."""
    return scrape(server)


def test_names_types_and_base_units(server, before):
    assert set(before) == set(EXPECTED), sorted(before)  # no *_ms / *_percent left, no GPU gauge on a CPU
    for name, (kind, label_names) in EXPECTED.items():
        fam = before[name]
        assert fam.type == kind, name
        assert fam.documentation, name
        for s in fam.samples:
            assert set(s.labels) - {"le"} == label_names, (name, s.labels)
    bls = before["tcsched_bls_duration_seconds"]
    les = sorted({float(s.labels["le"]) for s in bls.samples if s.name.endswith("_bucket")})
    assert les[0] <= 0.001 and les[-1] == float("inf")  # seconds: a 1 ms bucket exists, +Inf closes them
    assert all(le <= 10 for le in les[:-1])  # no bucket in milliseconds (would reach 100s or 1000s)


def test_every_label_set_exists_at_start(server, before, built_repo):
    m = Manifest.read(built_repo / "manifest.json")
    names = {v.name for v in m.variants}
    decisions = {
        (s.labels["variant"], s.labels["reason"])
        for s in before["tcsched_decisions"].samples
        if s.name.endswith("_total")
    }
    assert decisions == set(decision_label_sets(m))
    fallbacks = {
        (s.labels["from_variant"], s.labels["to_variant"])
        for s in before["tcsched_fallbacks"].samples
        if s.name.endswith("_total")
    }
    assert fallbacks == {(a, b) for a in names for b in names if a != b}
    escalations = {
        s.labels["cascade"] for s in before["tcsched_escalations"].samples if s.name.endswith("_total")
    }
    assert escalations == {c.label for c in m.cascades}
    for hist in ("tcsched_bls_duration_seconds", "tcsched_predicted_latency_seconds"):
        counted = {s.labels["variant"] for s in before[hist].samples if s.name.endswith("_count")}
        assert counted == names, hist


def test_counts_follow_requests(server, before, built_repo):
    m = Manifest.read(built_repo / "manifest.json")
    int8 = m.variant("int8").name
    n = 5
    with ClassifierClient(server.http_url) as c:
        for _ in range(n):
            c.classify(default_photo("chelsea").read_bytes(), 5, {"variant": "int8"})
    time.sleep(0.6)  # the scheduler pushes its sums every 250 ms (metrics_flush_interval_ms)
    after = scrape(server)

    def delta(name, sample, **labels):
        return value(after[name], sample, **labels) - value(before[name], sample, **labels)

    assert delta("tcsched_decisions", "tcsched_decisions_total", variant=int8, reason="forced") == n
    bls = "tcsched_bls_duration_seconds"
    calls = delta(bls, f"{bls}_count", variant=int8)
    assert calls == n  # one BLS call per request at concurrency 1, a forced variant has no cascade
    seconds = delta(bls, f"{bls}_sum", variant=int8) / calls
    assert 1e-4 < seconds < 2.0, seconds  # seconds, not ms: an int8 BLS call takes ~3-30 ms here
    # the buckets are cumulative and the +Inf one holds every observation
    assert delta(bls, f"{bls}_bucket", variant=int8, le="+Inf") == n
    pred = "tcsched_predicted_latency_seconds"
    assert delta(pred, f"{pred}_count", variant=int8) == n
    assert 1e-4 < delta(pred, f"{pred}_sum", variant=int8) / n < 2.0
