"""Confidence cascades: margin, threshold calibration on synthetic logits, Pareto front, the scheduler's use of
them (policy and per-row escalation in the service), and the typed scheduler settings."""

import json

import numpy as np
import pytest

from tcsched.build_tools import repository as r
from tcsched.build_tools.cascade import (
    StageData,
    calibrate_cascade,
    candidate_chains,
    could_disagree,
    expected_batch_ms,
    pareto_front,
    plan_serving,
    risk_bound,
)
from tcsched.confidence import confidence_margin, served_stage
from tcsched.manifest import Manifest
from tcsched.scheduler.policy import Policy, RequestError, RequestOptions, parse_parameters
from tcsched.scheduler.service import SchedulerService
from tcsched.settings import DEFAULTS, SchedulerSettings
from tests.helpers import FakeBLS, make_manifest

P50 = {"m_int8": {1: 3.0, 8: 12.0}, "m_fp32": {1: 5.0, 8: 32.0}}


def synthetic(n=2000, classes=10, seed=0, noise=0.6):
    """fp32 logits with a known class; the fast stage disagrees mostly where its own margin is small."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(0, 1, (n, classes))
    ref[np.arange(n), rng.integers(0, classes, n)] += rng.uniform(0, 6, n)
    fast = ref + rng.normal(0, noise, ref.shape)
    return fast.astype(np.float32), ref.astype(np.float32)


def test_margin_is_top1_minus_top2_probability():
    m = confidence_margin(np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [np.nan, 1.0, 0.0]]))
    assert m[0] == pytest.approx(0.0) and m[1] > 0.99 and m[2] == 0.0
    with pytest.raises(ValueError, match="classes >= 2"):
        confidence_margin(np.zeros((3, 1)))
    assert served_stage([np.array([0.1, 0.5, 0.3])], [0.3]).tolist() == [1, 0, 0]


def _image_loss(stage_logits, ref, threshold):
    """bool [N]: the row is served by the fast stage and could disagree with fp32 there (one row per image)."""
    return (confidence_margin(stage_logits) >= threshold) & could_disagree(stage_logits, ref)


def test_calibration_meets_the_risk_bound_at_the_lowest_escalation():
    fast, ref = synthetic()
    n = len(ref)
    prof = calibrate_cascade(
        [StageData("m_int8", fast), StageData("m_fp32", ref)],
        ref,
        np.arange(n),
        P50,
        "synthetic",
        targets=(0.97, 0.99),
    )
    assert prof.label == "int8>fp32" and [op.target_agreement for op in prof.operating_points] == [0.97, 0.99]
    base = float(np.mean(fast.argmax(1) == ref.argmax(1)))
    assert base < 0.97  # the cascade has work to do
    m = confidence_margin(fast)
    flagged = could_disagree(fast, ref)
    rates = []
    for op in prof.operating_points:
        t = op.thresholds[0]
        # the rule: the conformal bound (losses + 1) / (n + 1) over the images is within 1 - target
        assert op.met and risk_bound(_image_loss(fast, ref, t)) <= 1 - op.target_agreement + 1e-12
        esc = m < t
        served_ok = np.where(esc, True, fast.argmax(1) == ref.argmax(1))
        assert served_ok.mean() == pytest.approx(op.agreement) and esc.mean() == pytest.approx(
            op.escalation_rate
        )
        assert op.agreement >= op.target_agreement  # flagged rows include every disagreement
        # serving one more flagged row (the most confident flagged row below the threshold) breaks the bound
        below = m[flagged & (m < t)]
        assert len(below) and risk_bound(_image_loss(fast, ref, below.max())) > 1 - op.target_agreement
        rates.append(op.escalation_rate)
        assert op.expected_latency_ms_by_batch[1] == pytest.approx(3.0 + op.escalation_rate * 5.0)
    assert rates[0] < rates[1]  # a higher target costs more escalations


def test_could_disagree_flags_every_disagreement_and_none_of_an_identical_stage():
    fast, ref = synthetic(seed=4, noise=1.0)
    flagged = could_disagree(fast, ref)
    disagree = fast.argmax(1) != ref.argmax(1)
    assert disagree.any() and flagged[disagree].all() and flagged.sum() > disagree.sum()
    assert not could_disagree(ref + 1.0, ref).any()  # same softmax: nothing can flip
    with pytest.raises(ValueError, match="one shape"):
        could_disagree(fast[:, :5], ref)
    assert risk_bound(np.zeros(199)) == pytest.approx(0.005)
    with pytest.raises(ValueError, match="one loss per image"):
        risk_bound(np.zeros((2, 2)))


def test_a_confident_disagreement_raises_the_threshold_and_the_views_of_an_image_count_once():
    # 300 images x 2 views; the fast stage equals fp32 except on image 0, where view 1 disagrees confidently
    rng = np.random.default_rng(5)
    n, classes = 300, 10
    ref = rng.normal(0, 1, (n, classes))
    ref[np.arange(n), rng.integers(0, classes, n)] += rng.uniform(2, 8, n)
    ref = np.concatenate([ref, ref + 0.01]).astype(np.float32)
    fast = ref.copy()
    fast[n, :] = 0.0
    fast[n, (ref[n].argmax() + 1) % classes] = 8.0  # margin ~0.99, a class fp32 does not pick
    groups = np.tile(np.arange(n), 2)
    p50 = {"m_fast": {1: 1.0, 8: 4.0}, "m_fp32": P50["m_fp32"]}
    prof = calibrate_cascade(
        [StageData("m_fast", fast), StageData("m_fp32", ref)],
        ref,
        groups,
        p50,
        "synthetic",
        targets=(0.99, 0.995),
    )
    loose, strict = prof.operating_points
    # 0.99 allows floor(0.01 * 301 - 1) = 2 images with a loss: the confident one is served, nothing escalates
    assert loose.met and loose.thresholds == [0.0] and loose.agreement < 1.0
    # 0.995 allows 0: the threshold goes above margin 0.99, and the bound counts the image once (n = 300)
    m = confidence_margin(fast[n : n + 1])[0]
    assert strict.met and strict.thresholds[0] > m and strict.agreement == 1.0 and strict.n_images == n
    # fewer images than 1 / (1 - target) - 1 cannot certify it: not met, every row escalates
    few = calibrate_cascade(
        [StageData("m_fast", fast[:150]), StageData("m_fp32", ref[:150])],
        ref[:150],
        np.arange(150),
        p50,
        "synthetic",
        targets=(0.995,),
    ).operating_points[0]
    assert not few.met and few.escalation_rate == 1.0


def test_evaluation_check_and_unreachable_target():
    fast, ref = synthetic(seed=1)
    wrong_ref = ref.copy()
    prof = calibrate_cascade(
        [StageData("m_int8", fast), StageData("m_fp16", fast)],  # last stage no better than the first
        wrong_ref,
        np.arange(len(ref)),
        {**P50, "m_fp16": {1: 50.0, 8: 400.0}},
        "synthetic",
        evaluation=([fast, fast], ref, "eval"),
        targets=(0.999,),
    )
    op = prof.operating_points[0]
    assert not op.met and op.evaluation is not None and op.evaluation.n_images == len(ref)


def test_three_stage_chain_and_candidate_chains():
    fast, ref = synthetic(n=600, seed=2)
    mid = (ref + np.random.default_rng(3).normal(0, 0.3, ref.shape)).astype(np.float32)
    p50 = {**P50, "m_mid": {1: 4.0, 8: 20.0}}
    assert candidate_chains(["m_int8", "m_mid", "m_fp32"], "m_fp32", p50) == [
        ["m_int8", "m_fp32"],
        ["m_mid", "m_fp32"],
        ["m_int8", "m_mid", "m_fp32"],
    ]
    prof = calibrate_cascade(
        [StageData("m_int8", fast), StageData("m_mid", mid), StageData("m_fp32", ref)],
        ref,
        np.arange(len(ref)),
        p50,
        "synthetic",
        targets=(0.98,),
    )
    op = prof.operating_points[0]
    assert (
        op.met
        and len(op.thresholds) == 2
        and op.reach_rates[0] == 1.0 >= op.reach_rates[1] >= op.reach_rates[2]
    )


def test_expected_batch_ms_is_binomial():
    # one later stage reached by half the rows, batch 2: P(K=1) = 0.5 -> 5 ms, P(K=2) = 0.25 -> 5 + (32-5)/7 ms
    got = expected_batch_ms([1.0, 0.5], [P50["m_int8"], P50["m_fp32"]], [2])[2]
    assert got == pytest.approx((3 + 9 / 7) + 0.5 * 5 + 0.25 * (5 + 27 / 7))


def test_pareto_front_drops_slower_and_not_more_accurate():
    rng = np.random.default_rng(0)
    n = 400
    a_int8 = rng.random(n) < 0.96
    agree = {
        "m_fp32": np.ones(n, bool),
        "m_int8": a_int8,
        "m_mixed": a_int8.copy(),
        "m_better": np.ones(n, bool),
    }
    p50 = {**P50, "m_mixed": {1: 4.0, 8: 18.0}, "m_better": {1: 4.5, 8: 20.0}}
    v = pareto_front(agree, p50, "m_fp32")
    assert v["m_fp32"].on_front and v["m_int8"].on_front
    assert not v["m_mixed"].on_front and "m_int8 is faster" in v["m_mixed"].reason
    assert v["m_better"].on_front  # slower than int8 but significantly more accurate (4 points, n=400)


def _cascade_manifest(fast=None, ref=None, int8_drop: float = 2.5):
    """m_fp32 and m_int8 with the int8>fp32 cascade calibrated on synthetic logits (default: ~25% escalated at
    0.99, cheaper than fp32 alone), through the manifest's JSON round trip."""
    if fast is None:
        fast, ref = synthetic(n=800, seed=4, noise=0.3)
    m = make_manifest({"m_fp32": ("fp32", 0.0, P50["m_fp32"]), "m_int8": ("int8", int8_drop, P50["m_int8"])})
    plan = plan_serving(
        {"m_fp32": True, "m_int8": True},
        "m_fp32",
        {"m_fp32": ref, "m_int8": fast},
        np.arange(len(ref)),
        {"m_fp32": ref, "m_int8": fast},
        P50,
        "synthetic",
        "synthetic",
    )
    m.cascades = plan.cascades
    return Manifest.model_validate_json(m.model_dump_json())


