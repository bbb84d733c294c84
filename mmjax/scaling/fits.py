"""Scaling-law fits: Henighan et al. (2020) power laws and Chinchilla approach 3 (Hoffmann et al. 2022).

Why two forms:
- `fit_power_law` fits `L(x) = L_inf + (x0 / x)**alpha` for one resource x (parameters N or compute
  C), the form Henighan et al. use for autoregressive generative models of every modality. The fit
  is done on log-loss (residuals `log L_pred - log L`) so that points at the small end, whose losses
  are large, do not dominate; it is restarted from several initialisations because the problem is
  non-convex in (L_inf, x0, alpha).
- `fit_chinchilla` fits `L(N, D) = E + A/N**alpha + B/D**beta` exactly as the Chinchilla paper does:
  parameters (a, b, e) = (log A, log B, log E), prediction `LSE(a - alpha log N, b - beta log D, e)`,
  a Huber loss (delta 1e-3) on `log L_pred - log L`, minimised with L-BFGS(-B) from a grid of
  initialisations. The Huber loss makes the fit robust to the few runs that went wrong.

`compute_optimal` turns a Chinchilla fit into N_opt(C), D_opt(C): under C = 6 N D (the paper's
closed form), or under C = f(N) D for the FLOPs per token f the runs actually use
(`interpolate_flops_per_token` over the sweep's sizes; for small models attention and the output
heads make f several times 6N, so the 6ND answer describes runs that cost far more than C).
`bootstrap_chinchilla` resamples the runs for intervals on (E, A, B, alpha, beta), and
`degenerate_notes` says when a fit is degenerate (E ~ 0, an exponent on its bound).
`r2` / `holdout_r2` measure how well a law extrapolates to held-out runs.

Points are passed as a dict of equal-length arrays with keys `n_params`, `tokens`, `flops`, `loss`
(the keys a fit needs), or as a list of run dicts with those keys (what the sweep driver writes).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import optimize, special
from threadpoolctl import threadpool_limits

HUBER_DELTA = 1e-3  # Chinchilla's Huber delta on log-loss residuals.
# Chinchilla's initialisation grid (Hoffmann et al. 2022, appendix D.2).
CHINCHILLA_GRID = dict(
    alpha=(0.0, 0.5, 1.0, 1.5, 2.0),
    beta=(0.0, 0.5, 1.0, 1.5, 2.0),
    e=(-1.0, -0.5, 0.0, 0.5, 1.0),
    a=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    b=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
)


# ----------------------------------------------------------------------------- inputs


def as_arrays(points: Mapping[str, Any] | Sequence[Mapping[str, Any]],
              keys: Sequence[str]) -> dict[str, np.ndarray]:
    """`points` (dict of arrays or list of run dicts) -> dict of float64 arrays for `keys`."""
    if isinstance(points, Mapping):
        missing = [k for k in keys if k not in points]
        if missing:
            raise ValueError(f"points: missing key(s) {missing}; have {sorted(points)}")
        out = {k: np.asarray(points[k], np.float64).reshape(-1) for k in keys}
    else:
        for i, p in enumerate(points):
            missing = [k for k in keys if k not in p]
            if missing:
                raise ValueError(f"points[{i}] ({p.get('name', '?')}): missing key(s) {missing}")
        out = {k: np.asarray([p[k] for p in points], np.float64) for k in keys}
    sizes = {k: v.size for k, v in out.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"points: arrays differ in length {sizes}")
    return out


def _check_positive(name: str, x: np.ndarray, min_points: int) -> np.ndarray:
    x = np.asarray(x, np.float64).reshape(-1)
    if x.size < min_points:
        raise ValueError(f"{name}: need at least {min_points} points to fit, got {x.size}")
    if not np.all(np.isfinite(x)) or np.any(x <= 0):
        raise ValueError(f"{name}: every value must be finite and > 0 (got min {np.min(x)!r})")
    return x


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals `r` and its derivative (quadratic below delta, linear above)."""
    a = np.abs(r)
    quad = a <= delta
    value = np.where(quad, 0.5 * r * r, delta * (a - 0.5 * delta))
    grad = np.where(quad, r, delta * np.sign(r))
    return value, grad


# ----------------------------------------------------------------------------- metrics


