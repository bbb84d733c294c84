"""FSQ image tokenizer on the embedded shapes data.

Usage: python -m mmjax.main --config=configs/fsq_shapes.py:SIZE --workdir=DIR --mode=tokenizer
SIZE: smoke (seconds, for tests) | demo (README budget, ~2 min on 2 CPU cores) | default | long.
Add `,big` (e.g. `demo,big`) for the 64000-code levels [8,8,8,5,5,5] instead of [8,5,5,5].
"""
from mmjax import config_defaults

SIZES = {
    # name: (tokenizer steps, batch size, train examples, conv widths)
    # Three widths = two 2x downsamples: 32x32 images -> 8x8 = 64 image tokens.
    "smoke": dict(steps=4, batch_size=8, num_train=64, channels=(8, 16, 16)),
    "demo": dict(steps=600, batch_size=32, num_train=4096, channels=(32, 64, 64)),
    "default": dict(steps=2000, batch_size=64, num_train=8192, channels=(32, 64, 64)),
    "long": dict(steps=6000, batch_size=64, num_train=16384, channels=(64, 128, 128)),
}


def get_config(arg: str = "demo"):
    size, options = config_defaults.size_and_options(
        arg, config_file="configs/fsq_shapes.py", sizes=SIZES, options=("big",), default="demo")
    s = SIZES[size]
    c = config_defaults.base_config()
    del c.model, c.objective, c.train, c.sample  # tokenizer-only config
    c.data.num_train = s["num_train"]
    c.data.num_validation = 64 if size == "smoke" else 512
    c.data.num_test = 64 if size == "smoke" else 512
    c.fsq.channels = s["channels"]
    if "big" in options:
        c.fsq.levels = (8, 8, 8, 5, 5, 5)
    c.tokenizer_train.steps = s["steps"]
    c.tokenizer_train.batch_size = s["batch_size"]
    c.tokenizer_train.warmup_steps = min(100, s["steps"] // 10)
    c.tokenizer_train.checkpoint_every = max(s["steps"] // 2, 1)
    c.tokenizer_train.log_every = max(min(50, s["steps"] // 4), 1)
    c.tokenizer_train.eval_batches = 2 if size == "smoke" else 8
    return c
