"""Confidence intervals for accuracies: every rate mmjax reports carries one.

Why Wilson (score) intervals: accuracies here are often near 0 or 1 and counted over a few
hundred prompts, where the normal approximation (p +- z sqrt(p(1-p)/n)) leaves [0, 1] or
collapses to a point at p = 0; Wilson's interval stays inside [0, 1], is never empty, and has
close to nominal coverage at these sizes (Brown, Cai & DasGupta 2001).
"""
from __future__ import annotations

import math

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: float, trials: int, z: float = Z_95) -> tuple[float, float]:
    """(low, high) Wilson score interval of a rate `successes / trials`; (0, 1) for 0 trials."""
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(f"wilson_interval: need 0 <= successes <= trials, got {successes}/{trials}")
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    z2 = z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def rate_with_interval(name: str, hits, z: float = Z_95) -> dict[str, float]:
    """{name: mean, name_lo, name_hi, name_n} of a sequence of 0/1 outcomes."""
    hits = [float(h) for h in hits]
    n = len(hits)
    mean = sum(hits) / n if n else 0.0
    low, high = wilson_interval(sum(hits), n, z)
    return {name: mean, f"{name}_lo": low, f"{name}_hi": high, f"{name}_n": float(n)}
