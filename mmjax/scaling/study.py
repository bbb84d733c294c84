"""MoT vs dense at equal FLOPs: at what fraction of the dense model's compute does MoT match it?

Definition (Liang et al., "Mixture-of-Transformers", as in /work/shared/REFERENCES.md): train
both for the same steps at equal active FLOPs per token; for each modality take the dense model's
final validation loss L_d and the FLOPs C_d it took; find the first FLOPs C_m at which MoT's
validation curve reaches L_d; report C_m / C_d (the paper: 55.8% in the Chameleon 7B setting).

C_m is interpolated linearly between the two evaluations around the crossing. When MoT is below
L_d already at its first evaluation, the crossing lies before it: the fraction is then an upper
bound (flagged). When MoT never reaches L_d the fraction is None (MoT needs more than dense).
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np


def crossing(flops: Sequence[float], losses: Sequence[float], target: float
             ) -> tuple[float | None, bool]:
    """(first FLOPs at which the piecewise-linear curve reaches `target`, is_upper_bound)."""
    f = np.asarray(flops, np.float64)
    y = np.asarray(losses, np.float64)
    if f.shape != y.shape or f.size == 0:
        raise ValueError(f"crossing: flops and losses must be equal-length and non-empty, "
                         f"got {f.shape} and {y.shape}")
    if np.any(np.diff(f) <= 0):
        raise ValueError("crossing: flops must be strictly increasing")
    below = np.nonzero(y <= target)[0]
    if below.size == 0:
        return None, False
    i = int(below[0])
    if i == 0:
        return float(f[0]), True
    # Linear between (f[i-1], y[i-1] > target) and (f[i], y[i] <= target).
    frac = (y[i - 1] - target) / (y[i - 1] - y[i])
    return float(f[i - 1] + frac * (f[i] - f[i - 1])), False


def flops_fraction(baseline: Sequence[Mapping[str, float]],
                   candidate: Sequence[Mapping[str, float]], key: str) -> dict[str, Any]:
    """Fraction of the baseline's FLOPs at which `candidate` first reaches its final `key` loss.

    Curves are [{flops, <key>}, ...] in training order (a result's `curve`).
    """
    b = [(c["flops"], c[key]) for c in baseline if key in c]
    m = [(c["flops"], c[key]) for c in candidate if key in c]
    if not b or not m:
        raise ValueError(f"flops_fraction: no {key!r} values in the "
                         f"{'baseline' if not b else 'candidate'} curve")
    target, base_flops = b[-1][1], b[-1][0]
    at, upper = crossing([f for f, _ in m], [l for _, l in m], target)
    return {"baseline_final_loss": float(target), "baseline_flops": float(base_flops),
            "candidate_final_loss": float(m[-1][1]), "candidate_flops_at_match": at,
            "fraction": None if at is None else at / base_flops, "upper_bound": upper}


def pairs(results: Sequence[Mapping], baseline: str, candidate: str
          ) -> list[tuple[Mapping, Mapping]]:
    """(baseline run, candidate run) with the same size, budget and seed (seeds axis)."""
    by_key = {(r["size"], r["budget"], _seed(r), r["arch"]): r for r in results}
    out = [(by_key[(s, b, k, baseline)], by_key[(s, b, k, candidate)])
           for (s, b, k, a) in sorted(by_key)
           if a == baseline and (s, b, k, candidate) in by_key]
    return out


def _seed(run: Mapping) -> int:
    """A run's seed (-1 for results written before runs recorded one)."""
    return -1 if run.get("seed") is None else int(run["seed"])


def compare(results: Sequence[Mapping], baseline: str, candidate: str, keys: Sequence[str],
            out_dir: str) -> dict[str, Any]:
    """FLOPs fractions per modality for every (size, budget) pair, plus one figure per pair."""
    matched = pairs(results, baseline, candidate)
    if not matched:
        archs = sorted({r["arch"] for r in results})
        raise ValueError(f"sweep.compare={baseline, candidate}: no (size, budget) has both "
                         f"archs among the finished runs (archs present: {archs})")
    seeded = len({_seed(r) for r in results}) > 1  # a seeds axis: one entry per seed
    out = {}
    for base_run, cand_run in matched:
        tag = f"{base_run['size']}_{base_run['budget']}" + \
            (f"_seed{_seed(base_run)}" if seeded else "")
        entry: dict[str, Any] = {
            "baseline": base_run["name"], "candidate": cand_run["name"],
            "flops_ratio": cand_run["flops"] / base_run["flops"],  # 1 when FLOPs-matched
            "params_total": {baseline: base_run["n_params_total"],
                             candidate: cand_run["n_params_total"]},
            "wall_s": {baseline: base_run["wall_s"], candidate: cand_run["wall_s"]}}
        for key in keys:
            try:
                entry[key] = flops_fraction(base_run["curve"], cand_run["curve"], key)
            except ValueError as e:
                logging.warning("mot_vs_dense %s %s: %s", tag, key, e)
                entry[key] = {"error": str(e)}
        entry["figure"] = os.path.basename(plot_comparison(
            base_run, cand_run, keys, entry, os.path.join(out_dir, f"mot_vs_dense_{tag}.png")))
        out[tag] = entry
    return out


def plot_comparison(base_run: Mapping, cand_run: Mapping, keys: Sequence[str],
                    entry: Mapping, path: str) -> str:
    """Validation loss vs training FLOPs of both runs, one panel per loss key."""
    from mmjax.scaling import plots  # Picks the Agg backend before pyplot is imported.
    plt = plots.plt
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for run, style in ((base_run, "k-o"), (cand_run, "C1-o")):
            c = [(p["flops"], p[key]) for p in run["curve"] if key in p]
            if c:
                ax.plot(*zip(*c), style, ms=3, lw=1.2, label=run["arch"])
        info = entry.get(key, {})
        if info.get("fraction") is not None:
            ax.axhline(info["baseline_final_loss"], color="gray", ls=":", lw=1)
            ax.axvline(info["candidate_flops_at_match"], color="C1", ls=":", lw=1)
            bound = "<=" if info["upper_bound"] else ""
            ax.set_title(f"{key}: {cand_run['arch']} matches at {bound}"
                         f"{100 * info['fraction']:.1f}% FLOPs", fontsize=9)
        else:
            ax.set_title(f"{key}: {cand_run['arch']} does not match", fontsize=9)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel(f"validation {key}")
        ax.legend(fontsize=7)
    return plots._save(fig, path)  # noqa: SLF001  (same package: one place saves figures)


def summarize(comparison: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """Per key, the fractions over all pairs (what a report line quotes)."""
    out = {}
    for key in keys:
        vals = [e[key].get("fraction") for e in comparison.values() if key in e]
        out[key] = [None if v is None or not math.isfinite(v) else round(v, 4) for v in vals]
    return out
