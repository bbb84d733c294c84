"""MoT vs dense at equal active FLOPs on the embedded shapes data (mmjax.scaling.study).

Usage: python -m mmjax.scaling.sweep --config=configs/sweep_mot_vs_dense.py:ARG --sweep_dir=DIR
ARG = SIZE[,discrete]
  SIZE: micro (tests) | tiny (CPU, ~5 min on 2 cores) | small (one accelerator)
Seeds: add `--config.seeds="(0,1)"` to run both arms once per seed (pairs are matched per seed).
Both arms have the same backbone sizes, steps and batch, so equal FLOPs per token (a MoT token
uses only its modality's weights); MoT has num_modalities x the backbone parameters. Validation
runs `evals_per_run` times along training; the report gives, per modality, the fraction of the
dense run's FLOPs at which MoT first reaches dense's final validation loss (the MoT paper: 55.8%
in the Chameleon 7B setting) and a loss-vs-FLOPs figure.
"""
from mmjax import config_defaults

SIZES = {
    "micro": dict(d_model=16, num_layers=1, num_heads=2, mlp_dim=32, flow_width=16, flow_depth=1),
    "tiny": dict(d_model=32, num_layers=2, num_heads=2, mlp_dim=96, flow_width=64, flow_depth=1),
    "small": dict(d_model=256, num_layers=8, num_heads=8, mlp_dim=768, flow_width=512,
                  flow_depth=2),
}
# steps, batch, validations along training, data size, tokenizer steps / widths, eval batches.
RUNS = {
    "micro": dict(steps=8, batch=8, evals=4, num_train=64, num_val=32, tok_steps=2,
                  channels=(8, 8, 8, 8), seq=48, eval_batches=1, lr=3e-3),
    "tiny": dict(steps=600, batch=16, evals=20, num_train=4096, num_val=256, tok_steps=200,
                 channels=(8, 16, 32, 32), seq=48, eval_batches=8, lr=3e-3),
    "small": dict(steps=5000, batch=64, evals=25, num_train=16384, num_val=512, tok_steps=2000,
                  channels=(32, 64, 64), seq=96, eval_batches=8, lr=2e-3),
}


def get_config(arg: str = "tiny"):
    size, options = config_defaults.size_and_options(
        arg, config_file="configs/sweep_mot_vs_dense.py", sizes=SIZES, options=("discrete",),
        default="tiny")
    r = RUNS[size]
    c = config_defaults.sweep_config()
    c.base = "configs/mot_shapes.py:smoke"
    c.shared = {
        "data": dict(num_train=r["num_train"], num_validation=r["num_val"],
                     num_test=r["num_val"]),
        "fsq": dict(channels=r["channels"]),  # 32x32 -> 4x4 tokens with 4 widths
        "tokenizer_train": dict(steps=r["tok_steps"], batch_size=32,
                                warmup_steps=r["tok_steps"] // 10,
                                checkpoint_every=max(r["tok_steps"], 1),
                                log_every=max(r["tok_steps"] // 4, 1)),
        "model": dict(max_seq_len=r["seq"],
                      image_head="discrete" if "discrete" in options else "flow"),
        "train": dict(batch_size=r["batch"], eval_batches=r["eval_batches"], lr=r["lr"],
                      steps=r["steps"]),
    }
    c.sizes = {size: {"model": SIZES[size]}}
    c.archs = {"dense": {"model": dict(num_modalities=1)},
               "mot": {"model": dict(num_modalities=2)}}
    c.evals_per_run = r["evals"]
    c.analyses = ("mot_vs_dense",)
    c.compare = ("dense", "mot")
    c.loss_keys = ("loss", "text_loss", "image_loss")
    return c
