"""Default values for every knob in mmjax, in one place.

Why a module and not a config file: `configs/*.py` files are loaded by path through
`ml_collections.config_flags`, so they cannot import each other reliably. They import these
builders instead and override only what differs (sizes, dataset, head). Every field a user may
turn lives here with a comment; code never hides a magic number that belongs here. The closed
lists of string choices ("flow" | "discrete", ...) are in mmjax/choices.py, written once; the
comments below say what each choice means. config_validation checks the values and builds the
typed blocks (ModelConfig, ObjectiveConfig, SampleSettings) the code reads.
"""
from __future__ import annotations

from typing import Iterable

import ml_collections


def size_and_options(arg: str | None, *, config_file: str, sizes: Iterable[str],
                     options: Iterable[str], default: str) -> tuple[str, set[str]]:
    """`SIZE[,OPTION...]` (the `:arg` of `--config=configs/X.py:arg`) -> (size, options).

    The one parser of every config file's argument, so each rejects an unknown size or option
    the same way: one line naming the file and the choices (an option is never ignored).
    """
    parts = [p for p in (arg or default).split(",") if p]
    size, chosen = (parts[0] if parts else default), set(parts[1:])
    sizes, options = list(sizes), tuple(options)
    if size not in sizes:
        raise ValueError(f"{config_file}: unknown size {size!r}; choose from {sizes}")
    if chosen - set(options):
        raise ValueError(f"{config_file}: unknown option(s) {sorted(chosen - set(options))}; "
                         f"choose from {options}")
    return size, chosen


def data_config() -> ml_collections.ConfigDict:
    """Dataset, text tokenizer and loader settings."""
    c = ml_collections.ConfigDict()
    c.name = "shapes"  # "shapes" | "digits" | "natural" | "shapes_edits" (embedded; shapes_edits: data.num_* count edit chains) or any standard TFDS image dataset name.
    c.data_dir = ""  # TFDS data dir; "" -> <workdir>/data for embedded sets, TFDS default otherwise.
    c.image_size = 32  # Square image side in pixels (embedded sets are generated at this size).
    c.num_train = 4096  # Embedded sets: examples generated for the train split.
    c.num_validation = 512  # Embedded sets: examples in the validation split.
    c.num_test = 512  # Embedded sets: examples in the test split.
    c.max_objects = 3  # shapes: at most this many shapes per image (1..max_objects).
    c.seed = 0  # Seed of the procedural generator (same seed -> identical dataset).
    c.image_key = "image"  # Feature holding the image (for standard TFDS datasets).
    c.caption_key = "caption"  # Feature holding the caption ("" -> caption from label names).
    c.label_key = "label"  # Used to build captions for TFDS sets without captions.
    c.shuffle_seed = 0  # Seed of the grain shuffle (part of the resumable iterator state).
    c.worker_count = 0  # grain worker processes (0 = in-process; deterministic either way).
    # Threads that build batches in the training process (grain ReadOptions.num_threads). Rows
    # are built in Python, so more threads mostly contend for the GIL: on the 2-core demo 4
    # threads spend 2x the CPU of 1 per batch, and the model stage runs at the same speed with
    # either (bench/results/data_loading.json). For loaders that need more, use worker_count.
    c.read_threads = 4
    # SentencePiece text tokenizer.
    c.sp_model_path = ""  # Path to a user .model file; "" -> train one from the captions.
    c.sp_vocab_size = 256  # Vocabulary size when training SentencePiece from the captions.
    c.max_caption_len = 28  # Caption tokens per document (longer ones follow data.long_captions).
    c.long_captions = "truncate"  # Captions over max_caption_len tokens: "truncate" (at a word
    # boundary) | "drop" (the record leaves the split) | "error" (stop, naming the record).
    # How caption/image documents fill the packed rows (mmjax.data.packing.PackedDataset):
    # "fixed": every row holds model.max_seq_len // (longest possible document) documents, so
    # shorter captions leave padding | "first_fit": each group of objective.direction_group_rows
    # rows is filled first-fit with as many documents as their lengths allow (mmjax/data/
    # first_fit.py; the demo's rows go from 74% to 86% real tokens). It pays where captions are
    # often much shorter than max_caption_len; where a row cannot take one more document anyway
    # it packs as "fixed" does, with larger head capacities (captions of 14-28 of 28 tokens:
    # 84.0% real against 85.2%). Edit documents use "fixed".
    c.packing = "fixed"
    # first_fit: image tokens per row, summed over a direction group (the MoT image bucket; the
    # rest of the row is the text bucket). 0 = the image share of a document with a caption of
    # max_caption_len / 2 tokens (first_fit.default_image_slots).
    c.row_image_slots = 0
    # first_fit: documents that break a group's bounds and are passed over (packed into the next
    # group) before the group closes; more fills groups fuller and plans slower.
    c.pack_lookahead = 16
    c.sp_max_sentences = 100_000  # Captions (evenly strided over the train split) used to train SentencePiece.
    return c