def test_policy_picks_the_cascade_and_respects_min_agreement_and_budgets():
    m = _cascade_manifest()
    p = Policy(m)
    d = p.rank(RequestOptions(min_agreement=0.99))[0]
    assert d.cascade == "int8>fp32" and d.chain == ("m_int8", "m_fp32") and d.target_agreement == 0.99
    assert d.code == "cascade_min_latency:int8>fp32"
    d995 = p.rank(RequestOptions(min_agreement=0.995))[0]
    assert d995.thresholds[0] > d.thresholds[0]  # a higher target escalates more
    assert p.rank(RequestOptions(min_agreement=1.0))[0].chain == ("m_fp32",)  # only the reference reaches 1
    # accuracy_budget alone: one variant, the old rules (int8's drop 2.5 > 1 -> fp32)
    single = parse_parameters({"accuracy_budget": 1.0}, RequestOptions(min_agreement=0.99))
    assert single.min_agreement is None and p.rank(single)[0].chain == ("m_fp32",)
    # max_accuracy with a roomy latency budget: the reference alone (agreement 1) fits
    roomy = p.rank(RequestOptions(min_agreement=0.99, latency_budget_ms=100.0))[0]
    assert roomy.chain == ("m_fp32",) and roomy.escalation_budget_ms == pytest.approx(70.0)
    tight = p.rank(RequestOptions(min_agreement=0.99, latency_budget_ms=5.5), batch_size=1)[0]
    assert (
        tight.cascade == "int8>fp32"
    )  # 5 ms fp32 > 0.7 x 5.5 ms; the cascade's expectation fits or degrades


