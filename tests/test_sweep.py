"""Scaling sweeps: a real micro grid (2 sizes x 2 step budgets sharing one data/tokenizer build)
with an interrupted-then-resumed point and a rerun that trains nothing; report fits on a
synthetic grid with a known law; the MoT-vs-dense FLOPs fraction on curves with a known answer;
grid errors."""
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from mmjax import io as mmjax_io
from mmjax import compilation_cache, parallel
from mmjax.scaling import fits, grid, report, study, sweep

pytestmark = pytest.mark.slow  # end to end: `-m 'not slow'` skips it

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = "configs/sweep_scaling.py:micro"


def one_device_mesh():
    return parallel.create_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                                devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """Interrupts the last point at step 4 of 8, then runs the whole sweep (which resumes it).

    The sweep's persistent XLA cache is switched off again afterwards so that it does not leak
    into other test modules of this process.
    """
    from jax.experimental.compilation_cache import compilation_cache as jax_cache
    cfg = grid.load_config_spec(MICRO)
    sweep_dir = str(tmp_path_factory.mktemp("sweep"))
    previous = jax.config.jax_compilation_cache_dir
    points = grid.points(cfg)
    try:
        compilation_cache.enable(os.path.join(sweep_dir, "jax_cache"))
        interrupted = sweep.run_point(cfg, sweep_dir, points[-1], mesh=one_device_mesh(),
                                      stop_at_step=4)
        results = sweep.run_sweep(cfg, sweep_dir, mesh=one_device_mesh())
    finally:
        if previous is None:
            jax.config.update("jax_compilation_cache_dir", None)
            jax_cache.reset_cache()
    return cfg, sweep_dir, interrupted, results


def test_micro_sweep_writes_results(micro):
    cfg, sweep_dir, _, results = micro
    assert [r["name"] for r in results] == ["s1_b1_mot", "s1_b2_mot", "s2_b1_mot", "s2_b2_mot"]
    assert [r["status"] for r in results] == ["trained"] * 4
    for r in results:
        on_disk = json.load(open(os.path.join(sweep_dir, "runs", r["name"], "result.json")))
        assert on_disk["name"] == r["name"] and "status" not in on_disk
        assert r["steps"] == (4 if r["budget"] == "b1" else 8)
        assert r["tokens"] == r["steps"] * 8 * 48
        assert r["flops"] == pytest.approx(r["train_flops_per_token"] * r["tokens"])
        assert r["n_params_total"] > r["n_params_active"] > r["n_params_non_embedding"] \
            > r["n_params_backbone"] > 0
        assert 0.0 < r["image_fraction"] < 1.0
        for key in ("loss", "text_loss", "image_loss"):
            assert np.isfinite(r[key]) and r[key] > 0
        assert [c["step"] for c in r["curve"]] == [r["steps"]]  # micro: evals_per_run=0
        assert r["curve"][-1]["loss"] == pytest.approx(r["loss"])
        assert [c["step"] for c in r["train_curve"]][-1] == r["steps"]
        assert r["curve"][-1]["flops"] == pytest.approx(r["flops"])
    sizes = {r["size"]: r["n_params_non_embedding"] for r in results}
    assert sizes["s2"] > sizes["s1"]
    # One shared build: every run reads the same tokens and SentencePiece model.
    assert os.path.exists(os.path.join(sweep_dir, "shared", "shared.json"))
    assert not os.path.exists(os.path.join(sweep_dir, "runs", "s1_b1_mot", "image_tokens"))
    assert len(json.load(open(os.path.join(sweep_dir, "results.json")))) == 4


def test_interrupted_point_resumes_from_its_checkpoint(micro):
    _, sweep_dir, interrupted, results = micro
    assert interrupted == {"name": "s2_b2_mot", "status": "interrupted", "step": 4}
    resumed = results[-1]
    assert [(a["start_step"], a["end_step"]) for a in resumed["attempts"]] == [(0, 4), (4, 8)]
    assert resumed["wall_s"] == pytest.approx(sum(a["wall_s"] for a in resumed["attempts"]))


