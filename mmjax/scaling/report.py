"""Sweep report: scaling-law fits, compute-optimal sizes and figures from the runs' result.json.

A result (one per finished point, written by mmjax.scaling.sweep) holds: name, index, size,
budget, arch, seed and shuffle_seed (the run's config.seed, data.shuffle_seed), overrides, model (sizes), vocab_size, seq_len, batch_size, steps, tokens
(= steps * batch * seq_len positions), image_fraction, train_flops_per_token, flops (analytic
training FLOPs = flops_per_token * tokens), flops_budget,
n_params_{total,active,non_embedding,backbone},
the final validation losses (loss, text_loss, image_loss), validation (all final val metrics),
curve / train_curve ([{step, tokens, flops, <loss keys>}]), wall_s and attempts.

`report` writes `<sweep_dir>/results.json` (all results) and `<sweep_dir>/report/report.json` +
PNGs. For each architecture and loss key ("scaling" analysis):
- Henighan L(N): power law over the sizes, each at its largest budget.
- Henighan L(C): power law over the compute frontier (lower envelope of the validation curves
  from `sweep.frontier_from` of each run on).
- Chinchilla approach 3 L(N, D) over all final points (every seed a point); R^2 in-sample and on
  held-out points (the largest size, fitted on the rest); 95% bootstrap intervals of E, A, B,
  alpha, beta (resampling runs, `sweep.bootstrap_samples`, fixed `sweep.bootstrap_seed`);
  `degenerate` notes (E ~ 0: no loss floor; an exponent on its bound).
- N_opt(C), D_opt(C) over and beyond the sweep's range, minimising the fitted L(N, D) under the
  compute the runs actually spend: C = f(N) D with f the analytic training FLOPs per token of
  mmjax.flops (attention, LM head, image head included) interpolated over the sweep's sizes
  (fits.interpolate_flops_per_token);
  `compute_optimal_flops` says so, each row gives the 6ND of its optimum for comparison and
  bootstrap intervals of N_opt, D_opt.
- With a seeds axis: `seeds`, the mean / spread of the final loss per (size, budget); isoFLOP
  profiles are fitted to the means and the figures carry min-max error bars.
- Figures: loss vs FLOPs with the fitted frontier, isoFLOP profiles, fitted laws.
A fit that cannot be made (too few points) is recorded as {"error": ...} and logged, not skipped
silently. The "mot_vs_dense" analysis lives in mmjax.scaling.study.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import subprocess
import sys
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mmjax import io
from mmjax.scaling import fits, plots


def read_results(sweep_dir: str) -> list[dict]:
    """Every finished point's result.json, ordered by point index."""
    out = []
    for path in glob.glob(os.path.join(sweep_dir, "runs", "*", "result.json")):
        with open(path) as f:
            out.append(json.load(f))
    return sorted(out, key=lambda r: (r.get("index", 0), r["name"]))


def fit_points(results: Sequence[Mapping], loss_key: str, param_key: str) -> list[dict]:
    """Runs in the form fits/plots take: {name, n_params, tokens, flops, loss, curve}."""
    out = []
    for r in results:
        loss = r.get(loss_key)
        if loss is None or not math.isfinite(loss) or loss <= 0:
            continue
        curve = [(c["flops"], c[loss_key]) for c in r.get("curve", [])
                 if loss_key in c and c["flops"] > 0 and c[loss_key] > 0]
        out.append({"name": r["name"], "size": r["size"], "budget": r.get("budget", ""),
                    "seed": r.get("seed"), "n_params": float(r[param_key]),
                    "tokens": float(r["tokens"]), "flops": float(r["flops"]),
                    # Analytic training FLOPs per token (flops = this x tokens).
                    "flops_per_token": float(r["flops"]) / float(r["tokens"]),
                    "loss": float(loss), "curve": curve})
    return out


