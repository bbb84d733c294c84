"""Scaling-law fits recover known laws; plots write PNGs."""
import numpy as np
import pytest
from scipy import optimize

from mmjax.scaling import fits, plots

CHINCHILLA = fits.ChinchillaFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, loss=0.0)


def _grid(noise, seed=0):
    rng = np.random.default_rng(seed)
    n, d = np.meshgrid(np.logspace(7, 10, 7), np.logspace(8, 11, 7))
    n, d = n.ravel(), d.ravel()
    loss = CHINCHILLA.predict(n, d) * np.exp(rng.normal(0.0, noise, n.shape))
    return dict(n_params=n, tokens=d, loss=loss, flops=6 * n * d)


def test_chinchilla_recovers_parameters_exactly_on_clean_data():
    p = _grid(0.0)
    fit = fits.fit_chinchilla(p["n_params"], p["tokens"], p["loss"])
    for k, v in CHINCHILLA.params.items():
        assert fit.params[k] == pytest.approx(v, rel=1e-4), k


def test_chinchilla_recovers_parameters_with_noise_and_is_robust_to_outliers():
    p = _grid(0.002, seed=1)
    p["loss"][[3, 20]] *= 1.5  # Two broken runs: the Huber loss must shrug them off.
    fit = fits.fit_chinchilla(p["n_params"], p["tokens"], p["loss"])
    assert fit.E == pytest.approx(1.69, rel=0.05)
    assert fit.alpha == pytest.approx(0.34, abs=0.03)
    assert fit.beta == pytest.approx(0.28, abs=0.03)
    assert fit.A == pytest.approx(406.4, rel=0.5)
    assert fit.B == pytest.approx(410.7, rel=0.5)
    # Plain least squares would be dragged by the outliers; Huber keeps clean points tight.
    clean = np.ones(p["loss"].size, bool)
    clean[[3, 20]] = False
    assert fits.r2(p["loss"][clean], fit.predict_points(p)[clean]) > 0.99


def test_power_law_recovers_parameters():
    x = np.logspace(5, 10, 15)
    true = fits.PowerLawFit(l_inf=2.0, x0=1e5, alpha=0.3, loss=0.0)
    fit = fits.fit_power_law(x, true.predict(x))
    assert (fit.l_inf, fit.x0, fit.alpha) == pytest.approx((2.0, 1e5, 0.3), rel=1e-4)
    noisy = true.predict(x) * np.exp(np.random.default_rng(0).normal(0, 0.003, x.shape))
    fit = fits.fit_power_law(x, noisy, x_key="flops")
    assert fit.alpha == pytest.approx(0.3, abs=0.05)
    assert fit.l_inf == pytest.approx(2.0, rel=0.05)
    assert fit.x_key == "flops"


