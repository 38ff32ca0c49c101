import numpy as np

from tcsched.scheduler.policy import LiveState, Policy, RequestError, RequestOptions
from tcsched.scheduler.service import SchedulerService
from tests.helpers import FakeBLS, make_manifest

SPECS = {"m_fp32": ("fp32", 0.0, {1: 5.0, 8: 32.0}), "m_int8": ("int8", 2.5, {1: 3.0, 8: 12.0})}


class FakeVariants(FakeBLS):
    """Logits whose first column encodes the row's own value and the second the variant."""

    def logits(self, variant, batch):
        out = np.zeros((len(batch), 4), np.float32)
        out[:, 0] = batch[:, 0, 0, 0]
        out[:, 1] = 1.0 if variant == "m_int8" else 0.0
        return out


def req(value, n=1, **params):
    return params, np.full((n, 3, 2, 2), value, np.float32)


def test_same_options_share_one_call_and_rows_return_to_their_request():
    infer = FakeVariants()
    svc = SchedulerService(Policy(make_manifest(SPECS)), RequestOptions(accuracy_budget_points=5), infer)
    out = svc.handle([req(1.0), req(2.0, n=2), req(3.0, variant="m_fp32")])
    assert sorted(infer.calls) == [("m_fp32", 1), ("m_int8", 3)]
    assert out[0].logits[:, 0].tolist() == [1.0] and out[0].decision.variant == "m_int8"
    assert out[1].logits[:, 0].tolist() == [2.0, 2.0]
    assert out[2].decision.variant == "m_fp32" and out[2].logits[0, 1] == 0.0


def test_bad_parameters_fail_only_their_request():
    svc = SchedulerService(Policy(make_manifest(SPECS)), RequestOptions(), FakeVariants())
    out = svc.handle([req(1.0, accuracy_budget=-3), req(2.0), req(3.0, variant="nope")])
    assert isinstance(out[0], RequestError) and "accuracy_budget" in str(out[0])
    assert out[1].logits[0, 0] == 2.0
    assert isinstance(out[2], RequestError) and "unknown variant" in str(out[2])


def test_failing_variant_falls_back_once_and_is_marked_unhealthy():
    state = LiveState(cooldown_s=60)
    infer = FakeVariants(failing={"m_int8"})
    svc = SchedulerService(
        Policy(make_manifest(SPECS), state), RequestOptions(accuracy_budget_points=5), infer
    )
    out = svc.handle([req(1.0)])
    assert out[0].decision.variant == "m_fp32" and out[0].fallback_from == "m_int8"
    assert svc.fallbacks == 1 and not state.healthy("m_int8")
    svc.handle([req(1.0)])
    assert infer.calls[-1] == ("m_fp32", 1)  # cool-down: int8 not tried again


def test_forced_variant_failure_is_a_clear_error_not_a_fallback():
    svc = SchedulerService(Policy(make_manifest(SPECS)), RequestOptions(), FakeVariants(failing={"m_int8"}))
    out = svc.handle([req(1.0, variant="int8")])
    assert isinstance(out[0], RuntimeError) and "m_int8 is down" in str(out[0])


def test_all_variants_failing_is_an_error_per_request():
    svc = SchedulerService(Policy(make_manifest(SPECS)), RequestOptions(), FakeVariants(failing=set(SPECS)))
    out = svc.handle([req(1.0), req(2.0)])
    assert all(isinstance(o, RuntimeError) and "every attempted variant failed" in str(o) for o in out)


def test_batched_events_sum_between_flushes_and_reach_the_sink_on_close():
    import pytest

    from tcsched.scheduler.service import BatchedEvents

    snaps = []
    ev = BatchedEvents(snaps.append, flush_interval_s=3600)  # only explicit flushes in this test
    ev.decision("m_int8", "min_latency", 2)
    ev.decision("m_int8", "min_latency", 3)
    ev.fallback("m_int8", "m_fp32", 1)
    ev.escalation("int8>fp32", 1)
    ev.latency("m_int8", 4.0, 3.0)
    ev.latency("m_int8", 6.0, None)
    ev.flush()
    ev.flush()  # nothing new: the sink is not called
    ev.decision("m_fp32", "forced", 1)
    ev.close()
    assert len(snaps) == 2
    s = snaps[0]
    assert s.decisions == {("m_int8", "min_latency"): 5} and s.fallbacks == {("m_int8", "m_fp32"): 1}
    assert (
        s.escalations == {"int8>fp32": 1}
        and s.bls_calls == {"m_int8": 2}
        and s.bls_sum_ms == {"m_int8": 10.0}
    )
    assert s.bls_last_ms == {"m_int8": 6.0} and s.predicted_last_ms == {"m_int8": 3.0}
    assert snaps[1].decisions == {("m_fp32", "forced"): 1}
    with pytest.raises(ValueError, match="flush_interval_s"):
        BatchedEvents(snaps.append, flush_interval_s=0)


def test_batched_events_flush_from_their_thread_and_survive_a_failing_sink():
    import threading

    from tcsched.scheduler.service import BatchedEvents

    got = threading.Event()
    calls = []

    def sink(snap):
        calls.append(snap)
        if len(calls) == 1:
            raise RuntimeError("metrics server gone")
        got.set()

    ev = BatchedEvents(sink, flush_interval_s=0.01)
    ev.escalation("c", 1)
    for _ in range(200):  # wait for the first (failing) flush
        if calls:
            break
        threading.Event().wait(0.01)
    ev.escalation("c", 2)
    assert got.wait(5), "the thread stopped after the sink failed"
    ev.close()
    assert [c.escalations["c"] for c in calls] == [1, 2]


def test_upstream_time_reaches_the_policy_and_the_decision():
    import json

    specs = {"m_fp32": ("fp32", 0.0, {1: 5.0, 8: 32.0}), "m_int8": ("int8", 0.5, {1: 3.0, 8: 12.0})}
    infer = FakeVariants()
    svc = SchedulerService(
        Policy(make_manifest(specs), latency_headroom=1.0),
        RequestOptions(),
        infer,
        upstream_ms=lambda: 16.0,
    )
    out = svc.handle([req(1.0, latency_budget_ms=20.0, accuracy_budget=1.0)])
    assert out[0].decision.variant == "m_int8"  # 16 + 5 > 20; 16 + 3 fits
    assert json.loads(out[0].decision_json())["upstream_ms"] == 16.0


def test_forced_dead_variant_fails_fast_and_is_probed_once_a_second(monkeypatch):
    from tcsched.scheduler.service import VariantUnavailable

    clock = [100.0]
    monkeypatch.setattr("tcsched.scheduler.policy.time.monotonic", lambda: clock[0])
    state = LiveState(cooldown_s=30)
    infer = FakeVariants(failing={"m_int8"})
    svc = SchedulerService(Policy(make_manifest(SPECS), state), RequestOptions(), infer)
    first = svc.handle([req(1.0, variant="m_int8")])[0]
    assert isinstance(first, RuntimeError) and "m_int8 is down" in str(first)
    calls = len(infer.calls)
    again = svc.handle([req(1.0, variant="m_int8") for _ in range(5)])
    assert all(isinstance(r, VariantUnavailable) and "failed recently" in str(r) for r in again)
    assert len(infer.calls) == calls  # answered without calling the dead variant
    clock[0] += 1.5  # the probe is due: one request goes through
    infer.failing.clear()
    out = svc.handle([req(1.0, variant="m_int8")])[0]
    assert out.decision.variant == "m_int8" and state.healthy("m_int8")