def r2(y_true, y_pred) -> float:
    """Coefficient of determination 1 - SS_res / SS_tot (1 = perfect; can be negative)."""
    y_true = np.asarray(y_true, np.float64).reshape(-1)
    y_pred = np.asarray(y_pred, np.float64).reshape(-1)
    if y_true.shape != y_pred.shape or y_true.size < 2:
        raise ValueError(f"r2: need two equal-length arrays of >= 2 values, got {y_true.shape} "
                         f"and {y_pred.shape}")
    ss_tot = np.sum((y_true - y_true.mean()) ** 2)
    if ss_tot == 0:
        raise ValueError("r2: y_true is constant, R^2 is undefined")
    return float(1.0 - np.sum((y_true - y_pred) ** 2) / ss_tot)


def holdout_r2(points, fit_fn: Callable[[dict], Any], holdout_mask) -> float:
    """Fits on the points where `holdout_mask` is False, returns R^2 of `loss` on the rest.

    `fit_fn(train_points) -> fit` where fit has `predict_points(points)` (both fit classes here
    do), e.g. `lambda p: fit_chinchilla(p["n_params"], p["tokens"], p["loss"])`. Typical use:
    hold out the largest runs to check that the law extrapolates.
    """
    keys = list(points) if isinstance(points, Mapping) else list(points[0])
    keys = [k for k in keys if k != "name" and k != "curve"]
    arrays = as_arrays(points, keys)
    mask = np.asarray(holdout_mask, bool).reshape(-1)
    if mask.size != arrays["loss"].size:
        raise ValueError(f"holdout_mask: {mask.size} entries for {arrays['loss'].size} points")
    if mask.sum() < 2 or (~mask).sum() < 2:
        raise ValueError(f"holdout_mask: need >= 2 held-out and >= 2 fitted points, got "
                         f"{int(mask.sum())} held out of {mask.size}")
    fit = fit_fn({k: v[~mask] for k, v in arrays.items()})
    held = {k: v[mask] for k, v in arrays.items()}
    return r2(held["loss"], fit.predict_points(held))


# ----------------------------------------------------------------------------- Henighan


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """`L(x) = l_inf + (x0 / x)**alpha`; `x_key` names the resource in points (n_params / flops)."""

    l_inf: float
    x0: float
    alpha: float
    loss: float  # Final objective: mean squared log-loss residual.
    x_key: str = "n_params"

    def predict(self, x):
        x = np.asarray(x, np.float64)
        return self.l_inf + np.exp(self.alpha * (np.log(self.x0) - np.log(x)))

    def predict_points(self, points) -> np.ndarray:
        return self.predict(as_arrays(points, [self.x_key])[self.x_key])