def aggregate_seeds(points: Sequence[Mapping]) -> list[dict]:
    """One entry per (size, budget): mean, sample std, min and max of the final loss over seeds.

    N, tokens and FLOPs are the same for every seed of a point (means are reported anyway).
    """
    groups: dict[tuple[str, str], list[Mapping]] = {}
    for p in points:
        groups.setdefault((p["size"], p.get("budget", "")), []).append(p)
    out = []
    for (size, budget), group in groups.items():
        loss = np.array([p["loss"] for p in group])
        out.append({"size": size, "budget": budget, "name": f"{size}_{budget}",
                    "seeds": [p.get("seed") for p in group], "n_seeds": len(group),
                    "n_params": float(np.mean([p["n_params"] for p in group])),
                    "tokens": float(np.mean([p["tokens"] for p in group])),
                    "flops": float(np.mean([p["flops"] for p in group])),
                    "loss": float(loss.mean()),
                    "loss_std": float(loss.std(ddof=1)) if loss.size > 1 else 0.0,
                    "loss_min": float(loss.min()), "loss_max": float(loss.max())})
    return sorted(out, key=lambda a: (a["n_params"], a["flops"]))


def largest_budget_per_size(points: Sequence[Mapping]) -> list[dict]:
    """For L(N): each size's run with the most compute (closest to converged)."""
    best: dict[str, Mapping] = {}
    for p in points:
        if p["size"] not in best or p["flops"] > best[p["size"]]["flops"]:
            best[p["size"]] = p
    return sorted(best.values(), key=lambda p: p["n_params"])


def compute_frontier(points: Sequence[Mapping], start_fraction: float = 0.5
                     ) -> list[tuple[float, float]]:
    """Lower envelope of (flops, loss) curve points and finals: the best loss so far at C.

    Only curve points from `start_fraction` of each run on count: early training (warmup, the
    first steep drop) lies far above any power law in C and would dominate the envelope.
    """
    pairs = sorted({(float(f), float(l)) for p in points
                    for f, l in list(p["curve"]) + [(p["flops"], p["loss"])]
                    if f >= start_fraction * float(p["flops"])})
    front, best = [], math.inf
    for f, l in pairs:
        if l < best:
            front.append((f, l))
            best = l
    return front


def _attempt(name: str, fn: Callable[[], Any], errors: dict) -> Any:
    try:
        return fn()
    except ValueError as e:  # Too few or degenerate points: say so in the report.
        logging.warning("report: %s: %s", name, e)
        errors[name] = str(e)
        return None


def holdout_mask(points: Sequence[Mapping]) -> np.ndarray:
    """Hold out the largest size (all its budgets): does the law extrapolate in N?"""
    n = np.array([p["n_params"] for p in points])
    return n == n.max()


COMPUTE_DEFINITION = (
    "analytic training FLOPs, C = f(N) * D: f = mmjax.flops.flops_per_token(...)['train'] of the "
    "runs (attention, LM head and image head included), interpolated over the sweep's sizes "
    "(monotone cubic in log N - log f) and continued linearly in N beyond the largest; not "
    "Chinchilla's C = 6ND")