@pytest.mark.parametrize("value", [0, -0.5, 1.5, "x", "nan", True])
def test_min_agreement_bad_values_are_refused(value):
    with pytest.raises(RequestError, match="min_agreement"):
        parse_parameters({"min_agreement": value}, RequestOptions())


def test_long_bad_values_are_quoted_short():
    with pytest.raises(RequestError) as e:
        parse_parameters({"objective": "x" * 100_000}, RequestOptions())
    assert len(str(e.value)) < 300 and "100002 characters" in str(e.value)


class Stage(FakeBLS):
    """The fast stage is confident on rows whose input is > 0, fp32 on all."""

    def logits(self, variant, batch):
        v = batch[:, 0, 0, 0]
        out = np.zeros((len(batch), 10), np.float32)
        out[:, 0] = np.where(v > 0, 20.0, 0.01) if variant == "m_int8" else 20.0
        out[:, 1] = 7.0 if variant == "m_fp32" else 0.0  # marks the stage that answered
        return out


def test_service_escalates_only_low_margin_rows_and_reports_them_per_row():
    m = _cascade_manifest()
    infer = Stage()
    svc = SchedulerService(Policy(m), RequestOptions(min_agreement=0.99), infer)
    x = np.ones((4, 3, 2, 2), np.float32)
    x[[1, 3]] = -1.0  # rows 1 and 3: the fast stage is unsure
    out = svc.handle([({}, x)])[0]
    assert infer.calls == [("m_int8", 4), ("m_fp32", 2)]
    assert out.logits[:, 1].tolist() == [0.0, 7.0, 0.0, 7.0]
    rows = [json.loads(s) for s in out.decision_jsons()]
    assert [r["escalated"] for r in rows] == [False, True, False, True]
    assert [r["variant"] for r in rows] == ["m_int8", "m_fp32", "m_int8", "m_fp32"]
    assert rows[1]["confidence_margin"] < rows[1]["threshold"] <= rows[0]["confidence_margin"]
    assert rows[0]["cascade"] == "int8>fp32" and rows[0]["target_agreement"] == 0.99