def fit_power_law(x, loss, *, x_key: str = "n_params", alphas=(0.05, 0.1, 0.3, 0.6, 1.0),
                  l_inf_fractions=(0.0, 0.5, 0.9)) -> PowerLawFit:
    """Henighan-form fit in log space, best of a grid of (alpha, L_inf) initialisations.

    Parameterised as (log L_inf, log x0, log alpha) so every parameter stays positive. For each
    initial alpha and L_inf (a fraction of min(loss)), log x0 starts where the law passes through
    the median point, which puts every start in the right basin of scale.
    """
    x = _check_positive("x", x, 3)
    y = _check_positive("loss", loss, 3)
    if x.shape != y.shape:
        raise ValueError(f"fit_power_law: x has {x.size} values, loss has {y.size}")
    lx, ly = np.log(x), np.log(y)
    mid = int(np.argsort(x)[x.size // 2])
    tiny = 1e-12 * y.min()

    def residuals(p):
        log_linf, log_x0, log_alpha = p
        return np.logaddexp(log_linf, np.exp(log_alpha) * (log_x0 - lx)) - ly

    best = None
    for alpha0, frac in itertools.product(alphas, l_inf_fractions):
        l_inf0 = max(frac * y.min(), tiny)
        reducible = max(y[mid] - l_inf0, tiny)
        log_x0 = lx[mid] + np.log(reducible) / alpha0
        p0 = np.array([np.log(l_inf0), log_x0, np.log(alpha0)])
        try:
            res = optimize.least_squares(residuals, p0, method="lm", xtol=1e-12, ftol=1e-12,
                                         max_nfev=20000)
        except (ValueError, FloatingPointError):
            continue
        cost = float(np.mean(res.fun ** 2))
        if np.isfinite(cost) and (best is None or cost < best[0]):
            best = (cost, res.x)
    if best is None:
        raise ValueError("fit_power_law: every initialisation failed (check x and loss)")
    cost, (log_linf, log_x0, log_alpha) = best
    return PowerLawFit(l_inf=float(np.exp(log_linf)), x0=float(np.exp(log_x0)),
                       alpha=float(np.exp(log_alpha)), loss=cost, x_key=x_key)


# ----------------------------------------------------------------------------- Chinchilla


@dataclasses.dataclass(frozen=True)
class ChinchillaFit:
    """`L(N, D) = E + A / N**alpha + B / D**beta` (Chinchilla approach 3)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    loss: float  # Final objective: summed Huber loss of log-loss residuals.

    @property
    def params(self) -> dict[str, float]:
        return dict(E=self.E, A=self.A, B=self.B, alpha=self.alpha, beta=self.beta)

    def predict(self, n_params, tokens):
        n, d = np.asarray(n_params, np.float64), np.asarray(tokens, np.float64)
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    def predict_points(self, points) -> np.ndarray:
        p = as_arrays(points, ["n_params", "tokens"])
        return self.predict(p["n_params"], p["tokens"])


def _chinchilla_objective(theta, log_n, log_d, log_loss, delta):
    """Summed Huber loss of LSE(a - alpha log N, b - beta log D, e) - log L, and its gradient."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    lse = special.logsumexp(terms, axis=0)
    value, dr = huber(lse - log_loss, delta)
    w = np.exp(terms - lse) * dr  # d lse / d term_k = softmax_k; chain rule through the residual.
    grad = np.array([w[0].sum(), w[1].sum(), w[2].sum(),
                     -(w[0] * log_n).sum(), -(w[1] * log_d).sum()])
    return float(value.sum()), grad


def fit_chinchilla(n_params, tokens, loss, *, delta: float = HUBER_DELTA,
                   grid: Mapping[str, Sequence[float]] | None = None,
                   top_k: int | None = 32,
                   extra_starts: Sequence[ChinchillaFit] = ()) -> ChinchillaFit:
    """Chinchilla approach 3: Huber (delta) on log-loss, L-BFGS-B from a grid of initialisations.

    Why `top_k`: the paper's grid has 4500 starts. The objective is evaluated (vectorised, cheap)
    at every start and L-BFGS-B runs from the `top_k` best; `top_k=None` runs from all of them,
    as the paper does. Exponents are bounded to [0, 5] (a negative exponent is not a law).
    `extra_starts` (fits) are added to the starts: a bootstrap starts each resample from the
    full-data fit, which lets it use few grid starts.
    """
    n = _check_positive("n_params", n_params, 5)
    d = _check_positive("tokens", tokens, 5)
    y = _check_positive("loss", loss, 5)
    if not n.size == d.size == y.size:
        raise ValueError(f"fit_chinchilla: n_params/tokens/loss lengths {n.size}/{d.size}/{y.size}")
    log_n, log_d, log_y = np.log(n), np.log(d), np.log(y)
    grid = dict(CHINCHILLA_GRID if grid is None else grid)
    starts = np.array(list(itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"],
                                             grid["beta"])), np.float64)
    if top_k is not None and top_k < len(starts):
        a, b, e, al, be = (s[:, None] for s in starts.T)
        lse = special.logsumexp(np.stack(np.broadcast_arrays(a - al * log_n, b - be * log_d, e)),
                                axis=0)
        cost = huber(lse - log_y, delta)[0].sum(axis=1)
        starts = starts[np.argsort(cost, kind="stable")[:top_k]]
    if extra_starts:
        warm = np.array([[np.log(f.A), np.log(f.B), np.log(max(f.E, 1e-300)),
                          min(max(f.alpha, 0.0), 5.0), min(max(f.beta, 0.0), 5.0)]
                         for f in extra_starts], np.float64)
        starts = np.concatenate([warm, starts])
    bounds = [(None, None)] * 3 + [(0.0, 5.0)] * 2
    best = None
    # One BLAS thread: on a 5-parameter problem a BLAS thread pool only adds wake-ups (measured
    # 14x slower L-BFGS-B steps on a loaded 2-core machine), and bootstraps run hundreds of fits.
    with threadpool_limits(limits=1):
        for theta0 in starts:
            res = optimize.minimize(_chinchilla_objective, theta0,
                                    args=(log_n, log_d, log_y, delta), jac=True,
                                    method="L-BFGS-B", bounds=bounds,
                                    options=dict(maxiter=5000, ftol=1e-15, gtol=1e-12))
            if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
                best = res
    if best is None:
        raise ValueError("fit_chinchilla: every initialisation failed (check the points)")
    a, b, e, alpha, beta = best.x
    return ChinchillaFit(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)),
                         alpha=float(alpha), beta=float(beta), loss=float(best.fun))


