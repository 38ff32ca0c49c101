"""The interleaved overhead measurement's statistics (tcsched.client.overhead), plain numpy."""

import numpy as np
import pytest

from tcsched.client.overhead import ratio_of_medians, summarize


def test_ratio_of_medians_and_its_interval():
    rng = np.random.default_rng(1)
    den = 10 + rng.normal(0, 0.5, 400)
    num = 1.1 * den + rng.normal(0, 0.2, 400)
    e = ratio_of_medians(num, den)
    assert e.ratio == pytest.approx(np.median(num) / np.median(den))
    assert e.low < e.ratio < e.high
    assert e.low > 1.05 and e.high < 1.15  # 400 paired rounds pin a 1.10 ratio to a few percent
    exact = ratio_of_medians([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert (exact.ratio, exact.low, exact.high) == (2.0, 2.0, 2.0)


def test_ratio_of_medians_rejects_unpaired_series():
    with pytest.raises(ValueError, match="equal-length"):
        ratio_of_medians([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=">= 2 rounds"):
        ratio_of_medians([1.0], [1.0])


def test_summarize_names_the_ratios_it_can_form():
    t = {"variant": [5.0, 5.2, 5.1], "scheduler": [6.0, 6.3, 6.1], "ensemble": [9.0, 9.5, 9.2]}
    r = summarize("v", t)
    assert r.rounds == 3 and r.p50_ms["scheduler"] == pytest.approx(6.1)
    assert set(r.ratios) == {"scheduler_over_direct", "ensemble_over_direct"}  # no pipeline measured
    assert r.ratios["scheduler_over_direct"].ratio == pytest.approx(6.1 / 5.1)
