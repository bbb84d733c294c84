"""Wilson intervals: known values, coverage on a synthetic binomial, edge cases."""
import numpy as np
import pytest

from mmjax.evals import shapes_checker
from mmjax.evals.intervals import rate_with_interval, wilson_interval


def test_known_values():
    # Reference values from the closed form (Wilson 1927), e.g. 5/10 -> [0.2366, 0.7634].
    assert wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-5)
    assert wilson_interval(0, 20) == pytest.approx((0.0, 0.161130), abs=1e-5)
    assert wilson_interval(20, 20) == pytest.approx((0.838870, 1.0), abs=1e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_coverage_is_close_to_95_percent_on_a_synthetic_binomial():
    rng = np.random.default_rng(0)
    for p, n in ((0.05, 512), (0.5, 512), (0.9, 64)):
        draws = rng.binomial(n, p, size=4000)
        covered = np.mean([lo <= p <= hi for lo, hi in (wilson_interval(k, n) for k in draws)])
        assert 0.93 <= covered <= 0.97, (p, n, covered)


def test_rate_with_interval_and_breakdown_by_object_count():
    out = rate_with_interval("acc", [1, 0, 1, 1])
    assert out["acc"] == 0.75 and out["acc_n"] == 4 and out["acc_lo"] < 0.75 < out["acc_hi"]
    results = [{"objects": [{"shape": True, "color": True, "size": True, "position": True,
                             "object": True}] * k, "count": True, "correct": k == 1}
               for k in (1, 1, 2, 3)]
    summary = shapes_checker._summarise(results)
    assert summary["prompt_acc_1obj"] == 1.0 and summary["prompt_acc_1obj_n"] == 2
    assert summary["prompt_acc_2obj"] == 0.0 and summary["prompt_acc_3obj_n"] == 1
    assert summary["prompt_acc"] == 0.5 and summary["prompt_acc_lo"] < 0.5 < summary["prompt_acc_hi"]