def interpolate_flops_per_token(n_params, flops_per_token) -> Callable[[Any], np.ndarray]:
    """f(N): training FLOPs per token as a function of N, a smooth curve through the sweep's sizes.

    Built from the sweep's runs (one (N, FLOPs per token) pair per size; repeated N are averaged
    in log space). Why not 6N: in small models attention, the LM head and the image head are a
    large share of the FLOPs that grows slower than N.
    Between sizes: monotone cubic (PCHIP) in log N - log f. Why not piecewise-linear: f depends
    on depth and width, not N alone (one layer -> two layers is a kink), and a kinked f pins the
    compute-optimal N to a sweep size for a whole range of C. PCHIP is C1, exact at the sizes,
    and adds no wiggles.
    Beyond the largest size f continues as a straight line in N with the end derivative:
    per-token FLOPs are ~6N + (terms that grow slower than N), so a log-log extension (slope
    < 1) would eventually fall below 6N. Below the smallest size the end log-log slope is
    extended. Two sizes: a straight line in log-log; one size: f proportional to N.
    """
    from scipy import interpolate
    n = _check_positive("n_params", n_params, 1)
    f = _check_positive("flops_per_token", flops_per_token, 1)
    if n.shape != f.shape:
        raise ValueError(f"interpolate_flops_per_token: {n.size} n_params but {f.size} "
                         "flops_per_token values")
    ln_all, lf_all = np.log(n), np.log(f)
    ln = np.unique(ln_all)
    lf = np.array([lf_all[ln_all == v].mean() for v in ln])
    if ln.size == 1:
        ln, lf = np.array([ln[0], ln[0] + 1.0]), np.array([lf[0], lf[0] + 1.0])
    curve = interpolate.PchipInterpolator(ln, lf, extrapolate=False)
    slope = curve.derivative()
    lo_slope, hi_slope = float(slope(ln[0])), float(slope(ln[-1]))
    n_hi, f_hi = float(np.exp(ln[-1])), float(np.exp(lf[-1]))
    dfdn_hi = max(hi_slope * f_hi / n_hi, 0.0)  # d f / d N at the largest size

    def flops_per_token_of(n_query):
        nq = np.asarray(n_query, np.float64)
        x = np.log(nq)
        inside = np.clip(x, ln[0], ln[-1])
        y = np.exp(np.where(x < ln[0], lf[0] + lo_slope * (x - ln[0]), curve(inside)))
        return np.where(x > ln[-1], f_hi + dfdn_hi * (nq - n_hi), y)

    return flops_per_token_of


