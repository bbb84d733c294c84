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

`compute_optimal` turns a Chinchilla fit into N_opt(C), D_opt(C) under C = 6 N D (closed form from
the paper). `r2` / `holdout_r2` measure how well a law extrapolates to held-out runs.

Points are passed as a dict of equal-length arrays with keys `n_params`, `tokens`, `flops`, `loss`
(the keys a fit needs), or as a list of run dicts with those keys (what the sweep driver writes).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import optimize, special

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
                   top_k: int | None = 32) -> ChinchillaFit:
    """Chinchilla approach 3: Huber (delta) on log-loss, L-BFGS-B from a grid of initialisations.

    Why `top_k`: the paper's grid has 4500 starts. The objective is evaluated (vectorised, cheap)
    at every start and L-BFGS-B runs from the `top_k` best; `top_k=None` runs from all of them,
    as the paper does. Exponents are bounded to [0, 5] (a negative exponent is not a law).
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
    bounds = [(None, None)] * 3 + [(0.0, 5.0)] * 2
    best = None
    for theta0 in starts:
        res = optimize.minimize(_chinchilla_objective, theta0, args=(log_n, log_d, log_y, delta),
                                jac=True, method="L-BFGS-B", bounds=bounds,
                                options=dict(maxiter=5000, ftol=1e-15, gtol=1e-12))
        if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
            best = res
    if best is None:
        raise ValueError("fit_chinchilla: every initialisation failed (check the points)")
    a, b, e, alpha, beta = best.x
    return ChinchillaFit(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)),
                         alpha=float(alpha), beta=float(beta), loss=float(best.fun))


def compute_optimal(fit: ChinchillaFit, flops) -> tuple[np.ndarray, np.ndarray]:
    """N_opt(C), D_opt(C) minimising the fitted L subject to C = 6 N D (Chinchilla eq. 4).

    G = (alpha A / (beta B))**(1 / (alpha + beta)); N_opt = G (C/6)**(beta / (alpha + beta));
    D_opt = (C/6)**(alpha / (alpha + beta)) / G.
    """
    if fit.alpha <= 0 or fit.beta <= 0:
        raise ValueError(f"compute_optimal: need alpha > 0 and beta > 0, got alpha={fit.alpha}, "
                         f"beta={fit.beta} (the fit found no trade-off)")
    c = np.asarray(flops, np.float64)
    if np.any(c <= 0):
        raise ValueError("compute_optimal: flops must be > 0")
    s = fit.alpha + fit.beta
    g = (fit.alpha * fit.A / (fit.beta * fit.B)) ** (1.0 / s)
    n_opt = g * (c / 6.0) ** (fit.beta / s)
    d_opt = (c / 6.0) ** (fit.alpha / s) / g
    return n_opt, d_opt
