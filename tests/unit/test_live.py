import pytest

from tcsched.scheduler.live import LoadTracker, gpu_state
from tcsched.scheduler.policy import Policy, RequestOptions
from tests.helpers import make_manifest


def test_load_tracker_offsets_and_execute_ewma():
    t = LoadTracker(alpha=0.5)
    assert t.service_ms("a", 5.0) == 5.0  # nothing observed yet
    t.observe_variant("a", 8.0, 5.0)  # +3 ms of serving overhead
    assert t.service_ms("a", 5.0) == 8.0
    assert t.service_ms("b", 20.0) == 23.0  # an unobserved variant inherits the global offset
    t.observe_variant("a", 5.0, 5.0)
    assert t.service_ms("a", 5.0) == 6.5
    t.observe_variant("c", 0.0, 10.0)  # faster than profiled: bounded below
    assert t.service_ms("c", 10.0) >= 1.0
    t.observe_execute(8.0)
    t.observe_execute(4.0)
    assert t.execute_ms == 6.0
    t.begin(3)
    t.end(5)
    assert t.in_flight == 0


def test_observed_overhead_does_not_make_the_scheduler_flip():
    p = Policy(make_manifest(SPECS))
    t = LoadTracker()
    o = RequestOptions(accuracy_budget_points=5.0)
    first = p.rank(o, load=t)[0].variant
    for _ in range(5):  # the same ~2 ms BLS overhead on whatever is served
        d = p.rank(o, load=t)[0]
        assert d.variant == first
        t.observe_variant(d.variant, 2.0 + 3.0, 3.0)


def test_gpu_state_is_none_without_a_gpu():
    assert gpu_state() is None


SPECS = {
    "m_fp32": ("fp32", 0.0, {1: 5.0, 8: 32.0}),
    "m_mixed": ("int8_mixed", 0.4, {1: 4.0, 8: 18.0}),
    "m_int8": ("int8", 2.5, {1: 3.0, 8: 12.0}),
}


def test_load_moves_max_accuracy_to_cheaper_variants():
    p = Policy(make_manifest(SPECS), latency_headroom=1.0, max_utilization=0.95)
    o = RequestOptions(latency_budget_ms=40.0, accuracy_budget_points=5.0)
    assert o.resolved_objective == "max_accuracy"
    idle = LoadTracker()
    assert p.rank(o, batch_size=8, load=idle)[0].variant == "m_fp32"  # 32 ms fits, no queue
    busy = LoadTracker()
    busy.arrival_per_ms = 0.15  # 150 img/s: fp32 u = 0.15 * 32/8 = 0.6 -> 32 + 32 * 0.6/0.4 = 80 ms
    d = p.rank(o, batch_size=8, load=busy)[0]
    u = 0.15 * 18 / 8  # int8_mixed: 18 ms per batch of 8
    assert d.variant == "m_mixed" and d.predicted_latency_ms == pytest.approx(18 + 18 * u / (1 - u))
    busy.observe_variant("m_mixed", 36.0, 18.0)  # observed +18 ms over its profile: u = 0.675 -> 111 ms
    busy.observe_variant("m_int8", 12.0, 12.0)  # int8 served as profiled (else it inherits the global +18 ms)
    assert p.rank(o, batch_size=8, load=busy)[0].variant == "m_int8"
    overloaded = LoadTracker()
    overloaded.arrival_per_ms = 1.0  # beyond every variant's capacity: the fastest, as documented
    d = p.rank(o, batch_size=8, load=overloaded)[0]
    assert d.variant == "m_int8" and d.code == "degraded_latency"