def fsq_config() -> ml_collections.ConfigDict:
    """FSQ autoencoder (image tokenizer) architecture and loss."""
    c = ml_collections.ConfigDict()
    c.quantizer = "fsq"  # "fsq" (the fixed grid of `levels`) | "vq" (learned VQ-VAE codebook, the
    # FSQ paper's baseline; mmjax.tokenizers.vq). Both feed the model stage: the tokenize stage
    # stores a VQ codebook beside its tokens (image_tokens/codebook.npy).
    c.levels = (8, 5, 5, 5)  # FSQ levels per latent channel; codebook size = prod(levels).
    c.vq_codebook_size = 1024  # VQ: codebook entries K (tokens are indices in [0, K)).
    c.vq_dim = 4  # VQ: code (latent) width d; small d = ViT-VQGAN's low-dimensional codes.
    c.vq_beta = 0.25  # VQ: commitment loss weight beta * |z - sg(e)|^2 (VQ-VAE's 0.25).
    c.vq_ema_decay = 0.99  # VQ: codebook EMA decay; 0 = codebook learned by gradient (codebook loss).
    c.vq_reseed = 0  # VQ: reseed a code unused this many consecutive steps from encoder outputs (0 = off; needs EMA).
    c.vq_l2 = False  # VQ: compare l2-normalised latents and codes (cosine assignment, ViT-VQGAN).
    c.channels = (32, 64, 64)  # Conv widths per resolution; len(channels) - 1 = number of 2x downsamples
    # (with 32-px images: an 8x8 grid, 64 tokens, so a caption<->image document fits a 128-token row).
    c.patch_size = 1  # Pixels per side folded into channels before the first conv (space-to-depth)
    # and unfolded after the last; 2 drops the full-resolution level, whose narrow convs XLA CPU
    # trains slowly. Pixels per token side = patch_size * 2**(len(channels) - 1).
    c.num_res_blocks = 1  # Residual blocks per resolution in encoder and decoder.
    c.norm_groups = 8  # GroupNorm groups in encoder/decoder; must divide every entry of channels.
    c.loss = "l2"  # Reconstruction loss: "l2" or "l1+l2".
    c.l1_weight = 0.1  # Weight of the L1 term when loss = "l1+l2".
    c.checkpoint_dir = ""  # Trained tokenizer checkpoint dir for the model stage; "" -> <workdir>/tokenizer.
    c.tokens_dir = ""  # Precomputed image tokens dir; "" -> <workdir>/image_tokens (sweeps share one).
    return c


