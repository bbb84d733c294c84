"""Text <-> image Mixture-of-Transformers on the embedded shapes data (the README demo).

Usage: python -m mmjax.main --config=configs/mot_shapes.py:ARG --workdir=DIR [--mode=pipeline]
ARG = SIZE[,OPTION...]
  SIZE:    smoke (seconds; tests) | demo (README; 12-21 min on 2 idle CPU cores, by host)
           | cpu_hour (the demo model trained 5x longer: about an hour on 2 CPU cores) | small
           | base | 300m | 1b (accelerators; bf16, remat)
  OPTIONS: discrete (FSQ-index head instead of the flow head) | dense (one modality)
           | mot3 (three modalities: the third is unused by this data, for FLOPs/overhead studies)
           | digits (the digits dataset instead of shapes)
           | edits (shapes_edits: image A, instruction, image B [, instruction, C ...] documents;
             the sample stage scores edit_acc / preserve_acc; data.num_* count edit chains)
           | vq (a VQ-VAE tokenizer, the FSQ paper's baseline, in place of FSQ: as many codes as
             the FSQ grid, of its width, with an EMA codebook and dead-code reseeding)
           | grid4 | grid8 (image tokens per side: TOKEN_GRIDS; each size has its default)
"""
import math

from mmjax import config_defaults, config_validation

# Backbone sizes. Rows of model.max_seq_len tokens hold whole caption<->image documents.
MODEL_SIZES = {
    "smoke": dict(num_layers=2, d_model=32, num_heads=2, mlp_dim=64, flow_width=32, flow_depth=1),
    # demo: a small flow head (2 t-samples); run at its targets only it is ~18% of a step's
    # FLOPs (flops.flops_per_token: 0.40 of 2.22 MFLOP per token forward).
    "demo": dict(num_layers=4, d_model=128, num_heads=4, mlp_dim=384, flow_width=128, flow_depth=2,
                 flow_t_samples=2),
    "cpu_hour": dict(num_layers=4, d_model=128, num_heads=4, mlp_dim=384, flow_width=128,
                     flow_depth=2, flow_t_samples=2),
    "small": dict(num_layers=8, d_model=256, num_heads=4, mlp_dim=768, flow_width=512, flow_depth=3),
    "base": dict(num_layers=12, d_model=768, num_heads=12, mlp_dim=2048, flow_width=1024,
                 flow_depth=3),
    "300m": dict(num_layers=24, d_model=1024, num_heads=16, mlp_dim=2816, flow_width=1024,
                 flow_depth=3),
    "1b": dict(num_layers=24, d_model=2048, num_heads=16, mlp_dim=5632, flow_width=1536,
               flow_depth=3),
}
# Training budgets: model steps and batch, tokenizer steps and batch, tokenizer widths, examples.
TRAIN_SIZES = {
    "smoke": dict(steps=3, batch_size=4, tok_steps=3, tok_batch=4, channels=(8, 16, 16),
                  num_train=64),
    # demo: batch 16 runs at the same real tokens/s on 2 CPU cores as batch 32 (bench.step_time:
    # 124 vs 236 ms/step), and twice the updates for the same examples gave a better model
    # (bench/results/ablation_demo.json). The tokenizer's full-resolution level has 16 channels,
    # not 32: XLA CPU runs the backward pass of 3x3 convolutions slowly and that level held most
    # of a step, so a step trains 1.64x the images per second (python -m bench.tokenizer_width)
    # and 3600 steps take about the time 2400 took. Its reconstruction ceiling (whole prompts on
    # the 512 test images) is then 97.1% (90.2% after 2400 steps; 32 channels: 89-94% after
    # 2400), and the model on its tokens learns faster: 75.2% whole prompts after 3800 steps
    # (seed 0; 62.3% on the 32-channel tokenizer), so the model trains 3000 steps: 12 min 19 s
    # end to end on a 2-core Zen 4 host, 21 min 21 s on an AVX2-only one
    # (tokenizer_width_2026_12_07 in bench/results/ablation_demo.json). A 2x2 pixel-unshuffle
    # stem instead of that level (fsq.patch_size=2, channels (32, 64, 64)) steps 2.3x as fast,
    # but 6000 of its steps (~6 min) reach 33.7 dB / 96.1%, and the model on those tokens gets
    # 58.2% whole prompts, objects 74.9% (seed 0; tokenizer_patch2_2026_12_07).
    # 16384 distinct images, not 4096: on grid4 a step holds 32 documents, so 4096 images were
    # each seen ~30 times and the model over-fitted (validation image loss 0.089 against 0.061 in
    # training); with 4x the images whole prompts go from 47.1% to 63.0% (3 seeds) for about
    # 31 s more of data building and tokenizing (bench/results/ablation_demo.json).
    "demo": dict(steps=3000, batch_size=16, tok_steps=3600, tok_batch=16, channels=(16, 64, 64),
                 num_train=16384, grid="grid4"),
    # cpu_hour: what an hour of 2 CPU cores buys: the demo model for 5x its steps, on the
    # demo's 16384 distinct images, and a tokenizer trained on 2x the images per step (its
    # grid4 ceiling: 96.1%). On grid4 it gets whole prompts right 80.9% (grid8: 54.1%; seed 0,
    # bench/results/ablation_demo.json).
    "cpu_hour": dict(steps=16000, batch_size=16, tok_steps=2400, tok_batch=32,
                     channels=(32, 64, 64), num_train=16384, grid="grid4"),
    "small": dict(steps=5000, batch_size=64, tok_steps=2000, tok_batch=64, channels=(32, 64, 64),
                  num_train=16384),
    "base": dict(steps=20000, batch_size=256, tok_steps=4000, tok_batch=64,
                 channels=(64, 128, 128), num_train=65536),
    "300m": dict(steps=50000, batch_size=256, tok_steps=4000, tok_batch=64,
                 channels=(64, 128, 128), num_train=65536),
    "1b": dict(steps=100000, batch_size=512, tok_steps=4000, tok_batch=64,
               channels=(64, 128, 128), num_train=65536),
}
# Image token grids of a 32x32 image: the tokenizer's downsamples and FSQ levels.
# grid8: 8x8 = 64 tokens of 10 bits (fsq.levels' default, FSQ's recommended 2^10 levels).
# grid4: one more 2x downsample at the last width, 4x4 = 16 tokens of 24 bits (8 channels of 8
# levels, 2^24 codes: only the flow head can emit them; the discrete head and VQ need grid8). A
# quarter of the tokens per image, so a 96-token row holds 2 documents instead of 1 and the
# image heads run on a quarter of the positions: at the demo budget the model sees twice the
# documents in the same steps and (on 4096 images) gets whole prompts right 47.1% (3 seeds)
# where grid8 gets 26.6%, at a tokenizer ceiling of 93.6% instead of 98.0%
# (bench/results/ablation_demo.json).
TOKEN_GRIDS = {"grid8": dict(extra_downsample=False, levels=None),  # None: fsq.levels' default
               "grid4": dict(extra_downsample=True, levels=(8,) * 8)}
