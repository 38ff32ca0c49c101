import math

import pytest

from tcsched.scheduler.policy import (
    LiveState,
    Policy,
    RequestError,
    RequestOptions,
    parse_parameters,
    predicted_latency_ms,
)
from tests.helpers import make_manifest

SPECS = {
    "m_fp32": ("fp32", 0.0, {1: 5.0, 8: 32.0}),
    "m_fp16": ("fp16", 0.1, {1: 50.0, 8: 400.0}),  # emulated on CPU: never chosen for speed
    "m_mixed": ("int8_mixed", 0.4, {1: 4.0, 8: 18.0}),
    "m_int8": ("int8", 2.5, {1: 3.0, 8: 12.0}),
}
D = RequestOptions()


@pytest.fixture
def policy():
    return Policy(make_manifest(SPECS))


def test_parse_defaults_and_values():
    assert parse_parameters({}, D) == D
    o = parse_parameters({"accuracy_budget": "0.5", "latency_budget_ms": 7, "objective": "max_accuracy"}, D)
    assert (o.accuracy_budget_points, o.latency_budget_ms, o.objective) == (0.5, 7.0, "max_accuracy")
    assert parse_parameters({"sequence_id": 0, "variant": " int8 "}, D).variant == "int8"


@pytest.mark.parametrize(
    "params,needle",
    [
        ({"accuracy_budget": -1}, "'accuracy_budget' must be a finite number >= 0"),
        ({"accuracy_budget": "abc"}, "'accuracy_budget' must be a number"),
        ({"accuracy_budget": True}, "boolean"),
        ({"latency_budget_ms": 0}, "'latency_budget_ms' must be a finite number > 0"),
        ({"latency_budget_ms": "nan"}, "finite"),
        ({"objective": "fastest"}, "'objective' must be one of"),
        ({"variant": ""}, "'variant' must be a non-empty string"),
    ],
)
def test_parse_rejects_bad_values(params, needle):
    with pytest.raises(RequestError, match=needle):
        parse_parameters(params, D)


def test_forced_variant_by_name_or_precision(policy):
    assert policy.rank(RequestOptions(variant="m_int8"))[0].variant == "m_int8"
    assert policy.rank(RequestOptions(variant="int8_mixed"))[0].variant == "m_mixed"
    with pytest.raises(RequestError, match="unknown variant 'x'.*known"):
        policy.rank(RequestOptions(variant="x"))


def test_min_latency_picks_fastest_within_budget(policy):
    assert policy.rank(RequestOptions(accuracy_budget_points=3.0))[0].variant == "m_int8"
    assert policy.rank(RequestOptions(accuracy_budget_points=1.0))[0].variant == "m_mixed"
    d = policy.rank(RequestOptions(accuracy_budget_points=0.0))[0]
    assert d.variant == "m_fp32" and "fastest within" in d.reason


def test_emulated_precision_never_chosen_for_speed_on_cpu(policy):
    ranked = [d.variant for d in policy.rank(RequestOptions(accuracy_budget_points=0.2))]
    assert "m_fp16" not in ranked
    gpu = Policy(make_manifest(SPECS, target="gpu"))
    assert "m_fp16" in [d.variant for d in gpu.rank(RequestOptions(accuracy_budget_points=0.2))]


def test_max_accuracy_within_latency_budget():
    policy = Policy(make_manifest(SPECS), latency_headroom=1.0)
    o = RequestOptions(objective="max_accuracy", latency_budget_ms=20.0, accuracy_budget_points=5)
    assert policy.rank(o, batch_size=8)[0].variant == "m_mixed"
    assert policy.rank(o, batch_size=1)[0].variant == "m_fp32"


def test_latency_headroom_keeps_a_margin_for_what_the_scheduler_cannot_see():
    o = RequestOptions(latency_budget_ms=20.0, accuracy_budget_points=5)
    assert (
        Policy(make_manifest(SPECS), latency_headroom=1.0).rank(o, batch_size=8)[0].variant == "m_mixed"
    )  # 18 <= 20
    assert (
        Policy(make_manifest(SPECS), latency_headroom=0.7).rank(o, batch_size=8)[0].variant == "m_int8"
    )  # 18 > 14
    with pytest.raises(ValueError, match="latency_headroom"):
        Policy(make_manifest(SPECS), latency_headroom=0.0)