def model_config() -> ml_collections.ConfigDict:
    """Mixture-of-Transformers backbone and heads."""
    c = ml_collections.ConfigDict()
    c.num_modalities = 2  # 1 = dense transformer; 2 = text + image; 3 adds a third (e.g. speech).
    c.num_layers = 4  # Transformer blocks.
    c.d_model = 128  # Residual stream width.
    c.num_heads = 4  # Attention heads; head_dim = d_model // num_heads.
    c.mlp_dim = 384  # SwiGLU hidden width.
    c.rope_theta = 10_000.0  # RoPE base frequency.
    c.norm_eps = 1e-6  # RMSNorm epsilon.
    c.max_seq_len = 128  # Packed sequence length (also the KV-cache length when sampling).
    c.mot_impl = "auto"  # Per-modality compute: "auto" (buckets for packed rows on CPU and GPU; else
    # ragged on GPU/TPU, tiled on CPU) | "ragged" (sort + jax.lax.ragged_dot) | "tiled" (groups padded to whole
    # tiles) | "buckets" (each row sorted into a text and an image bucket sized by the packer's
    # layout: one dense matmul per modality; two modalities, packed rows only, else as "auto")
    # | "masked" (reference only).
    c.mot_tile = 128  # Rows per tile of the "tiled" grouped matmul (padding <= M * tile rows).
    c.attention_impl = "auto"  # Attention kernel (models/attention.py): "auto" (GPU: cudnn for bf16/fp16,
    # pallas for f32; splash on TPU; on CPU the dense reference for short sequences, "chunked" for
    # long ones and for decode)
    # | "reference" (einsum + dense mask) | "chunked" (pure-JAX online softmax, no [B,H,T,S]) |
    # "cudnn" (jax.nn.dot_product_attention, dense bool mask) | "pallas" | "splash" (TPU, untested).
    c.attention_block = 512  # Query/key tile of the "chunked" and "pallas" attention paths.
    c.image_bidirectional_context = True  # Bidirectional attention inside an image that is context only.
    c.image_head = "flow"  # "flow" (rectified flow on FSQ code vectors) | "discrete" (FSQ-index softmax).
    c.discrete_factorized = False  # Discrete head: one softmax per FSQ dimension instead of prod(levels).
    c.tie_embeddings = False  # LM head reuses the text embedding matrix (transposed).
    c.flow_depth = 3  # Flow head: AdaLN residual MLP blocks.
    c.flow_width = 256  # Flow head: hidden width.
    c.flow_t_samples = 4  # Flow head: t (and noise) samples per position per step, as MAR does.
    c.noise_aug = 0.0  # CAM (train only): each text->image DOCUMENT draws std ~ U(0, noise_aug) and its
    # generated-image inputs get that Gaussian noise (context images of image->text stay clean). 0 = off.
    c.image_positions = "none"  # 2-D position of image tokens beyond 1-D RoPE: "none" | "learned_2d"
    # (row and column embedding tables added to the image input embedding, LlamaGen/MAR style) |
    # "sincos_2d" (fixed MAE-style row/column sin-cos features, nothing to learn) | "rope_2d" (RoPE
    # over three axes, position / row / column, frequencies interleaved: LlamaGen's 2-D RoPE and
    # Qwen2-VL's M-RoPE; text is rotated exactly as by 1-D RoPE; no parameters).
    c.image_input = "code"  # What an image token's input embedding reads: "code" (a linear map of
    # its code vector: nearby codes embed nearby) | "code+index" (plus a learned row per codebook
    # index, as a text token has: codes that differ by one FSQ level, e.g. a square's corner and a
    # circle's edge, can embed far apart). CAM noise (noise_aug) perturbs the code part only.
    c.dtype = "float32"  # Compute dtype ("bfloat16" on accelerators); params stay float32.
    c.remat = "none"  # Activation checkpointing per block: "none" | "full" | "dots".
    return c


def objective_config() -> ml_collections.ConfigDict:
    """Per-modality loss weights and sequence construction."""
    c = ml_collections.ConfigDict()
    c.text_weight = 1.0  # Weight of text cross-entropy.
    c.image_weight = 1.0  # Weight of the image loss (flow MSE or discrete CE).
    c.flow_t_dist = "logit_normal"  # Flow loss time sampling: "uniform" U(0,1) | "logit_normal" (SD3;
    # the demo's choice: bench/results/ablation_demo.json).
    c.flow_logit_std = 1.0  # logit_normal: std of logit(t) (mean 0); larger puts more mass near 0 and 1.
    c.t2i_prob = 0.7  # Probability an example is text->image (else image->caption).
    c.caption_dropout = 0.1  # Text->image examples whose caption is replaced by <uncond> (for CFG).
    # LM loss on the caption of text->image documents: their captions are random attribute draws, so
    # this is the unconditional caption prior, which neither direction samples from (t2i is given
    # the caption, i2t predicts it from the image). False keeps <boi>/<eoi>/<eos> targets only there.
    c.t2i_caption_loss = True
    c.direction_redraws = 8  # Copies of each example per pass, each with a fresh direction draw.
    # Rows per direction group (caption/image pairs; edit documents ignore it): every group of
    # this many consecutive packed rows holds floor or ceil(t2i_prob x its documents)
    # text->image documents (the mean stays t2i_prob), the trainer shuffles rows in whole groups,
    # and the image heads run on ceil(t2i_prob x documents) images per group instead of one per
    # document (mmjax/targets.py). 1: each document draws its own direction. Must divide
    # train.batch_size and, for speed on accelerators, the batch rows of one data shard.
    c.direction_group_rows = 1
    # data.name="shapes_edits": share of edit documents that chain 2..3 edits (else one edit;
    # mmjax.data.edit_packing). caption_dropout then drops instructions (CFG) instead of captions.
    c.edit_chain_prob = 0.5
    return c