def scaling_analysis(points: list[dict], out_dir: str, tag: str, starts: int = 8,
                     frontier_from: float = 0.5, bootstrap_samples: int = 0,
                     bootstrap_seed: int = 0) -> dict:
    """Fits and figures for one (arch, loss key) group of points; returns the numbers."""
    errors: dict[str, str] = {}
    out: dict[str, Any] = {"num_runs": len(points), "errors": errors, "notes": []}
    summary = aggregate_seeds(points)
    if any(a["n_seeds"] > 1 for a in summary):
        out["seeds"] = summary
    fpt = fits.interpolate_flops_per_token([p["n_params"] for p in points],
                                           [p["flops_per_token"] for p in points])
    by_n = largest_budget_per_size(points)
    law_n = _attempt("power_law_n", lambda: fits.fit_power_law(
        [p["n_params"] for p in by_n], [p["loss"] for p in by_n], x_key="n_params"), errors)
    if law_n is not None:
        out["power_law_n"] = {"l_inf": law_n.l_inf, "x0": law_n.x0, "alpha": law_n.alpha,
                              "r2": fits.r2([p["loss"] for p in by_n], law_n.predict_points(by_n))}
    front = compute_frontier(points, frontier_from)
    law_c = _attempt("power_law_c", lambda: fits.fit_power_law(
        [f for f, _ in front], [l for _, l in front], x_key="flops"), errors)
    if law_c is not None:
        out["power_law_c"] = {"l_inf": law_c.l_inf, "x0": law_c.x0, "alpha": law_c.alpha,
                              "frontier_points": len(front),
                              "r2": fits.r2([l for _, l in front],
                                            law_c.predict([f for f, _ in front]))}
    chin = _attempt("chinchilla", lambda: fits.fit_chinchilla(
        [p["n_params"] for p in points], [p["tokens"] for p in points],
        [p["loss"] for p in points], top_k=starts), errors)
    boot = None
    if chin is not None:
        out["chinchilla"] = {**chin.params, "r2": fits.r2(
            [p["loss"] for p in points], chin.predict_points(points))}
        if bootstrap_samples > 0:
            boot = _attempt("chinchilla_bootstrap", lambda: fits.bootstrap_chinchilla(
                [p["n_params"] for p in points], [p["tokens"] for p in points],
                [p["loss"] for p in points], samples=bootstrap_samples, seed=bootstrap_seed,
                start=chin), errors)
        if boot is not None and boot.fits:
            out["chinchilla"]["intervals"] = {k: list(v) for k, v in boot.intervals.items()}
            out["chinchilla"]["bootstrap"] = {
                "level": boot.level, "samples": boot.samples, "seed": boot.seed,
                "failed": boot.failed, "resampled": "runs (with replacement)"}
        out["chinchilla"]["degenerate"] = fits.degenerate_notes(
            chin, [p["loss"] for p in points])
        out["notes"].extend(out["chinchilla"]["degenerate"])
        out["chinchilla"]["r2_holdout_largest_size"] = _attempt(
            "chinchilla_holdout", lambda: fits.holdout_r2(
                [{k: p[k] for k in ("n_params", "tokens", "flops", "loss")} for p in points],
                lambda q: fits.fit_chinchilla(q["n_params"], q["tokens"], q["loss"],
                                              top_k=starts),
                holdout_mask(points)), errors)
        out["compute_optimal_flops"] = COMPUTE_DEFINITION
        out["compute_optimal"] = _attempt("compute_optimal",
                                          lambda: _optimal_table(chin, points, fpt, boot), errors)
    # The frontier drawn over the sweep's analytic FLOPs: L(C) fitted on those FLOPs when there
    # is one, else the Chinchilla law minimised under the same FLOPs per token.
    out["figures"] = _figures(points, summary, law_c or chin, chin, law_n, law_c, front, fpt,
                              out_dir, tag, out, errors)
    return out


def _optimal_table(fit: fits.ChinchillaFit, points, flops_per_token,
                   boot: fits.ChinchillaBootstrap | None = None) -> list[dict]:
    """N_opt, D_opt at budgets from the sweep's smallest to 100x its largest.

    C is the runs' analytic training FLOPs (COMPUTE_DEFINITION), so a row's (N_opt, D_opt) is a
    run that costs C as the sweep counts it; `c_6nd` is what 6 N_opt D_opt would call it.
    With a bootstrap, `n_opt_interval` / `d_opt_interval` are its percentile intervals
    (resamples whose law has no interior optimum are left out and counted).
    """
    c = np.array([p["flops"] for p in points])
    grid = np.logspace(np.log10(c.min()), np.log10(c.max() * 100), 7)
    n_opt, d_opt = fits.compute_optimal(fit, grid, flops_per_token)
    n_max = max(p["n_params"] for p in points)
    rows = [{"flops": float(g), "n_opt": float(n), "d_opt": float(d),
             "tokens_per_param": float(d / n), "loss": float(fit.predict(n, d)),
             "c_6nd": float(6 * n * d), "flops_per_token": float(flops_per_token(n)),
             "extrapolated": bool(g > c.max() * 1.05 or n > n_max * 1.05)}
            for g, n, d in zip(grid, n_opt, d_opt)]
    if boot is not None and boot.fits:
        draws, skipped = [], 0
        for f in boot.fits:
            try:
                draws.append(fits.compute_optimal(f, grid, flops_per_token))
            except ValueError:
                skipped += 1
        if draws:
            n_draws = np.array([d[0] for d in draws])
            d_draws = np.array([d[1] for d in draws])
            for i, row in enumerate(rows):
                row["n_opt_interval"] = list(boot.interval(n_draws[:, i]))
                row["d_opt_interval"] = list(boot.interval(d_draws[:, i]))
                row["bootstrap_skipped"] = skipped
    return rows


