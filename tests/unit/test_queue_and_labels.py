"""The scheduler's queue model over several instances (Erlang C, instance counts read from the variant configs)
and the label sets its metrics are created with at start."""

import itertools
import math

import pytest

from tcsched.build_tools import repository as r
from tcsched.scheduler.live import LoadTracker, erlang_c, instance_counts
from tcsched.scheduler.policy import Policy, RequestOptions, decision_label_sets
from tests.helpers import make_manifest
from tests.unit.test_cascade import _cascade_manifest


def _erlang_c_direct(c: int, a: float) -> float:
    """Erlang C from its textbook sum (Kleinrock 1975, eq. 3.42), for checking the recursion."""
    top = a**c / math.factorial(c) * c / (c - a)
    return top / (sum(a**k / math.factorial(k) for k in range(c)) + top)


@pytest.mark.parametrize(("c", "a"), [(1, 0.3), (2, 1.5), (3, 0.1), (4, 3.9), (8, 5.0)])
def test_erlang_c_matches_the_closed_form(c, a):
    assert erlang_c(c, a) == pytest.approx(_erlang_c_direct(c, a), rel=1e-12)


def test_erlang_c_bounds():
    assert erlang_c(1, 0.4) == pytest.approx(0.4)  # M/M/1: P(wait) = utilisation
    assert erlang_c(2, 0.0) == 0.0
    for bad in [(0, 0.5), (2, 2.0), (2, -0.1)]:
        with pytest.raises(ValueError):
            erlang_c(*bad)


def test_more_instances_shorten_the_predicted_queue_and_one_instance_is_mm1():
    t = LoadTracker()
    t.arrival_per_ms = 0.08  # 80 images/s
    service = 10.0  # ms per image at batch 1: offered load 0.8
    u = 0.8
    assert t.predicted_ms("v", service, 1, max_utilization=0.95, now=0) == pytest.approx(
        service + service * u / (1 - u)
    )
    t.instances = {"v": 2}
    two = t.predicted_ms("v", service, 1, max_utilization=0.95, now=0)
    assert two == pytest.approx(service + erlang_c(2, 0.8) * service / (2 * (1 - 0.4)))
    assert service < two < service + service * u / (1 - u)
    # two scheduler instances each see half the arrivals: the rate is scaled back up
    t.instances, t.scheduler_instances = {}, 2
    t.arrival_per_ms = 0.04
    assert t.predicted_ms("v", service, 1, max_utilization=0.95, now=0) == pytest.approx(
        service + service * u / (1 - u)
    )


def test_instance_counts_from_the_variant_configs(tmp_path):
    opts = r.ServingOptions()
    for name, count in (("a", 1), ("b", 3)):
        cfg = r.variant_config(name, opts, "input", "logits", [3, 224, 224], 10)
        cfg.instance_group[0].count = count
        r.write_model(tmp_path, cfg)
    g = r.variant_config("gpu", opts, "input", "logits", [3, 224, 224], 10)
    g.instance_group[0].count = 2
    g.instance_group[0].gpus.extend([0, 1])  # count on each listed GPU
    r.write_model(tmp_path, g)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.pbtxt").write_text("instance_group { count: ")
    assert instance_counts(tmp_path, ["a", "b", "gpu", "broken", "absent"]) == {
        "a": 1,
        "b": 3,
        "gpu": 4,
        "broken": 1,
        "absent": 1,
    }


def test_decision_label_sets_cover_every_decision_the_policy_makes():
    m = _cascade_manifest()
    labels = set(decision_label_sets(m))
    assert ("m_int8", "cascade_min_latency:int8>fp32") in labels and ("m_fp32", "forced") in labels
    p = Policy(m)
    seen = set()
    options = [RequestOptions(variant=v) for v in ("m_int8", "m_fp32")] + [
        RequestOptions(min_agreement=a, latency_budget_ms=lb, objective=o, accuracy_budget_points=acc)
        for a, lb, o, acc in itertools.product(
            (None, 0.99, 0.995, 1.0),
            (None, 0.01, 5.0, 100.0),
            (None, "min_latency", "max_accuracy"),
            (0.0, 1.0, 5.0),
        )
    ]
    for opts in options:
        for batch in (1, 8):
            seen |= {(d.variant, d.code) for d in p.rank(opts, batch_size=batch)}
    assert seen <= labels, seen - labels
    # every code family shows up in these scenarios
    codes = {c.split(":")[0] for _, c in seen}
    assert {"forced", "min_latency", "fallback", "cascade_min_latency", "cascade_max_accuracy"} <= codes


def test_decision_label_sets_without_cascades():
    m = make_manifest({"m_fp32": ("fp32", 0.0, {1: 5.0}), "m_int8": ("int8", 0.5, {1: 3.0})})
    labels = decision_label_sets(m)
    assert len(labels) == 2 * 6 + 4  # 6 single-variant codes per variant, 4 cascade codes of the reference
    assert ("m_fp32", "cascade_min_latency:reference") in labels