def test_r2_clean_vs_noisy():
    clean, noisy = _grid(0.0), _grid(0.05, seed=2)
    assert fits.r2(clean["loss"], CHINCHILLA.predict_points(clean)) == pytest.approx(1.0)
    r_noisy = fits.r2(noisy["loss"], CHINCHILLA.predict_points(noisy))
    assert r_noisy < 0.99
    assert fits.r2([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-3.0)
    with pytest.raises(ValueError, match="constant"):
        fits.r2([1.0, 1.0], [1.0, 2.0])


def test_holdout_r2_extrapolates_to_largest_models():
    p = _grid(0.001, seed=3)
    mask = p["n_params"] >= 1e10  # Hold out the largest model size.
    fit_fn = lambda q: fits.fit_chinchilla(q["n_params"], q["tokens"], q["loss"], top_k=8)
    assert fits.holdout_r2(p, fit_fn, mask) > 0.95
    runs = [dict(n_params=n, tokens=d, loss=l, flops=f, name=str(i))
            for i, (n, d, l, f) in enumerate(zip(p["n_params"], p["tokens"], p["loss"], p["flops"]))]
    pl = lambda q: fits.fit_power_law(q["n_params"], q["loss"])
    assert np.isfinite(fits.holdout_r2(runs, pl, mask))
    with pytest.raises(ValueError, match="holdout_mask"):
        fits.holdout_r2(p, fit_fn, np.zeros_like(mask))


def test_compute_optimal_matches_brute_force():
    for c in (1e20, 5.76e23):
        n_opt, d_opt = fits.compute_optimal(CHINCHILLA, c)
        assert 6 * n_opt * d_opt == pytest.approx(c, rel=1e-9)
        res = optimize.minimize_scalar(lambda ln: CHINCHILLA.predict(np.exp(ln), c / 6 / np.exp(ln)),
                                       bounds=(np.log(1e5), np.log(1e14)), method="bounded",
                                       options=dict(xatol=1e-10))
        assert np.exp(res.x) == pytest.approx(n_opt, rel=1e-3)
    n, d = fits.compute_optimal(CHINCHILLA, np.array([1e20, 1e22]))
    assert n.shape == (2,) and n[1] > n[0] and d[1] > d[0]


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="loss"):
        fits.fit_chinchilla([1e7] * 6, [1e9] * 6, [1.0, 2.0, -1.0, 2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="at least 3"):
        fits.fit_power_law([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="missing key"):
        fits.as_arrays([dict(n_params=1.0, name="r0")], ["n_params", "loss"])
    with pytest.raises(ValueError, match="alpha > 0"):
        fits.compute_optimal(fits.ChinchillaFit(1, 1, 1, 0.0, 0.3, 0.0), 1e20)


def test_plots_write_pngs(tmp_path):
    p = _grid(0.0)
    runs = []
    for i, (n, d) in enumerate(zip(p["n_params"][:14], p["tokens"][:14])):
        steps = np.linspace(0.1, 1.0, 5)
        curve = [(6 * n * d * s, float(CHINCHILLA.predict(n, d * s))) for s in steps]
        runs.append(dict(n_params=n, tokens=d, flops=6 * n * d, loss=curve[-1][1],
                         name=f"r{i}", curve=curve))
    out = plots.plot_loss_vs_flops(runs, CHINCHILLA, str(tmp_path / "a" / "loss_vs_flops.png"))
    # IsoFLOP runs: three budgets, five sizes each, D = C / (6 N).
    iso = [dict(n_params=n, tokens=c / 6 / n, flops=c, name="iso",
                loss=float(CHINCHILLA.predict(n, c / 6 / n)))
           for c in (1e19, 1e20, 1e21) for n in np.logspace(7.5, 10, 5)]
    optima = plots.plot_isoflops(iso, str(tmp_path / "iso.png"))
    score = plots.plot_law(CHINCHILLA, p, str(tmp_path / "law.png"))
    pl = fits.fit_power_law(p["flops"], p["loss"], x_key="flops")
    plots.plot_law(pl, p, str(tmp_path / "law_pl.png"))
    plots.plot_loss_vs_flops(runs, pl, str(tmp_path / "pl.png"))
    for name in ("a/loss_vs_flops.png", "iso.png", "law.png", "law_pl.png", "pl.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name
    assert out.endswith("loss_vs_flops.png")
    assert score == pytest.approx(1.0)
    # The isoFLOP parabola minimum tracks the law's optimum (within the coarse 5-point grid).
    assert [o["flops"] for o in optima] == pytest.approx([1e19, 1e20, 1e21])
    for o in optima:
        n_true = fits.compute_optimal(CHINCHILLA, o["flops"])[0]
        assert abs(np.log10(o["n_opt"] / n_true)) < 0.3


# ----------------------------------------------------------------------------- FLOPs per token


def test_compute_optimal_under_a_power_flops_per_token_matches_the_closed_form():
    # f(N) = k N^p: dL/dN = 0 on D = C / f(N) gives N^(alpha + p beta) = alpha A C^beta /
    # (p beta B k^beta). p = 1, k = 6 is Chinchilla's C = 6ND.
    law = CHINCHILLA
    for k, p in ((6.0, 1.0), (20.0, 0.8), (3.0, 1.2)):
        f = lambda n, k=k, p=p: k * np.asarray(n) ** p
        c = np.array([1e20, 5.76e23])
        n_opt, d_opt = fits.compute_optimal(law, c, f)
        n_true = (law.alpha * law.A * c ** law.beta / (p * law.beta * law.B * k ** law.beta)) \
            ** (1.0 / (law.alpha + p * law.beta))
        assert n_opt == pytest.approx(n_true, rel=1e-6), (k, p)
        assert d_opt * f(n_opt) == pytest.approx(c, rel=1e-12)
    six = fits.compute_optimal(law, c, lambda n: 6.0 * np.asarray(n))
    assert six[0] == pytest.approx(fits.compute_optimal(law, c)[0], rel=1e-6)


def test_compute_optimal_under_interpolated_flops_matches_brute_force():
    # Per-token FLOPs of small models: 6N plus an N-independent share (attention, heads).
    sizes = np.array([3e3, 5e3, 1.5e4, 2.7e4])
    fpt = 6 * sizes + 8e4
    f = fits.interpolate_flops_per_token(sizes, fpt)
    law = fits.ChinchillaFit(E=0.3, A=3.0, B=25.0, alpha=0.2, beta=0.3, loss=0.0)
    for c in (5e10, 2e11, 5e12):
        n_opt, d_opt = fits.compute_optimal(law, c, f)
        grid_n = np.exp(np.linspace(np.log(1e1), np.log(1e8), 400001))
        brute = grid_n[np.argmin(law.predict(grid_n, c / f(grid_n)))]
        assert n_opt == pytest.approx(brute, rel=1e-3)
        assert d_opt == pytest.approx(c / f(n_opt), rel=1e-12)
        # The 6ND answer is a different run: it would cost more than c (far more while the
        # N-independent share is large).
        n6, d6 = fits.compute_optimal(law, c)
        assert f(n6) * d6 > (1.5 * c if c < 1e12 else c)
        assert not n_opt == pytest.approx(n6, rel=0.05)


def test_interpolate_flops_per_token_is_exact_at_the_sizes_smooth_and_extends_linearly():
    n = np.array([1e3, 1e3, 1e4, 1e5, 1e6])
    fpt = np.array([1e4, 4e4, 1e5, 4e5, 1e6])  # duplicate N: geometric mean 2e4
    f = fits.interpolate_flops_per_token(n, fpt)
    assert f([1e3, 1e4, 1e5, 1e6]) == pytest.approx([2e4, 1e5, 4e5, 1e6])
    # Monotone between the sizes and C1 at a size (no kink to pin an optimum to).
    xs = np.geomspace(1e3, 1e6, 301)
    assert np.all(np.diff(f(xs)) > 0)
    eps = 1e-4
    left = np.log(f(1e5) / f(1e5 * np.exp(-eps))) / eps
    right = np.log(f(1e5 * np.exp(eps)) / f(1e5)) / eps
    assert left == pytest.approx(right, rel=1e-2)
    # Above the largest size: a straight line in N (continuing the end derivative).
    d1, d2 = f(2e6) - f(1e6), f(3e6) - f(2e6)
    assert d1 == pytest.approx(d2, rel=1e-9) and d1 > 0
    grad = (f(1e6) - f(1e6 * (1 - 1e-6))) / (1e6 * 1e-6)
    assert d1 / 1e6 == pytest.approx(grad, rel=1e-3)
    # Two sizes: a straight line in log-log between and below them.
    two = fits.interpolate_flops_per_token([1e3, 1e4], [1e4, 1e5 * 2])
    p = np.log10(20.0)
    assert two(np.sqrt(1e7)) == pytest.approx(1e4 * 10 ** (p / 2))
    assert two(1e2) == pytest.approx(1e4 / 10 ** p)
    one = fits.interpolate_flops_per_token([10.0], [70.0])
    assert one(20.0) == pytest.approx(140.0)  # one size: proportional to N
    with pytest.raises(ValueError, match="flops_per_token"):
        fits.interpolate_flops_per_token([1.0, 2.0], [3.0])
    with pytest.raises(ValueError, match="flops_per_token"):
        fits.interpolate_flops_per_token([1.0, 2.0], [3.0, -1.0])


def test_compute_optimal_raises_when_there_is_no_interior_optimum():
    law = fits.ChinchillaFit(E=0.3, A=3.0, B=25.0, alpha=0.2, beta=0.3, loss=0.0)
    # f falling steeply with N: ever larger models are ever cheaper per token.
    with pytest.raises(ValueError, match="search edge"):
        fits.compute_optimal(law, 1e12, lambda n: 1e12 / np.asarray(n) ** 2)


# ----------------------------------------------------------------------------- uncertainty


def _small_grid(noise, seed):
    rng = np.random.default_rng(seed)
    n, d = np.meshgrid(np.logspace(7, 10, 5), np.logspace(8, 11, 5))
    n, d = n.ravel(), d.ravel()
    return n, d, CHINCHILLA.predict(n, d) * np.exp(rng.normal(0.0, noise, n.shape))


def test_bootstrap_intervals_contain_the_truth_and_are_deterministic():
    n, d, loss = _small_grid(0.01, seed=4)
    full = fits.fit_chinchilla(n, d, loss, top_k=8)
    boot = fits.bootstrap_chinchilla(n, d, loss, samples=24, seed=7, start=full)
    assert boot.samples == 24 and len(boot.fits) + boot.failed == 24 and len(boot.fits) >= 20
    ci = boot.intervals
    for k, v in CHINCHILLA.params.items():
        lo, hi = ci[k]
        assert lo <= v <= hi, (k, lo, v, hi)
        assert lo <= full.params[k] * (1 + 1e-9) and full.params[k] <= hi * (1 + 1e-9) or \
            k in ("A", "B"), k  # the point estimate lies inside its interval
    assert ci["alpha"][1] - ci["alpha"][0] > 0  # noise gives a non-trivial interval
    few = fits.bootstrap_chinchilla(n, d, loss, samples=5, seed=3, start=full)
    again = fits.bootstrap_chinchilla(n, d, loss, samples=5, seed=3, start=full)
    assert again.intervals == few.intervals and again.fits == few.fits
    other = fits.bootstrap_chinchilla(n, d, loss, samples=5, seed=4, start=full)
    assert other.intervals != few.intervals
    with pytest.raises(ValueError, match="samples"):
        fits.bootstrap_chinchilla(n, d, loss, samples=0, start=full)


def test_degenerate_notes_flag_a_vanishing_E_and_exponents_on_their_bounds():
    assert fits.degenerate_notes(CHINCHILLA, [2.0, 3.0]) == []
    no_floor = fits.ChinchillaFit(E=9.4e-22, A=2.8, B=24.0, alpha=0.19, beta=0.31, loss=0.0)
    notes = fits.degenerate_notes(no_floor, [0.9, 1.2])
    assert len(notes) == 1 and notes[0].startswith("E ~ 0") and "no floor" in notes[0]
    flat = fits.ChinchillaFit(E=1.0, A=2.8, B=24.0, alpha=0.0, beta=5.0, loss=0.0)
    notes = fits.degenerate_notes(flat, [2.0])
    assert [s.split()[0] for s in notes] == ["alpha", "beta"]