def _figures(points, summary, frontier_fit, chin, law_n, law_c, front, fpt, out_dir, tag, out,
             errors) -> list[str]:
    seeded = any(a["n_seeds"] > 1 for a in summary)
    paths = [plots.plot_loss_vs_flops(points, frontier_fit,
                                      os.path.join(out_dir, f"loss_vs_flops_{tag}.png"),
                                      flops_per_token=fpt, summary=summary if seeded else None)]
    iso_path = os.path.join(out_dir, f"isoflops_{tag}.png")
    # With seeds: one profile point per (size, budget) at the seeds' mean, min-max error bars.
    out["isoflop_optima"] = plots.plot_isoflops(summary if seeded else points, iso_path)
    paths.append(iso_path)
    for name, fit, pts in (("chinchilla", chin, points), ("power_n", law_n,
                                                          largest_budget_per_size(points))):
        if fit is not None:
            path = os.path.join(out_dir, f"law_{name}_{tag}.png")
            _attempt(f"plot_{name}", lambda: plots.plot_law(fit, pts, path), errors)
            paths.append(path)
    if law_c is not None:
        front_points = [{"flops": f, "loss": l} for f, l in front]
        path = os.path.join(out_dir, f"law_power_c_{tag}.png")
        _attempt("plot_power_c", lambda: plots.plot_law(law_c, front_points, path), errors)
        paths.append(path)
    return [os.path.basename(p) for p in paths if os.path.exists(p)]


def provenance() -> dict:
    """The git commit of the code that wrote the report (None outside a git checkout)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def git(*args):
        try:
            return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                                  timeout=30, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": None if dirty is None else bool(dirty),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}


def group_by_arch(results: Sequence[Mapping]) -> dict[str, list[Mapping]]:
    groups: dict[str, list[Mapping]] = {}
    for r in results:
        groups.setdefault(r["arch"], []).append(r)
    return groups


def report(sweep_cfg, sweep_dir: str) -> dict:
    """Collects results, runs the config's analyses, writes report.json and figures."""
    from mmjax.scaling import study
    results = read_results(sweep_dir)
    if not results:
        raise ValueError(f"report: no finished runs in {os.path.join(sweep_dir, 'runs')}")
    io.write_json_atomic(os.path.join(sweep_dir, "results.json"), results)
    out_dir = os.path.join(sweep_dir, "report")
    analyses = tuple(sweep_cfg.analyses)
    unknown = set(analyses) - {"scaling", "mot_vs_dense"}
    if unknown:
        raise ValueError(f"sweep.analyses: unknown {sorted(unknown)}; use 'scaling' and/or "
                         "'mot_vs_dense'")
    out: dict[str, Any] = {"num_runs": len(results),
                           "wall_s_total": float(sum(r["wall_s"] for r in results)),
                           "param_key": sweep_cfg.param_key, **provenance()}
    if "scaling" in analyses:
        out["scaling"] = {}
        for arch, group in group_by_arch(results).items():
            for key in sweep_cfg.loss_keys:
                points = fit_points(group, key, sweep_cfg.param_key)
                tag = f"{arch}_{key}"
                out["scaling"][tag] = scaling_analysis(
                    points, out_dir, tag, int(sweep_cfg.get("fit_starts", 8)),
                    float(sweep_cfg.get("frontier_from", 0.5)),
                    int(sweep_cfg.get("bootstrap_samples", 0)),
                    int(sweep_cfg.get("bootstrap_seed", 0))) if points else \
                    {"num_runs": 0, "errors": {"points": f"no run has {key!r}"}}
    if "mot_vs_dense" in analyses:
        baseline, candidate = tuple(sweep_cfg.compare)
        out["mot_vs_dense"] = study.compare(results, baseline, candidate,
                                            tuple(sweep_cfg.loss_keys), out_dir)
    io.write_json_atomic(os.path.join(out_dir, "report.json"), out)
    logging.info("report: wrote %s", os.path.join(out_dir, "report.json"))
    return out