def _closed_form_6nd(fit: ChinchillaFit, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = fit.alpha + fit.beta
    g = (fit.alpha * fit.A / (fit.beta * fit.B)) ** (1.0 / s)
    return g * (c / 6.0) ** (fit.beta / s), (c / 6.0) ** (fit.alpha / s) / g


def compute_optimal(fit: ChinchillaFit, flops, flops_per_token: Callable[[Any], Any] | None = None,
                    *, search_decades: float = 6.0, grid_points: int = 2401
                    ) -> tuple[np.ndarray, np.ndarray]:
    """N_opt(C), D_opt(C) minimising the fitted L(N, D) subject to C = f(N) D.

    `flops_per_token=None` takes f(N) = 6N, Chinchilla's C = 6ND, and the paper's closed form
    (eq. 4): G = (alpha A / (beta B))**(1 / (alpha + beta)); N_opt = G (C/6)**(beta / (alpha +
    beta)); D_opt = (C/6)**(alpha / (alpha + beta)) / G.
    With f given (e.g. `interpolate_flops_per_token` over the sweep), L(N, C / f(N)) is minimised
    over log N: a grid of `grid_points` over +-`search_decades` decades around the 6ND optimum,
    then a bounded scalar search between the grid neighbours of the best point. ValueError when
    the minimum lies on the search edge (the law has no interior optimum there).
    """
    if fit.alpha <= 0 or fit.beta <= 0:
        raise ValueError(f"compute_optimal: need alpha > 0 and beta > 0, got alpha={fit.alpha}, "
                         f"beta={fit.beta} (the fit found no trade-off)")
    c = np.asarray(flops, np.float64)
    if np.any(c <= 0):
        raise ValueError("compute_optimal: flops must be > 0")
    n6, d6 = _closed_form_6nd(fit, c)
    if flops_per_token is None:
        return n6, d6
    n_out, d_out = np.empty_like(c, dtype=np.float64), np.empty_like(c, dtype=np.float64)
    span = search_decades * np.log(10.0)
    for idx in np.ndindex(c.shape):
        ci, center = float(c[idx]), float(np.log(n6[idx]))

        def log_loss(u):
            n = np.exp(u)
            return fit.predict(n, ci / np.asarray(flops_per_token(n), np.float64))

        us = np.linspace(center - span, center + span, int(grid_points))
        k = int(np.argmin(log_loss(us)))
        if k in (0, len(us) - 1):
            raise ValueError(f"compute_optimal: at C={ci:.3g} the minimum of L(N, C/f(N)) lies "
                             f"on the search edge N={np.exp(us[k]):.3g} (no interior optimum)")
        res = optimize.minimize_scalar(log_loss, bounds=(us[k - 1], us[k + 1]), method="bounded",
                                       options=dict(xatol=1e-10))
        n_out[idx] = np.exp(res.x)
        d_out[idx] = ci / float(flops_per_token(n_out[idx]))
    return n_out, d_out


# ----------------------------------------------------------------------------- uncertainty


@dataclasses.dataclass(frozen=True)
class ChinchillaBootstrap:
    """Percentile intervals of the Chinchilla parameters over resamples of the runs."""

    samples: int  # Resamples drawn.
    seed: int
    level: float  # e.g. 0.95
    fits: tuple[ChinchillaFit, ...]  # One per resample whose fit succeeded.
    failed: int  # Resamples whose fit raised (too few distinct points).

    def interval(self, values: Sequence[float]) -> tuple[float, float]:
        q = 100.0 * (1.0 - self.level) / 2.0
        lo, hi = np.percentile(np.asarray(values, np.float64), [q, 100.0 - q])
        return float(lo), float(hi)

    @property
    def intervals(self) -> dict[str, tuple[float, float]]:
        if not self.fits:
            raise ValueError("bootstrap: no resample could be fitted")
        return {k: self.interval([f.params[k] for f in self.fits])
                for k in ("E", "A", "B", "alpha", "beta")}


def bootstrap_chinchilla(n_params, tokens, loss, *, samples: int = 100, seed: int = 0,
                         level: float = 0.95, top_k: int = 1, delta: float = HUBER_DELTA,
                         start: ChinchillaFit | None = None) -> ChinchillaBootstrap:
    """Case bootstrap: refit L(N, D) on `samples` resamples (with replacement) of the runs.

    Each resample starts from `start` (the full-data fit; fitted here when None) plus the
    `top_k` best grid starts: a resample's optimum lies near the full fit's, and this keeps 100
    resamples in seconds to minutes. Deterministic given `seed` (numpy's default_rng).
    """
    n = _check_positive("n_params", n_params, 5)
    d = _check_positive("tokens", tokens, 5)
    y = _check_positive("loss", loss, 5)
    if not n.size == d.size == y.size:
        raise ValueError(f"bootstrap_chinchilla: lengths {n.size}/{d.size}/{y.size} differ")
    if int(samples) < 1 or not 0.0 < float(level) < 1.0:
        raise ValueError(f"bootstrap_chinchilla: need samples >= 1 and 0 < level < 1, got "
                         f"samples={samples}, level={level}")
    start = start if start is not None else fit_chinchilla(n, d, y, delta=delta, top_k=8)
    rng = np.random.default_rng(int(seed))
    out, failed = [], 0
    for idx in rng.integers(0, n.size, size=(int(samples), n.size)):
        try:
            out.append(fit_chinchilla(n[idx], d[idx], y[idx], delta=delta, top_k=top_k,
                                      extra_starts=(start,)))
        except ValueError:
            failed += 1
    return ChinchillaBootstrap(samples=int(samples), seed=int(seed), level=float(level),
                               fits=tuple(out), failed=failed)


def degenerate_notes(fit: ChinchillaFit, loss, *, e_fraction: float = 1e-3,
                     exponent_bounds: tuple[float, float] = (0.0, 5.0)) -> list[str]:
    """Sentences naming what is degenerate about `fit` (empty when nothing is).

    E below `e_fraction` of the lowest observed loss means the fit found no irreducible loss:
    its extrapolated losses fall without a floor. An exponent on its bound means the data did
    not pin it down.
    """
    y = _check_positive("loss", loss, 1)
    notes = []
    if fit.E < e_fraction * float(y.min()):
        notes.append(f"E ~ 0 (E = {fit.E:.3g}, below {e_fraction:g} x the lowest loss "
                     f"{float(y.min()):.3g}): the fit has no irreducible loss, so losses "
                     "extrapolated beyond the sweep have no floor and N_opt, D_opt there are "
                     "indicative only.")
    for name in ("alpha", "beta"):
        v = getattr(fit, name)
        for bound in exponent_bounds:
            if abs(v - bound) < 1e-6:
                notes.append(f"{name} = {v:.3g} sits on its bound {bound:g}: the runs do not "
                             f"determine it.")
    return notes