def test_rerun_skips_finished_points_without_training(micro, monkeypatch):
    cfg, sweep_dir, _, results = micro
    from mmjax import train

    def no_training(*args, **kwargs):
        raise AssertionError("a finished point was trained again")

    monkeypatch.setattr(train, "train", no_training)
    stamps = {r["name"]: os.path.getmtime(os.path.join(sweep_dir, "runs", r["name"],
                                                       "result.json")) for r in results}
    again = sweep.run_sweep(cfg, sweep_dir, mesh=one_device_mesh(), report=False)
    assert [r["status"] for r in again] == ["skipped"] * 4
    assert [r["loss"] for r in again] == [r["loss"] for r in results]
    for name, stamp in stamps.items():
        assert os.path.getmtime(os.path.join(sweep_dir, "runs", name, "result.json")) == stamp


def test_micro_report_writes_figures_and_says_what_it_could_not_fit(micro):
    _, sweep_dir, _, _ = micro
    rep = json.load(open(os.path.join(sweep_dir, "report", "report.json")))
    assert rep["num_runs"] == 4
    for key in ("loss", "text_loss", "image_loss"):
        entry = rep["scaling"][f"mot_{key}"]
        assert entry["num_runs"] == 4
        assert "chinchilla" in entry["errors"]  # 4 runs < the 5 a 5-parameter law needs
        assert "power_law_n" in entry["errors"]  # 2 sizes < 3
        for fig in entry["figures"]:
            assert os.path.getsize(os.path.join(sweep_dir, "report", fig)) > 1000
        assert f"loss_vs_flops_mot_{key}.png" in entry["figures"]
        assert f"isoflops_mot_{key}.png" in entry["figures"]


# ----------------------------------------------------------------------------- synthetic report

LAW = dict(E=1.5, A=40.0, B=300.0, alpha=0.35, beta=0.3)


def _law(n, d):
    return LAW["E"] + LAW["A"] / n ** LAW["alpha"] + LAW["B"] / d ** LAW["beta"]


def _synthetic_results(sweep_dir, archs=("mot",), mot_gain=1.0, sizes=(1e4, 1e5, 3e5, 1e6),
                       budgets=(1e6, 3e6, 3e7), flops_per_token=lambda n: 6 * n, seeds=(None,),
                       seed_noise=0.0):
    """result.json files on a sizes x budgets (x seeds) grid whose final losses follow LAW
    exactly (times exp(seed_noise * normal) per seed)."""
    index = 0
    rng = np.random.default_rng(0)
    for arch in archs:
        for i, n in enumerate(sizes):
            for j, d in enumerate(budgets):
                for seed in seeds:
                    noise = float(np.exp(seed_noise * rng.normal())) if seed_noise else 1.0
                    steps = np.linspace(d / 8, d, 8)
                    scale = mot_gain if arch == "mot" else 1.0
                    fpt = float(flops_per_token(n))
                    curve = [{"step": int(k), "tokens": t, "flops": fpt * t,
                              "loss": _law(n, t * scale) * noise,
                              "text_loss": _law(n, t * scale) / 2}
                             for k, t in enumerate(steps, 1)]
                    name = f"n{i}_d{j}_{arch}" + ("" if seed is None else f"_seed{seed}")
                    r = {"name": name, "index": index, "size": f"n{i}", "seed": seed,
                         "budget": f"d{j}", "arch": arch, "n_params_non_embedding": n,
                         "n_params_total": n * (2 if arch == "mot" else 1), "tokens": d,
                         "train_flops_per_token": fpt, "flops": fpt * d,
                         "loss": curve[-1]["loss"], "text_loss": curve[-1]["text_loss"],
                         "curve": curve, "wall_s": 1.0}
                    mmjax_io.write_json_atomic(os.path.join(sweep_dir, "runs", r["name"],
                                                         "result.json"), r)
                    index += 1


def test_report_recovers_a_known_law(tmp_path):
    _synthetic_results(str(tmp_path))
    cfg = ml_collections.ConfigDict(dict(analyses=("scaling",), loss_keys=("loss",),
                                         param_key="n_params_non_embedding",
                                         compare=("dense", "mot"), fit_starts=8))
    rep = report.report(cfg, str(tmp_path))
    entry = rep["scaling"]["mot_loss"]
    assert entry["errors"] == {}
    chin = entry["chinchilla"]
    assert chin["alpha"] == pytest.approx(LAW["alpha"], rel=0.02)
    assert chin["beta"] == pytest.approx(LAW["beta"], rel=0.02)
    assert chin["E"] == pytest.approx(LAW["E"], rel=0.02)
    assert chin["r2"] > 0.9999 and chin["r2_holdout_largest_size"] > 0.999
    opt = entry["compute_optimal"]
    assert [o["flops"] for o in opt] == sorted(o["flops"] for o in opt)
    assert all(o["n_opt"] * o["d_opt"] * 6 == pytest.approx(o["flops"]) for o in opt)
    assert entry["power_law_n"]["r2"] > 0.99 and entry["power_law_c"]["r2"] > 0.9
    assert isinstance(entry["isoflop_optima"], list)
    for fig in entry["figures"]:
        assert os.path.getsize(os.path.join(tmp_path, "report", fig)) > 1000


