"""Scaling-law sweeps on the embedded shapes data (run with mmjax.scaling.sweep).

Usage: python -m mmjax.scaling.sweep --config=configs/sweep_scaling.py:ARG --sweep_dir=DIR
ARG = SIZE[,OPTION...]
  SIZE:    micro (tests: 2 sizes x 2 step budgets, one seed, seconds per run)
           | tiny (CPU: 4 sizes x 3 FLOPs budgets x 2 seeds, ~25 min on 2 cores)
           | small (one accelerator: 5 sizes x 3 FLOPs budgets x 2 seeds)
  OPTIONS: dense (one modality instead of MoT) | both (MoT and dense, fitted separately)
           | discrete (FSQ-index head instead of the flow head)
Each point runs once per seed (config.seed and data.shuffle_seed; the shared build is the same),
so the report gives every (size, budget) a mean and a spread, and the figures error bars.
FLOPs budgets give isoFLOP profiles (Chinchilla approach 2) as well as the approach-3 fit; the
steps of each point are derived from its analytic FLOPs per token (mmjax.flops).
"""
from mmjax import config_defaults

# Backbone sizes: name -> model fields. Flow head width follows d_model.
SIZES = {
    "micro": {
        "s1": dict(d_model=8, num_layers=1, num_heads=1, mlp_dim=16, flow_width=8, flow_depth=1),
        "s2": dict(d_model=16, num_layers=1, num_heads=2, mlp_dim=32, flow_width=16,
                   flow_depth=1),
    },
    # Sizes 4.3x apart in N and FLOPs budgets large enough that the biggest model still gets
    # >= 150 steps (fewer optimizer steps than that is a regime no L(N, D) law describes).
    "tiny": {
        "s1": dict(d_model=16, num_layers=1, num_heads=2, mlp_dim=48, flow_width=32,
                   flow_depth=1),
        "s2": dict(d_model=20, num_layers=1, num_heads=2, mlp_dim=60, flow_width=40,
                   flow_depth=1),
        "s3": dict(d_model=24, num_layers=2, num_heads=2, mlp_dim=72, flow_width=48,
                   flow_depth=1),
        "s4": dict(d_model=32, num_layers=2, num_heads=2, mlp_dim=96, flow_width=64,
                   flow_depth=1),
    },
    "small": {
        "s1": dict(d_model=64, num_layers=2, num_heads=2, mlp_dim=192, flow_width=128,
                   flow_depth=2),
        "s2": dict(d_model=96, num_layers=3, num_heads=3, mlp_dim=288, flow_width=192,
                   flow_depth=2),
        "s3": dict(d_model=128, num_layers=4, num_heads=4, mlp_dim=384, flow_width=256,
                   flow_depth=2),
        "s4": dict(d_model=192, num_layers=6, num_heads=6, mlp_dim=576, flow_width=384,
                   flow_depth=2),
        "s5": dict(d_model=256, num_layers=8, num_heads=8, mlp_dim=768, flow_width=512,
                   flow_depth=2),
    },
}
# Budgets: name -> {"train": {...}} (fixed steps) or {"flops": C} (steps derived per size).
BUDGETS = {
    "micro": {"b1": {"train": dict(steps=4)}, "b2": {"train": dict(steps=8)}},
    "tiny": {"c1": {"flops": 5.0e10}, "c2": {"flops": 1.0e11}, "c3": {"flops": 2.0e11}},
    "small": {"c1": {"flops": 1e14}, "c2": {"flops": 3e14}, "c3": {"flops": 1e15}},
}
# Shared settings (data, tokenizer, batch): the same for every point of a sweep.
SHARED = {
    "micro": dict(num_train=32, num_val=32, tok_steps=2, channels=(8, 8, 8, 8), batch=8,
                  seq=48, eval_batches=1, lr=3e-3),
    "tiny": dict(num_train=4096, num_val=256, tok_steps=200, channels=(8, 16, 32, 32), batch=16,
                 seq=48, eval_batches=8, lr=3e-3),
    "small": dict(num_train=16384, num_val=512, tok_steps=2000, channels=(32, 64, 64),
                  batch=64, seq=96, eval_batches=8, lr=2e-3),
}
OPTIONS = ("dense", "both", "discrete")


def get_config(arg: str = "tiny"):
    size, options = config_defaults.size_and_options(
        arg, config_file="configs/sweep_scaling.py", sizes=SIZES, options=OPTIONS, default="tiny")
    s = SHARED[size]
    c = config_defaults.sweep_config()
    c.base = "configs/mot_shapes.py:smoke"
    c.shared = {
        "data": dict(num_train=s["num_train"], num_validation=s["num_val"],
                     num_test=s["num_val"]),
        # 2**(len(channels)-1) downsampling (fsq.patch_size 1): 32x32 images -> 4x4 = 16 tokens
        # with 4 channels.
        "fsq": dict(channels=s["channels"]),
        "tokenizer_train": dict(steps=s["tok_steps"], batch_size=32,
                                warmup_steps=s["tok_steps"] // 10,
                                checkpoint_every=max(s["tok_steps"], 1),
                                log_every=max(s["tok_steps"] // 4, 1)),
        "model": dict(max_seq_len=s["seq"],
                      image_head="discrete" if "discrete" in options else "flow"),
        "train": dict(batch_size=s["batch"], eval_batches=s["eval_batches"], lr=s["lr"]),
    }
    c.sizes = {k: {"model": v} for k, v in SIZES[size].items()}
    c.budgets = BUDGETS[size]
    if "both" in options:
        c.archs = {"mot": {"model": dict(num_modalities=2)},
                   "dense": {"model": dict(num_modalities=1)}}
    else:
        c.archs = {"dense" if "dense" in options else "mot":
                   {"model": dict(num_modalities=1 if "dense" in options else 2)}}
    # micro validates only at the end: each mid-run validation is one more XLA compile in tests.
    c.evals_per_run = 0 if size == "micro" else 4
    c.min_steps = 4 if size == "micro" else 20
    # Two seeds per point (error bars); micro keeps one: it only tests the machinery.
    c.seeds = () if size == "micro" else (0, 1)
    return c