def train_config() -> ml_collections.ConfigDict:
    """Optimisation, checkpointing and logging."""
    c = ml_collections.ConfigDict()
    c.steps = 1000  # Total optimizer steps.
    c.batch_size = 32  # Global batch size (split over processes and the data/fsdp mesh axes).
    c.grad_accum = 1  # Microbatches per step (gradient accumulation).
    c.lr = 1e-3  # Peak learning rate.
    c.warmup_steps = 100  # Linear warmup steps.
    c.end_lr_ratio = 0.1  # Cosine decays to lr * end_lr_ratio.
    c.weight_decay = 0.01  # AdamW decoupled weight decay.
    c.b1 = 0.9  # AdamW beta1.
    c.b2 = 0.99  # AdamW beta2.
    c.grad_clip = 1.0  # Global-norm gradient clipping (0 disables).
    c.ema_decay = 0.0  # EMA of the params kept for sampling/evals (mmjax/ema.py), e.g. 0.999; 0 = none.
    c.checkpoint_every = 500  # Save a checkpoint every this many steps (and always at the end).
    c.keep_checkpoints = 3  # Checkpoints kept on disk.
    c.log_every = 50  # Write train metrics every this many steps.
    c.eval_every = 0  # Run validation every this many steps (0: only at the end).
    c.eval_batches = 8  # Validation batches per evaluation.
    c.nan_policy = "stop"  # Non-finite loss: "stop" (raise, naming the step) | "skip" (drop the update).
    c.progress_bar = True  # tqdm bar on process 0 when stderr is a terminal (else plain log lines).
    c.peak_tflops = 0.0  # Peak TFLOP/s of one device for MFU; 0 -> by device kind (mmjax.flops).
    c.profile_steps = ()  # (start, stop): jax.profiler trace of those steps into <run>/profile.
    return c


def mesh_config() -> ml_collections.ConfigDict:
    """Device mesh. Sizes multiply to the device count; -1 means 'all remaining devices'."""
    c = ml_collections.ConfigDict()
    c.data = -1  # Pure data parallelism (params replicated).
    c.fsdp = 1  # ZeRO-3 style sharding of params and optimizer state (and the batch).
    c.tensor = 1  # Tensor parallelism over heads / mlp.
    c.dcn_data = 1  # Multi-slice: TPU slices (GPU: processes) the data axis spans over DCN.
    # CPU-only hosts: XLA CPU devices to split each process into, so the data axis runs over
    # cores (parallel.split_cpu_host; the command line applies it before JAX starts). 0: XLA's
    # default (one device, or XLA_FLAGS' count). Accelerator runs ignore it.
    c.cpu_devices = 0
    # The command line's host memory: glibc malloc on transparent huge pages (mmjax.host_malloc;
    # the process re-executes itself once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1). XLA CPU
    # maps its per-step temp buffers afresh; with 4 KiB pages the demo's model stage spent a fifth
    # of its CPU time on page faults, with huge pages it trains 1.25x faster
    # (bench/results/host_malloc.json). Harmless where glibc or the kernel cannot use it.
    c.malloc_hugepages = True
    return c


def sample_config() -> ml_collections.ConfigDict:
    """Sampling defaults."""
    c = ml_collections.ConfigDict()
    c.temperature = 1.0  # Text sampling temperature (0 -> greedy).
    c.top_k = 0  # Text: keep the k most likely tokens (0 disables).
    c.top_p = 1.0  # Text: nucleus sampling mass (1 disables).
    c.max_text_len = 29  # Max tokens generated for a caption (data.max_caption_len + eos).
    c.ode_solver = "euler"  # Flow head ODE solver: "euler" | "heun".
    c.ode_steps = 16  # ODE integration steps per image token.
    c.cfg_scale = 2.0  # Classifier-free guidance scale (1 = off). The better the model fits, the less it
    # wants: the old 1000-step demo models scored best at 3, today's demo at 1.5-2, one that had
    # memorised 64 images at 1 (bench/results/ablation_demo.json).
    c.cfg_schedule = "constant"  # CFG scale over an image's tokens: "constant" | "linear" (MAR: 1 -> cfg_scale).
    c.image_temperature = 1.0  # Discrete image head: FSQ-index sampling temperature (0 -> argmax).
    c.image_top_k = 0  # Discrete image head: keep the k most likely FSQ indices (0 disables).
    c.flow_temperature = 0.3  # Flow head: std of the ODE's starting noise (MAR's tau; < 1 = sharper).
    c.noise_aug = 0.0  # CAM at inference: std of Gaussian noise on the sampled image tokens fed back to
    # the model (the returned image stays clean); 0 = off. Pair with a model trained with model.noise_aug.
    c.num_samples = 16  # Images in the written text->image grid.
    c.num_eval = 512  # Test records scored (rule checker, captioning): 512 gives +-4 points at 50%.
    c.batch_size = 64  # Prompts per jitted sampling call (the last batch is padded: one compile).
    c.interleaved_rounds = 2  # Eval: caption->image->caption chain length for num_samples prompts (0 skips it).
    c.seed = 0  # Sampling seed.
    c.weights = "auto"  # Params sampled and scored: "auto" (the EMA when train.ema_decay > 0) | "ema" | "raw".
    return c