# Rows per direction group (objective.direction_group_rows): at grid4, two documents per 96-token
# row, so a group of 4 rows holds 5 or 6 text->image documents at t2i_prob 0.7 and the image
# heads run on 6 images per 8 documents instead of 8 (mmjax/targets.py; grid8: one document per
# row, 3 images per 4). t2i_prob 0.75 would fill every grid8 slot (exactly 3 of 4) but cost
# captions 4 points at the demo budget (bench/results/ablation_demo.json), so it stays 0.7.
# smoke: groups of 2, which a 2-process run's 2 rows per process hold (the grouped path runs in
# the pipeline tests). base and up: rows of 1024 tokens hold several documents each, so a
# row is a group already.
DIRECTION_GROUP_ROWS = {"smoke": 2, "demo": 4, "cpu_hour": 4, "small": 4}
# CPU sizes: one XLA device per core of the README's 2-core host (mesh.cpu_devices), so the
# tokenizer's small convolutions run data-parallel: 5.8 -> 8.4 steps/s (1.45x), about 2 min off
# the demo, while the model's steps run at the same speed on 1 or 2 devices (4 devices:
# tokenizer 9.0, model 19% slower; bench/results/cpu_devices.json).
CPU_DEVICES = {"demo": 2, "cpu_hour": 2}
# data.packing: the demo's captions fill its fixed two-documents rows to 73%; first-fit groups of
# 4 rows hold 2.4 documents per row (86% real tokens) for a 5% dearer step, and the same 3000
# steps see a fifth more documents: whole prompts 60.9-67.0% -> 69.7-73.6% over 3 seeds
# (first_fit_packing_2026_12_08 in bench/results/ablation_demo.json). cpu_hour keeps the
# packing its figures were measured with; grid8 options pack one document per row either way.
PACKING = {"demo": "first_fit"}
# edits (demo): the budget the README's edit figures were measured with (rows hold ~3.4x the
# tokens of a caption<->image row, so the batch is smaller than the demo's old 32).
EDITS_DEMO_TRAIN = dict(steps=1000, batch_size=10)
OPTIONS = ("discrete", "dense", "mot3", "digits", "edits", "vq") + tuple(TOKEN_GRIDS)
VQ_RESEED_STEPS = 100  # vq: a code unused this many steps is reseeded (bench.fsq_vs_vq's setting)
EDIT_INSTRUCTION_LEN = 20  # edits: instruction tokens (the longest instruction is ~14 words)