def test_report_with_seeds_uses_the_runs_flops_per_token_and_bootstrap_intervals(tmp_path):
    # FLOPs per token of small models: 6N plus an N-independent share (attention and heads).
    fpt = lambda n: 6 * n + 2e5
    _synthetic_results(str(tmp_path), flops_per_token=fpt, seeds=(0, 1), seed_noise=0.003)
    cfg = ml_collections.ConfigDict(dict(analyses=("scaling",), loss_keys=("loss",),
                                         param_key="n_params_non_embedding",
                                         compare=("dense", "mot"), fit_starts=8,
                                         bootstrap_samples=20, bootstrap_seed=0))
    rep = report.report(cfg, str(tmp_path))
    assert len(rep["git_commit"]) == 40 and isinstance(rep["git_dirty"], bool)
    entry = rep["scaling"]["mot_loss"]
    assert entry["errors"] == {} and entry["num_runs"] == 24
    # Seeds: one summary per (size, budget), mean and spread of its two runs.
    seeds = entry["seeds"]
    assert len(seeds) == 12 and all(a["n_seeds"] == 2 and sorted(a["seeds"]) == [0, 1]
                                    for a in seeds)
    runs = {r["name"]: r for r in report.read_results(str(tmp_path))}
    a = next(a for a in seeds if a["size"] == "n2" and a["budget"] == "d1")
    pair = [runs["n2_d1_mot_seed0"]["loss"], runs["n2_d1_mot_seed1"]["loss"]]
    assert a["loss"] == pytest.approx(np.mean(pair))
    assert a["loss_std"] == pytest.approx(np.std(pair, ddof=1)) and a["loss_std"] > 0
    assert (a["loss_min"], a["loss_max"]) == pytest.approx((min(pair), max(pair)))
    # Bootstrap intervals around the fit contain the law the runs were drawn from.
    chin = entry["chinchilla"]
    assert chin["bootstrap"]["samples"] == 20 and chin["bootstrap"]["seed"] == 0
    for k, v in LAW.items():
        lo, hi = chin["intervals"][k]
        assert lo <= v <= hi, (k, lo, v, hi)
    assert chin["degenerate"] == [] and entry["notes"] == []
    # Compute-optimal rows spend C as the runs count it, not 6ND.
    assert "not Chinchilla's C = 6ND" in entry["compute_optimal_flops"]
    fit = fits.ChinchillaFit(**{k: chin[k] for k in ("E", "A", "B", "alpha", "beta")}, loss=0.0)
    # The report knows f only at the sweep's sizes: log-log between them (exact at the sizes,
    # within 20% of 6N + 2e5 between these 3-10x apart sizes), linear in N beyond.
    sizes = np.array([1e4, 1e5, 3e5, 1e6])
    f = fits.interpolate_flops_per_token(sizes, fpt(sizes))
    assert f(sizes) == pytest.approx(fpt(sizes))
    between = np.geomspace(1e4, 1e7, 50)
    assert np.max(np.abs(f(between) / fpt(between) - 1)) < 0.2
    for o in entry["compute_optimal"]:
        assert o["flops_per_token"] * o["d_opt"] == pytest.approx(o["flops"], rel=1e-9)
        assert o["flops_per_token"] == pytest.approx(f(o["n_opt"]))
        assert o["c_6nd"] == pytest.approx(6 * o["n_opt"] * o["d_opt"]) and o["c_6nd"] < o["flops"]
        grid_n = np.exp(np.linspace(np.log(1e2), np.log(1e9), 200001))
        brute = grid_n[np.argmin(fit.predict(grid_n, o["flops"] / f(grid_n)))]
        assert o["n_opt"] == pytest.approx(brute, rel=2e-3)
        lo, hi = o["n_opt_interval"]
        assert lo <= o["n_opt"] * 1.001 and o["n_opt"] <= hi * 1.001
    for fig in entry["figures"]:
        assert os.path.getsize(os.path.join(tmp_path, "report", fig)) > 1000