def test_time_spent_upstream_counts_against_the_latency_budget():
    policy = Policy(make_manifest(SPECS), latency_headroom=1.0)
    o = RequestOptions(objective="max_accuracy", latency_budget_ms=20.0, accuracy_budget_points=5)
    assert policy.rank(o, batch_size=1, upstream_ms=0.0)[0].variant == "m_fp32"  # 5 ms fits 20
    d = policy.rank(o, batch_size=1, upstream_ms=16.5)[0]  # 3.5 ms left: int8 (3 ms) fits, mixed (4) not
    assert d.variant == "m_int8" and "16.5 ms already spent upstream" in d.reason
    d = policy.rank(o, batch_size=1, upstream_ms=30.0)[0]  # nothing fits: the fastest
    assert d.variant == "m_int8" and d.code == "degraded_latency" and "upstream" in d.reason
    # min_latency is about accuracy first: upstream time does not change it
    m = RequestOptions(objective="min_latency", accuracy_budget_points=1.0)
    assert policy.rank(m, upstream_ms=30.0)[0].variant == policy.rank(m)[0].variant == "m_mixed"


def test_nothing_fits_degrades_predictably(policy):
    o = RequestOptions(objective="max_accuracy", latency_budget_ms=1.0, accuracy_budget_points=1.0)
    d = policy.rank(o, batch_size=8)[0]
    assert d.variant == "m_mixed" and "no variant within latency budget" in d.reason


def test_fallbacks_follow_and_unhealthy_variants_are_skipped():
    state = LiveState(cooldown_s=10)
    p = Policy(make_manifest(SPECS), state)
    ranked = [d.variant for d in p.rank(RequestOptions(accuracy_budget_points=3.0), now=0)]
    assert ranked[0] == "m_int8" and set(ranked) == {"m_int8", "m_mixed", "m_fp32"}
    state.mark_unhealthy("m_int8", now=0)
    assert p.rank(RequestOptions(accuracy_budget_points=3.0), now=5)[0].variant == "m_mixed"
    assert p.rank(RequestOptions(accuracy_budget_points=3.0), now=11)[0].variant == "m_int8"


def test_predicted_latency_interpolates_and_extrapolates():
    m = make_manifest(SPECS)
    e = m.variant("m_fp32")
    assert predicted_latency_ms(e, 1) == 5.0
    assert math.isclose(predicted_latency_ms(e, 4), 5.0 + 27.0 * 3 / 7)
    assert predicted_latency_ms(e, 16) == 64.0


def test_most_accurate_means_highest_agreement_with_fp32_when_drop_says_otherwise():
    """The build of 2026-11-21: int8_mixed had the smaller top-1 drop (0.41 vs 0.81 points) but the lower
    agreement with fp32 (96.3% vs 97.2%). max_accuracy ranks by agreement, so the variants the scheduler serves
    under load are never less faithful to fp32 than static int8; the drop still bounds the candidates."""
    m = make_manifest(SPECS)
    m.variant("m_mixed").accuracy.agreement_with_fp32 = 0.963
    m.variant("m_int8").accuracy.agreement_with_fp32 = 0.972
    m.variant("m_mixed").accuracy.top1_drop_points = 0.41
    m.variant("m_int8").accuracy.top1_drop_points = 0.81
    p = Policy(m, latency_headroom=1.0)
    o = RequestOptions(objective="max_accuracy", latency_budget_ms=20.0, accuracy_budget_points=5)
    assert [d.variant for d in p.rank(o, batch_size=8)][:2] == ["m_int8", "m_mixed"]  # both fit 20 ms at b8
    assert p.rank(o, batch_size=1)[0].variant == "m_fp32"  # the reference is the most faithful
    # an accuracy budget between the two drops leaves int8 out, whatever its agreement
    tight = RequestOptions(objective="max_accuracy", latency_budget_ms=20.0, accuracy_budget_points=0.5)
    assert p.rank(tight, batch_size=8)[0].variant == "m_mixed"
    # equal agreement: the lower KL wins
    m.variant("m_mixed").accuracy.agreement_with_fp32 = 0.972
    m.variant("m_mixed").accuracy.kl_vs_fp32 = 0.005
    assert p.rank(o, batch_size=8)[0].variant == "m_mixed"
