"""Scaling-law figures (matplotlib, Agg backend: works headless on pods and in CI).

`runs` is a list of dicts with keys `n_params`, `tokens`, `flops`, `loss`, `name` and optionally
`curve`, a list of (flops, loss) pairs logged during training. Every function writes one PNG to
`path` (creating its directory) and returns what it computed, so a sweep report can print the
numbers behind each figure.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

from mmjax.scaling import fits  # noqa: E402

_RUN_KEYS = ("n_params", "tokens", "flops", "loss")


def _check_runs(runs: Sequence[Mapping[str, Any]], min_runs: int = 1) -> None:
    if len(runs) < min_runs:
        raise ValueError(f"runs: need at least {min_runs} run(s), got {len(runs)}")
    fits.as_arrays(runs, _RUN_KEYS)  # Raises naming the run that lacks a key.


def _save(fig, path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _frontier(fit, flops: np.ndarray, flops_per_token=None) -> np.ndarray | None:
    """Loss of the best model at each compute budget according to `fit` (None if it cannot say).

    A ChinchillaFit is minimised under C = flops_per_token(N) * D (C = 6ND when None).
    """
    if isinstance(fit, fits.ChinchillaFit):
        n_opt, d_opt = fits.compute_optimal(fit, flops, flops_per_token)
        return fit.predict(n_opt, d_opt)
    if isinstance(fit, fits.PowerLawFit) and fit.x_key == "flops":
        return fit.predict(flops)
    return None


def plot_loss_vs_flops(runs, fit, path: str, *, flops_per_token=None, summary=None) -> str:
    """Loss against training compute: one curve (or point) per model size plus the fitted frontier.

    `fit` may be a ChinchillaFit (frontier = L(N_opt(C), D_opt(C)) under C = flops_per_token(N)
    D, 6ND when None), a PowerLawFit over `flops`, or None (no frontier). `summary` (entries
    with n_params, flops, loss, loss_min, loss_max: the seeds of one point) adds the seeds' mean
    with min-max error bars.
    """
    _check_runs(runs)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    sizes = sorted({float(r["n_params"]) for r in runs})
    cmap = plt.get_cmap("viridis")
    all_flops = []
    labelled: set[float] = set()
    for r in runs:
        color = cmap(sizes.index(float(r["n_params"])) / max(len(sizes) - 1, 1))
        # One legend entry per size (budgets and seeds of a size share its colour).
        label = None if float(r["n_params"]) in labelled else f"N={float(r['n_params']):.3g}"
        labelled.add(float(r["n_params"]))
        if r.get("curve"):
            c = np.asarray(r["curve"], np.float64).reshape(-1, 2)
            c = c[c[:, 0] > 0]
            ax.plot(c[:, 0], c[:, 1], color=color, lw=1, label=label)
            all_flops.extend(c[:, 0])
        ax.scatter([r["flops"]], [r["loss"]], color=color, s=14, zorder=3,
                   label=None if r.get("curve") else label)
        all_flops.append(float(r["flops"]))
    frontier = None
    if fit is not None:
        grid = np.logspace(np.log10(min(all_flops)), np.log10(max(all_flops)), 100)
        frontier = _frontier(fit, grid, flops_per_token)
        if frontier is not None:
            ax.plot(grid, frontier, "k--", lw=1.5, label="fitted frontier")
    for a in summary or ():
        color = cmap(sizes.index(float(a["n_params"])) / max(len(sizes) - 1, 1)) \
            if float(a["n_params"]) in sizes else "k"
        ax.errorbar([a["flops"]], [a["loss"]], yerr=[[a["loss"] - a["loss_min"]],
                                                     [a["loss_max"] - a["loss"]]],
                    fmt="D", color=color, ms=4, capsize=3, zorder=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("loss")
    ax.legend(fontsize=6, loc="upper right")
    ax.set_title("Loss vs compute")
    return _save(fig, path)


def _group_by_flops(runs, rtol: float) -> list[list[Mapping[str, Any]]]:
    """Groups runs whose budgets agree within `rtol` (isoFLOP sweeps never hit C exactly)."""
    groups: list[list[Mapping[str, Any]]] = []
    for r in sorted(runs, key=lambda r: float(r["flops"])):
        if groups and abs(float(r["flops"]) / float(groups[-1][0]["flops"]) - 1) <= rtol:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def plot_isoflops(runs, path: str, *, rtol: float = 0.05) -> list[dict[str, float]]:
    """IsoFLOP profiles (Chinchilla approach 2): loss vs N for each compute budget.

    Budgets within `rtol` of each other form one profile. Each profile with >= 3 sizes gets a
    parabola in log N whose minimum estimates N_opt(C). Returns [{flops, n_opt, loss_min}] for
    those profiles (sorted by flops) and writes the figure to `path`. Runs with `loss_min` and
    `loss_max` (seed means from report.aggregate_seeds) are drawn with those as error bars.
    """
    _check_runs(runs)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    groups = _group_by_flops(runs, rtol)
    cmap = plt.get_cmap("plasma")
    optima = []
    for i, group in enumerate(groups):
        color = cmap(i / max(len(groups) - 1, 1))
        c = float(np.exp(np.mean([np.log(float(r["flops"])) for r in group])))
        n = np.array([float(r["n_params"]) for r in group])
        loss = np.array([float(r["loss"]) for r in group])
        order = np.argsort(n)
        if all("loss_min" in r and "loss_max" in r for r in group):
            lo = np.array([float(r["loss_min"]) for r in group])
            hi = np.array([float(r["loss_max"]) for r in group])
            ax.errorbar(n[order], loss[order], yerr=[(loss - lo)[order], (hi - loss)[order]],
                        fmt="o", color=color, capsize=3, label=f"C={c:.2g} (seed min-max)")
        else:
            ax.plot(n[order], loss[order], "o", color=color, label=f"C={c:.2g}")
        if len(np.unique(n)) >= 3:
            coef = np.polyfit(np.log(n), loss, 2)
            xs = np.linspace(np.log(n).min(), np.log(n).max(), 50)
            ax.plot(np.exp(xs), np.polyval(coef, xs), "-", color=color, lw=1)
            if coef[0] > 0:  # A minimum exists only for an upward parabola.
                x_min = -coef[1] / (2 * coef[0])
                optima.append(dict(flops=c, n_opt=float(np.exp(x_min)),
                                   loss_min=float(np.polyval(coef, x_min))))
                ax.plot([np.exp(x_min)], [np.polyval(coef, x_min)], "*", color=color, ms=10)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("final loss")
    ax.set_title("IsoFLOP profiles")
    ax.legend(fontsize=6)
    _save(fig, path)
    return optima


def plot_law(fit, points, path: str) -> float:
    """Fit quality: observed vs predicted loss (left) and loss vs the law's variable (right).

    Works for ChinchillaFit (right panel: loss vs N, one model line per distinct token count) and
    PowerLawFit (right panel: loss vs its x_key). Returns the R^2 of the fit on `points`.
    """
    if isinstance(fit, fits.ChinchillaFit):
        keys = ["n_params", "tokens", "loss"]
        x_key = "n_params"
    elif isinstance(fit, fits.PowerLawFit):
        keys = [fit.x_key, "loss"]
        x_key = fit.x_key
    else:
        raise ValueError(f"plot_law: fit must be a ChinchillaFit or PowerLawFit, got {type(fit)}")
    p = fits.as_arrays(points, keys)
    pred = fit.predict_points(p)
    score = fits.r2(p["loss"], pred)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    lo, hi = min(p["loss"].min(), pred.min()), max(p["loss"].max(), pred.max())
    left.plot([lo, hi], [lo, hi], "k--", lw=1)
    left.scatter(p["loss"], pred, s=12)
    left.set_xlabel("observed loss")
    left.set_ylabel("predicted loss")
    left.set_title(f"R^2 = {score:.4f}")
    xs = np.logspace(np.log10(p[x_key].min()), np.log10(p[x_key].max()), 100)
    if isinstance(fit, fits.ChinchillaFit):
        tokens = np.unique(p["tokens"])
        if tokens.size > 6:  # Too many lines to read: show a few quantiles.
            tokens = np.quantile(tokens, np.linspace(0, 1, 6))
        cmap = plt.get_cmap("viridis")
        sc = right.scatter(p["n_params"], p["loss"], c=np.log10(p["tokens"]), s=12, cmap=cmap)
        for d in tokens:
            right.plot(xs, fit.predict(xs, d), lw=1,
                       color=cmap((np.log10(d) - np.log10(p["tokens"].min()))
                                  / max(np.ptp(np.log10(p["tokens"])), 1e-12)))
        fig.colorbar(sc, ax=right, label="log10 tokens")
        right.set_title(f"E={fit.E:.3g} A={fit.A:.3g} B={fit.B:.3g} "
                        f"alpha={fit.alpha:.3g} beta={fit.beta:.3g}", fontsize=8)
    else:
        right.scatter(p[x_key], p["loss"], s=12)
        right.plot(xs, fit.predict(xs), "k-", lw=1)
        right.set_title(f"L_inf={fit.l_inf:.3g} x0={fit.x0:.3g} alpha={fit.alpha:.3g}",
                        fontsize=8)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel(x_key)
    right.set_ylabel("loss")
    _save(fig, path)
    return score