def test_mot_vs_dense_report_on_synthetic_curves(tmp_path):
    # MoT's curve is dense's with twice the tokens: it reaches dense's final loss at half the
    # FLOPs (up to linear interpolation between evaluations).
    _synthetic_results(str(tmp_path), archs=("dense", "mot"), mot_gain=2.0, sizes=(1e4, 1e5),
                       budgets=(1e6, 1e7))
    cfg = ml_collections.ConfigDict(dict(analyses=("mot_vs_dense",),
                                         loss_keys=("loss", "text_loss"),
                                         param_key="n_params_non_embedding",
                                         compare=("dense", "mot")))
    rep = report.report(cfg, str(tmp_path))["mot_vs_dense"]
    assert sorted(rep) == ["n0_d0", "n0_d1", "n1_d0", "n1_d1"]
    entry = rep["n1_d1"]
    assert entry["flops_ratio"] == pytest.approx(1.0)
    for key in ("loss", "text_loss"):
        assert entry[key]["fraction"] == pytest.approx(0.5, abs=0.02)
        assert entry[key]["upper_bound"] is False
    assert os.path.exists(os.path.join(tmp_path, "report", entry["figure"]))
    assert study.summarize(rep, ["loss"])["loss"][0] == pytest.approx(0.5, abs=0.02)


def test_mot_vs_dense_pairs_runs_of_the_same_seed(tmp_path):
    _synthetic_results(str(tmp_path), archs=("dense", "mot"), mot_gain=2.0, sizes=(1e4,),
                       budgets=(1e6,), seeds=(0, 1))
    results = report.read_results(str(tmp_path))
    matched = study.pairs(results, "dense", "mot")
    assert [(b["name"], c["name"]) for b, c in matched] == [
        ("n0_d0_dense_seed0", "n0_d0_mot_seed0"), ("n0_d0_dense_seed1", "n0_d0_mot_seed1")]
    rep = study.compare(results, "dense", "mot", ("loss",), str(tmp_path / "report"))
    assert sorted(rep) == ["n0_d0_seed0", "n0_d0_seed1"]


def test_curves_from_metrics_rows_last_row_of_a_step_wins():
    rows = [{"step": 2, "loss": 5.0, "text_loss": 3.0, "grad_norm": 1.0},
            {"step": 2, "val_loss": 6.0, "val_text_loss": 4.0, "val_image_loss": 2.0},
            {"step": 4, "loss": 4.0, "text_loss": 2.5},
            {"step": 4, "loss": 3.9, "text_loss": 2.4},  # re-logged after a resume
            {"step": 4, "val_loss": 5.0, "val_text_loss": 3.5, "val_image_loss": 1.5}]
    val, train = sweep.curves(rows, tokens_per_step=10, flops_per_token=3.0,
                              keys=("loss", "text_loss", "image_loss"))
    assert val == [{"step": 2, "tokens": 20, "flops": 60.0, "loss": 6.0, "text_loss": 4.0,
                    "image_loss": 2.0},
                   {"step": 4, "tokens": 40, "flops": 120.0, "loss": 5.0, "text_loss": 3.5,
                    "image_loss": 1.5}]
    assert train == [{"step": 2, "tokens": 20, "flops": 60.0, "loss": 5.0, "text_loss": 3.0},
                     {"step": 4, "tokens": 40, "flops": 120.0, "loss": 3.9, "text_loss": 2.4}]


# ----------------------------------------------------------------------------- FLOPs fraction