def test_escalation_is_limited_by_the_latency_budget_lowest_margins_first():
    m = _cascade_manifest()
    p = Policy(m, latency_headroom=1.0)
    d = p.rank(RequestOptions(min_agreement=0.99, latency_budget_ms=6.0, objective="min_latency"))[0]
    assert d.escalation_budget_ms is None  # min_latency: no run-time limit
    d = p.rank(RequestOptions(min_agreement=0.99, latency_budget_ms=9.0), batch_size=4)[0]
    assert d.escalation_budget_ms == pytest.approx(9.0)
    # fp32 costs 5 ms at 1 row, 5 + 27/7 at 2: 6 ms left pays for 1 row, 9 ms for 2; monotone in what is left
    assert p.escalation_allowance(d, 1, 2, spent_ms=3.0) == 1
    assert p.escalation_allowance(d, 1, 2, spent_ms=0.0) == 2
    assert p.escalation_allowance(d, 1, 2, spent_ms=8.0) == 0
    assert [p.escalation_allowance(d, 1, 8, s) for s in (0, 2, 4, 6, 8)] == sorted(
        (p.escalation_allowance(d, 1, 8, s) for s in (0, 2, 4, 6, 8)), reverse=True
    )


def test_failed_escalation_keeps_the_first_stage_answer_and_says_so():
    m = _cascade_manifest()
    svc = SchedulerService(Policy(m), RequestOptions(min_agreement=0.99), Stage(failing={"m_fp32"}))
    x = -np.ones((2, 3, 2, 2), np.float32)
    out = svc.handle([({}, x)])[0]
    row = json.loads(out.decision_json(0))
    assert row["escalated"] is False and "escalation to m_fp32 failed" in row["escalation_note"]
    assert not svc.policy.state.healthy("m_fp32")


def test_scheduler_settings_round_trip_through_config_pbtxt(tmp_path):
    s = SchedulerSettings(default_min_agreement=0.995, default_latency_budget_ms=40.0, latency_headroom=0.6)
    cfg = r.scheduler_config(r.ServingOptions(scheduler=s), [3, 224, 224], 1000)
    parsed = r.parse(r.render(cfg))
    params = {k: v.string_value for k, v in parsed.parameters.items()}
    assert SchedulerSettings.from_parameters(params) == s
    assert SchedulerSettings.from_parameters({}) == DEFAULTS  # one default per knob
    none = SchedulerSettings.from_parameters({**params, "default_min_agreement": ""})
    assert none.default_min_agreement is None
    with pytest.raises(ValueError, match="unknown scheduler parameter.*lattency"):
        SchedulerSettings.from_parameters({"lattency_headroom": "0.5"})
    with pytest.raises(ValueError, match="latency_headroom"):
        SchedulerSettings.from_parameters({"latency_headroom": "2"})
    opts = RequestOptions.from_settings(s)
    assert (opts.min_agreement, opts.latency_budget_ms) == (0.995, 40.0)


