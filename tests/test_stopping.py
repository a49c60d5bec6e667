"""The stopping rule: a hopeless curve is stopped, a promising one is not."""

from paretoslim.search._stopping import (
    Rung,
    RungPoint,
    halving_reason,
    projected_quality,
    promotion_reason,
    stop_reason,
)

LIMIT = 0.924  # teacher 0.934 on the slice, at most 1 point lower


def curve(*points, steps=400):
    return [Rung(step, steps, q) for step, q in points]


def test_a_first_rung_never_stops():
    assert stop_reason(curve((0, 0.10)), LIMIT, 0.005) is None
    assert stop_reason(curve((0, 0.10), (100, 0.60)), LIMIT, 0.005) is None  # steep rise


def test_a_flat_curve_far_below_the_limit_is_stopped():
    hopeless = curve((0, 0.30), (100, 0.880), (200, 0.885))
    assert abs(projected_quality(hopeless) - 0.895) < 1e-9
    reason = stop_reason(hopeless, LIMIT, 0.005)
    assert reason is not None and "step 200/400" in reason and "0.8850" in reason


def test_a_curve_still_rising_enough_is_not_stopped():
    rising = curve((0, 0.30), (100, 0.880), (200, 0.905))  # +0.025 per 100 steps
    assert projected_quality(rising) >= 0.95
    assert stop_reason(rising, LIMIT, 0.005) is None


def test_the_slack_keeps_a_near_miss_running():
    near = curve((0, 0.5), (100, 0.915), (200, 0.918))  # projects 0.924
    assert stop_reason(near, LIMIT + 0.004, 0.005) is None
    assert stop_reason(near, LIMIT + 0.004, 0.0) is not None


def test_a_falling_curve_projects_its_last_quality():
    falling = curve((0, 0.5), (100, 0.90), (200, 0.89))
    assert projected_quality(falling) == 0.89
    assert stop_reason(falling, LIMIT, 0.005) is not None
    assert stop_reason(falling, 0.89, 0.0) is None


def test_a_near_miss_is_promoted_and_a_curve_reaching_the_limit_is_not():
    near = curve((0, 0.5), (100, 0.915), (200, 0.918))  # projects 0.924
    reason = promotion_reason(near, LIMIT + 0.004, 0.005)
    assert reason is not None and "step 200/400" in reason
    assert promotion_reason(near, LIMIT, 0.005) is None  # it reaches the limit
    assert promotion_reason(near, LIMIT + 0.006, 0.005) is None  # too far short
    assert promotion_reason(near, LIMIT + 0.006, 0.01) is not None  # a wider margin
    assert promotion_reason(curve((0, 0.5)), LIMIT, 0.005) is None  # no slope yet
    # a candidate picked for a promotion is promoted though its projection reaches the limit
    assert promotion_reason(near, LIMIT, 0.005, wanted=True) is not None
    assert promotion_reason(near, LIMIT + 0.006, 0.005, wanted=True) is None  # still too far


def test_an_extended_schedule_continues_the_learning_rate_and_ends_at_zero():
    from paretoslim.spaces._distill import _Cosine

    cosine = _Cosine(100)
    assert cosine(0) == 1.0 and abs(cosine(50) - 0.5) < 1e-9
    cosine.extend(50, 400)
    assert abs(cosine(50) - 0.5) < 1e-9  # no jump at the promotion
    assert 0.0 < cosine(200) < 0.5 and abs(cosine(400)) < 1e-9


def test_a_curve_far_below_the_limit_is_not_promoted():
    far = curve((0, 0.5), (100, 0.88), (200, 0.885))  # projects 0.895, 2.9 points short
    assert promotion_reason(far, LIMIT, 0.01) is None
    assert promotion_reason(far, LIMIT, 0.05) is not None


def point(quality, latency, size, fraction=0.25):
    return RungPoint(fraction, quality, latency, size)


def test_halving_stops_a_trial_ranked_behind_the_best_share_of_its_rung():
    # fronts: {0.92, 0.80 (fastest)}, then 0.91 (behind 0.92 on every axis), then 0.90
    earlier = [point(0.92, 1.0, 0.1), point(0.91, 1.5, 0.2), point(0.80, 0.5, 0.05)]
    behind = point(0.90, 2.0, 0.3)
    reason = halving_reason(behind, earlier, 2)  # the best 2 of 4 go on
    assert reason is not None and "3 of the 4 trials" in reason and "best 2 go on" in reason
    assert halving_reason(point(0.915, 1.2, 0.15), earlier, 2) is not None  # 2 ahead
    assert halving_reason(point(0.915, 1.2, 0.15), earlier[:2], 2) is None  # 1 ahead of 3
    # a trade-off point (fastest, worst quality) is on the first front: it goes on
    assert halving_reason(point(0.70, 0.1, 0.01), earlier, 2) is None
    # eta 4: only the best one of 4 goes on
    assert halving_reason(point(0.915, 1.2, 0.15), earlier, 4) is not None


def test_halving_compares_only_the_same_rung_and_waits_for_eta_trials():
    earlier = [point(0.92, 1.0, 0.1), point(0.95, 0.5, 0.05, fraction=0.5)]
    assert halving_reason(point(0.80, 2.0, 0.3), earlier, 3) is None  # 2 at this rung
    assert halving_reason(point(0.80, 2.0, 0.3), earlier, 2) is not None
    assert halving_reason(point(0.80, 2.0, 0.3), earlier, 0) is None  # off
    equal = point(0.92, 1.0, 0.1)
    assert halving_reason(equal, earlier, 2) is None  # an equal point is not dominated