def test_flops_fraction_known_answer():
    c = np.arange(10, 101, 10.0)
    dense = [{"flops": f, "text_loss": 10 - 0.05 * f} for f in c]  # final 5.0 at C=100
    mot = [{"flops": f, "text_loss": 10 - 0.08 * f} for f in c]  # 5.0 at C=62.5
    out = study.flops_fraction(dense, mot, "text_loss")
    assert out["fraction"] == pytest.approx(0.625)
    assert out["candidate_flops_at_match"] == pytest.approx(62.5)
    assert out["baseline_final_loss"] == pytest.approx(5.0) and not out["upper_bound"]
    worse = [{"flops": f, "text_loss": 10 - 0.01 * f} for f in c]
    assert study.flops_fraction(dense, worse, "text_loss")["fraction"] is None
    better = [{"flops": f, "text_loss": 1.0} for f in c]
    out = study.flops_fraction(dense, better, "text_loss")
    assert out["fraction"] == pytest.approx(0.1) and out["upper_bound"]
    with pytest.raises(ValueError, match="image_loss"):
        study.flops_fraction(dense, mot, "image_loss")
    with pytest.raises(ValueError, match="increasing"):
        study.crossing([2.0, 1.0], [3.0, 2.0], 2.5)


# ----------------------------------------------------------------------------- grid


def test_grid_points_schedule_and_errors():
    cfg = grid.load_config_spec(MICRO)
    base = grid.base_config(cfg)
    points = grid.points(cfg)
    assert [p.index for p in points] == [0, 1, 2, 3]
    shared = {"fsq": {"tokens_dir": "/x"}}
    c = grid.point_config(base, points[3], shared, cfg)
    assert (c.model.d_model, c.train.steps, c.train.eval_every, c.fsq.tokens_dir) == \
        (16, 8, 0, "/x")
    c = grid.point_config(base, points[3], shared, cfg, steps=100)
    assert (c.train.steps, c.train.warmup_steps, c.train.checkpoint_every) == (100, 10, 50)
    assert grid.steps_for_flops(1e9, 1e3, 100, 5) == 10_000
    assert grid.steps_for_flops(1.0, 1e3, 100, 5) == 5
    with pytest.raises(ValueError, match=r"sweep\.shared"):
        bad = grid.points(ml_collections.ConfigDict(dict(
            sizes={"a": {"data": {"num_train": 3}}}, budgets={}, archs={})))[0]
        grid.point_config(base, bad, {}, cfg)
    with pytest.raises(ValueError, match="model.widht"):
        bad = grid.points(ml_collections.ConfigDict(dict(
            sizes={"a": {"model": {"widht": 3}}}, budgets={}, archs={})))[0]
        grid.point_config(base, bad, {}, cfg)
    with pytest.raises(ValueError, match="flops"):
        grid.points(ml_collections.ConfigDict(dict(sizes={}, budgets={"b": {"flops": -1.0}},
                                                   archs={})))
    with pytest.raises(ValueError, match="entry name"):
        grid.points(ml_collections.ConfigDict(dict(sizes={"a/b": {}}, budgets={}, archs={})))
    with pytest.raises(ValueError, match="--point=9"):
        grid.select(points, 9)
    with pytest.raises(ValueError, match="no such file"):
        grid.load_config_spec("configs/nope.py:x")


def test_seeds_axis_varies_init_and_data_order_per_point():
    cfg = grid.load_config_spec(MICRO)
    cfg.seeds = (3, 5)
    base = grid.base_config(cfg)
    points = grid.points(cfg)
    assert [p.name for p in points[:3]] == ["s1_b1_mot_seed3", "s1_b1_mot_seed5",
                                           "s1_b2_mot_seed3"]
    assert [p.index for p in points] == list(range(8)) and [p.seed for p in points[:2]] == [3, 5]
    c = grid.point_config(base, points[1], {}, cfg)
    assert (c.seed, c.data.shuffle_seed, c.model.d_model) == (5, 5, 8)
    assert grid.point_config(base, points[0], {}, cfg).data.num_train == base.data.num_train
    one = grid.load_config_spec(MICRO)  # no seeds axis: base seeds, names without a seed
    assert [p.seed for p in grid.points(one)] == [None] * 4
    assert grid.point_config(base, grid.points(one)[0], {}, one).seed == base.seed
    tiny = grid.load_config_spec("configs/sweep_scaling.py:tiny")
    assert tuple(tiny.seeds) == (0, 1) and len(grid.points(tiny)) == 24
    for bad in ((1, 1), (-1,), (1.5,)):
        cfg.seeds = bad
        with pytest.raises(ValueError, match="sweep.seeds"):
            grid.points(cfg)


def test_cli_lists_the_grid():
    out = subprocess.run([sys.executable, "-m", "mmjax.scaling.sweep", f"--config={MICRO}",
                          "--list"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[3].split()[:2] == ["3", "s2_b2_mot"]