def test_arrival_rate_over_a_sliding_window():
    t = LoadTracker(arrival_window_ms=500.0)
    t.observe_execute(5.0, images=4, start=10.0)
    t.observe_execute(5.0, images=8, start=10.1)
    assert t.arrival_per_ms == pytest.approx(12 / 500)  # 12 images in the last 500 ms
    t.observe_execute(5.0, images=2, start=10.45)
    assert t.arrival_per_ms == pytest.approx(14 / 500)
    t.observe_execute(5.0, images=1, start=10.55)  # the first execute (10.0) left the window
    assert t.arrival_per_ms == pytest.approx(11 / 500)
    t.observe_execute(5.0, images=1, start=20.0)  # after a pause only the newest counts
    assert t.arrival_per_ms == pytest.approx(1 / 500)
    # a short gap does not read as a burst: 8 images 10 ms after the previous ones are 8 more in the window
    t.observe_execute(5.0, images=8, start=20.01)
    assert t.arrival_per_ms == pytest.approx(9 / 500)
    t.arrival_per_ms = 0.08
    assert t.predicted_ms("v", 10.0, batch_size=1) == pytest.approx(10.0 / (1 - 0.8))
    assert t.predicted_ms("v", 20.0, batch_size=1) == 2000.0  # u = 1.6: cannot keep up


METRICS = """# HELP nv_inference_request_duration_us Cumulative inference request duration in microseconds
# TYPE nv_inference_request_duration_us counter
nv_inference_request_duration_us{model="preprocess",version="1"} %d
nv_inference_request_duration_us{model="scheduler",version="1"} 999999
nv_inference_request_success{model="preprocess",version="1"} %d
nv_inference_request_success{model="classifier",version="1"} 77
"""


def test_sum_metric_reads_only_the_named_models():
    from tcsched.scheduler.live import sum_metric

    text = METRICS % (1500, 3)
    assert sum_metric(text, "nv_inference_request_duration_us", ["preprocess"]) == 1500
    assert sum_metric(text, "nv_inference_request_duration_us", ["preprocess", "scheduler"]) == 1001499
    assert sum_metric(text, "nv_inference_request_success", ["nope"]) == 0
    assert sum_metric(text, "nv_gpu_utilization", ["preprocess"]) == 0


def test_upstream_probe_turns_counter_deltas_into_mean_ms_and_survives_a_dead_endpoint():
    from tcsched.scheduler.live import UpstreamProbe

    pages = iter([METRICS % (1_000, 1), METRICS % (61_000, 4), METRICS % (61_000, 4), OSError("refused")])

    def fetch():
        page = next(pages)
        if isinstance(page, Exception):
            raise page
        return page

    probe = UpstreamProbe("http://unused", ["preprocess"], interval_s=3600, fetch=fetch)
    try:
        assert probe.poll() == 0.0  # first scrape: nothing to compare with
        assert probe.poll() == pytest.approx(20.0)  # 60 000 us over 3 requests
        assert probe.wait_ms() == pytest.approx(20.0)
        assert probe.poll() == 0.0  # idle: no request completed
        assert probe.poll() == 0.0  # endpoint gone: no correction, no exception
    finally:
        probe.close()
    with pytest.raises(ValueError, match="upstream model"):
        UpstreamProbe("http://unused", [])


def test_a_variant_offset_expires_so_a_slow_spell_is_not_remembered_for_good():
    """A variant's own offset counts only while it is fresh (offset_ttl_s); after that the variant is judged by
    the global offset again, so the policy gives it another try instead of avoiding it forever."""
    t = LoadTracker(offset_ttl_s=2.0)
    t.observe_variant("int8", 30.0, 10.0, now=100.0)  # one slow spell: +20 ms
    t.observe_variant("mixed", 13.0, 12.0, now=100.5)  # global offset: 0.7 * 20 + 0.3 * 1 = 14.3
    assert t.service_ms("int8", 10.0, now=101.0) == pytest.approx(30.0)  # fresh: its own +20
    assert t.service_ms("int8", 10.0, now=103.0) == pytest.approx(10.0 + 14.3)  # stale: the global offset
    for k in range(10):  # the chosen variant keeps serving as profiled: the global offset falls
        t.observe_variant("mixed", 12.0, 12.0, now=101.0 + k)
    assert t.service_ms("int8", 10.0, now=110.5) < t.service_ms("mixed", 12.0, now=110.5)
    assert t.service_ms("int8", 10.0, now=101.0) == pytest.approx(30.0)  # still its own when fresh