def eval_config() -> ml_collections.ConfigDict:
    """Image-quality metrics of the sample stage."""
    c = ml_collections.ConfigDict()
    c.inception_weights = ""  # .npz of pytorch-fid's InceptionV3 state dict (mmjax/evals/fid.py); "" -> FID/KID off.
    c.fid_batch_size = 32  # Images per jitted InceptionV3 call.
    c.kid_subset_size = 1000  # KID subset size (capped at the number of images; 100 subsets).
    return c


def tokenizer_train_config() -> ml_collections.ConfigDict:
    """Training of the FSQ autoencoder (same fields as `train`, its own defaults)."""
    c = train_config()
    c.steps = 2000
    c.batch_size = 64
    c.lr = 2e-3
    c.warmup_steps = 100
    c.weight_decay = 0.0
    c.checkpoint_every = 1000
    return c


def sweep_config() -> ml_collections.ConfigDict:
    """A grid of model runs sharing one data / tokenizer build (configs/sweep_*.py, mmjax.scaling).

    Axis entries (sizes, budgets, archs) map a name to nested overrides `{block: {field: value}}`
    of the base config; points are the product of the axes, ordered by sorted names.
    """
    c = ml_collections.ConfigDict()
    c.base = ""  # Config spec of every point, e.g. "configs/mot_shapes.py:smoke" (cwd- or repo-relative).
    c.base_config = None  # Or an embedded base ConfigDict (used when `base` is "").
    c.shared = ml_collections.ConfigDict()  # Overrides of the base for all points (data, tokenizer, ...).
    c.sizes = ml_collections.ConfigDict()  # name -> {"model": {...}}: model sizes.
    c.budgets = ml_collections.ConfigDict()  # name -> {"train": {"steps", "batch_size"}} or {"flops": C}.
    c.archs = ml_collections.ConfigDict()  # name -> overrides, e.g. {"model": {"num_modalities": 1}}.
    # Seeds axis: each (size, budget, arch) runs once per seed (config.seed = data.shuffle_seed =
    # the seed, point names end in _seed<k>); () runs the base config's seeds once.
    c.seeds = ()
    c.min_steps = 10  # Floor on the steps derived from a FLOPs budget.
    c.warmup_fraction = 0.1  # train.warmup_steps = fraction * steps (unless a point sets it).
    c.checkpoints_per_run = 2  # train.checkpoint_every = steps // this (resume granularity).
    c.evals_per_run = 4  # Validations along training (train.eval_every = steps // this; 0: end only).
    c.logs_per_run = 20  # Train-metric rows per run (train.log_every = steps // this).
    c.analyses = ("scaling",)  # Report: "scaling" (laws, isoFLOPs) and/or "mot_vs_dense".
    # N in the fits: n_params_backbone (block weights a token uses, no embeddings or output heads,
    # as Kaplan et al. count N) | n_params_non_embedding (+ heads) | n_params_active | _total.
    c.param_key = "n_params_backbone"
    c.loss_keys = ("loss", "text_loss", "image_loss")  # Validation losses fitted / compared.
    c.fit_starts = 8  # Chinchilla fit: L-BFGS-B from the best this-many grid starts (fits top_k).
    c.bootstrap_samples = 100  # Chinchilla fit: resamples of the runs for 95% intervals (0: none).
    c.bootstrap_seed = 0  # Seed of the bootstrap resampling (the intervals are reproducible).
    c.frontier_from = 0.5  # L(C) fit: curve points from this fraction of each run on (not warmup).
    c.compare = ("dense", "mot")  # mot_vs_dense: (baseline arch, candidate arch) names.
    c.compilation_cache = True  # Persistent XLA cache in <sweep_dir>/jax_cache (same shapes compile once).
    return c


def base_config() -> ml_collections.ConfigDict:
    """All blocks with their defaults; `configs/*.py` start here and override sizes."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # Seed of parameter init and of the per-step RNG stream.
    c.data = data_config()
    c.fsq = fsq_config()
    c.tokenizer_train = tokenizer_train_config()
    c.model = model_config()
    c.objective = objective_config()
    c.train = train_config()
    # Persistent XLA compilation cache of `python -m mmjax.main` (reruns and resumes skip
    # compiling): "" -> <workdir>/jax_cache, "off" disables it, any other value is the directory
    # (local or gs://). JAX_COMPILATION_CACHE_DIR, when set, wins. Process-wide, so only here.
    c.train.compilation_cache_dir = ""
    c.mesh = mesh_config()
    c.sample = sample_config()
    c.eval = eval_config()
    return c