def get_config(arg: str = "demo"):
    size, options = config_defaults.size_and_options(
        arg, config_file="configs/mot_shapes.py", sizes=MODEL_SIZES, options=OPTIONS,
        default="demo")
    t = TRAIN_SIZES[size]
    c = config_defaults.base_config()
    c.data.name = "digits" if "digits" in options else "shapes"
    c.data.num_train = t["num_train"]
    c.data.num_validation = 64 if size == "smoke" else 512
    c.data.num_test = 64 if size == "smoke" else 512
    grid = _token_grid(t.get("grid", "grid8"), options)
    c.fsq.channels = t["channels"] + ((t["channels"][-1],) if grid["extra_downsample"] else ())
    if grid["levels"]:
        c.fsq.levels = grid["levels"]
    c.tokenizer_train.steps = t["tok_steps"]
    c.tokenizer_train.batch_size = t["tok_batch"]
    c.tokenizer_train.warmup_steps = min(100, t["tok_steps"] // 10)
    c.tokenizer_train.checkpoint_every = max(t["tok_steps"] // 2, 1)
    c.tokenizer_train.log_every = max(min(50, t["tok_steps"] // 4), 1)
    c.model.update(MODEL_SIZES[size])
    c.model.num_modalities = 1 if "dense" in options else (3 if "mot3" in options else 2)
    c.model.image_head = "discrete" if "discrete" in options else "flow"
    c.model.max_seq_len = 96
    if size in ("base", "300m", "1b"):
        c.model.dtype = "bfloat16"
        c.model.remat = "dots"
        c.model.max_seq_len = 1024
        c.data.image_size = 64
    _set_budget(c, t["steps"], t["batch_size"])
    c.objective.direction_group_rows = DIRECTION_GROUP_ROWS.get(size, 1)
    c.mesh.cpu_devices = CPU_DEVICES.get(size, 0)
    # grid8's 69-92-token documents fill a row one at a time under either packing
    c.data.packing = PACKING.get(size, "fixed") if grid is TOKEN_GRIDS["grid4"] else "fixed"
    c.train.eval_batches = 2 if size == "smoke" else 8
    c.sample.num_samples = 4 if size == "smoke" else 16
    c.sample.ode_steps = 4 if size == "smoke" else 16
    if size == "smoke":
        c.sample.max_text_len = 8
    if "edits" in options:
        _edits(c, size)
    if "vq" in options:
        c.fsq.quantizer = "vq"
        c.fsq.vq_codebook_size = math.prod(c.fsq.levels)
        c.fsq.vq_dim = len(c.fsq.levels)
        c.fsq.vq_reseed = VQ_RESEED_STEPS
    return c


def _token_grid(default: str, options: set) -> dict:
    """TOKEN_GRIDS entry: the one named in options, else grid8 for the discrete head and VQ
    (2^24 codes are too many for a softmax or a learned table), else the size's default."""
    named = sorted(options & set(TOKEN_GRIDS))
    if len(named) > 1:
        raise ValueError(f"configs/mot_shapes.py: options {named} exclude each other")
    needs_grid8 = sorted(options & {"discrete", "vq"})
    if named == ["grid4"] and needs_grid8:
        raise ValueError(f"configs/mot_shapes.py: option(s) {needs_grid8} need grid8 "
                         "(grid4's 2^24 FSQ codes are too many for a softmax or a VQ table)")
    return TOKEN_GRIDS[named[0] if named else ("grid8" if needs_grid8 else default)]


def _set_budget(c, steps: int, batch_size: int) -> None:
    """Model steps and batch, and the schedule fields that follow from the steps."""
    c.train.steps = steps
    c.train.batch_size = batch_size
    c.train.warmup_steps = min(200, steps // 10)
    c.train.checkpoint_every = max(steps // 4, 1)
    c.train.log_every = max(min(50, steps // 4), 1)


def _edits(c, size: str) -> None:
    """shapes_edits documents: up to CHAIN_EDITS + 1 images per document, one per row."""
    from mmjax import layout
    from mmjax.data import shapes_edits
    if "digits" in str(c.data.name):
        raise ValueError("configs/mot_shapes.py: options 'edits' and 'digits' exclude each other")
    c.data.name = "shapes_edits"
    c.data.packing = "fixed"  # edit documents have their own packer (mmjax/data/edit_packing.py)
    chains = {"smoke": 16, "demo": 2048}.get(size, c.data.num_train // shapes_edits.CHAIN_IMAGES)
    c.data.num_train = chains
    c.data.num_validation = 16 if size == "smoke" else 128
    c.data.num_test = 16 if size == "smoke" else 256
    c.data.max_caption_len = EDIT_INSTRUCTION_LEN
    side = config_validation.image_side(c)
    longest = layout.edit_document_length([EDIT_INSTRUCTION_LEN] * shapes_edits.CHAIN_EDITS,
                                          side * side)
    c.model.max_seq_len = -(-longest // 8) * 8
    if size == "smoke":
        c.train.batch_size = 4
    elif size == "demo":
        _set_budget(c, **EDITS_DEMO_TRAIN)
    c.sample.num_eval = c.data.num_test