def test_a_later_stage_is_loaded_only_by_the_rows_that_reach_it():
    """At 150 images/s fp32 alone would be saturated (u = 0.15/ms x 5 ms = 0.75 at batch 1, over 0.7), but a
    cascade's fp32 stage sees only its reach rate of them: escalations still fit the latency budget."""
    from tcsched.scheduler.live import LoadTracker

    m = _cascade_manifest()
    p = Policy(m, latency_headroom=1.0, max_utilization=0.7)
    load = LoadTracker()
    load.arrival_per_ms = 0.15
    d = p.rank(RequestOptions(min_agreement=0.99, latency_budget_ms=40.0), batch_size=1, load=load)[0]
    assert d.cascade == "int8>fp32" and 0 < d.reach_rates[1] < 0.5
    ref = m.variant("m_fp32")
    assert p.predict(ref, 1, load) >= 100 * 5.0 - 1e-9  # alone: cannot keep up
    assert p.predict(ref, 1, load, share=d.reach_rates[1]) < 10.0
    assert p.escalation_allowance(d, 1, 1, spent_ms=5.0, load=load) == 1


def test_zoom_views_of_the_cascade_calibration_are_centre_zooms_and_their_flips():
    from tcsched.build_tools.augment import label_preserving_views
    from tcsched.build_tools.serving import EXTRA_ZOOMS, _zoom_views

    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    v = _zoom_views(x)
    assert len(EXTRA_ZOOMS) == 2 and v.shape == (4 * 3, 3, 32, 32)
    z0 = label_preserving_views(x, zoom=EXTRA_ZOOMS[0])
    assert np.array_equal(v[:3], z0[6:9]) and np.array_equal(v[3:6], v[:3][..., ::-1])
    assert not np.array_equal(v[:3], v[6:9])  # the two zooms differ


def test_run_names_a_threshold_0_plan_as_its_first_stage_alone():
    """A cascade whose first stage alone met the target (identical logits: threshold 0) escalates nothing; `tcsched
    run` says so and shows the build's batch-1 costs instead of a bare '0 of N escalated'."""
    from types import SimpleNamespace

    from tcsched.cli.client_cmds import _cascade_summary, _cascade_text

    _, ref = synthetic(n=400, seed=5, noise=0.3)
    m = _cascade_manifest(fast=ref, ref=ref, int8_drop=0.0)
    d = Policy(m).rank(RequestOptions(min_agreement=0.99), batch_size=1)[0]
    assert d.cascade == "int8>fp32" and d.thresholds[0] == 0.0
    svc = SchedulerService(Policy(m), RequestOptions(min_agreement=0.99), Stage())
    rows = [json.loads(s) for s in svc.handle([({}, -np.ones((2, 3, 2, 2), np.float32))])[0].decision_jsons()]
    assert [r["escalated"] for r in rows] == [False, False] and rows[0]["threshold"] == 0.0
    assert _cascade_text(rows[0]) == "int8>fp32: int8 alone (threshold 0)"
    served = [SimpleNamespace(decision=r, escalated=r["escalated"]) for r in rows]
    line = _cascade_summary(m, served)
    assert "threshold 0: int8 alone met the target" in line and "2 served" in line
    assert line.index("int8>fp32 3.00 ms") < line.index("m_fp32 alone 5.00 ms")
    # a plan that can escalate keeps the count
    m2 = _cascade_manifest()
    svc2 = SchedulerService(Policy(m2), RequestOptions(min_agreement=0.99), Stage())
    x = np.ones((2, 3, 2, 2), np.float32)
    x[1] = -1.0
    rows2 = [json.loads(s) for s in svc2.handle([({}, x)])[0].decision_jsons()]
    served2 = [SimpleNamespace(decision=r, escalated=r["escalated"]) for r in rows2]
    assert _cascade_summary(m2, served2).endswith("1 of 2 images escalated")
    assert "escalated (margin" in _cascade_text(rows2[1])
