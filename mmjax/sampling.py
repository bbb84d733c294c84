"""Decode loops of the multimodal LM: text (temperature / top-k / top-p), images (flow-head ODE
with classifier-free guidance, or discrete FSQ-index sampling) and an interleaved caption <-> image
chain.

Everything here is a pure function of (params, inputs, rng) meant to run inside ONE `jax.jit` per
task (`Sampler` builds those): the prompt prefill and every generated position are traced once,
positions are looped with `lax.scan` / `lax.while_loop`, so sampling is not Python-loop bound.

Design choices, and why:
- Batching prompts of different lengths: prompts are LEFT-padded to a static width. Padding slots
  get segment id 0 (they attend to nothing but themselves and nobody attends to them) and RoPE
  positions restart at each row's first real token, so all rows share the cache slot of every
  step (the cache is written in lockstep) while each row computes exactly what it would alone.
- Classifier-free guidance runs the conditional and the unconditional stream as the two halves of
  one batch with their own cache rows: rows [0, B) hold `<bos> caption <boi>`, rows [B, 2B) the
  caption-dropped `<bos> <uncond> <boi>` the model saw with objective.caption_dropout (the same
  layout.uncond_caption the packer writes). Both get the same
  sampled (snapped) image token fed back. The guided velocity is v_u + s (v_c - v_u) (for the
  discrete head the same mix of logits), s per token by sample.cfg_schedule (`cfg_scale_at`).
  cfg_scale == 1 statically drops the second half.
- Randomness is per row: row i's key is fold_in(rng, i), and every draw folds in the step, so a
  row's sample does not depend on which other rows share its batch (tests check this).
- Every chunk carries `image_pos` (index inside the image, -1 at text) as the packer writes it,
  for model.image_positions; sample.noise_aug > 0 adds CAM's low-level Gaussian noise to the image
  tokens fed back to the model (the returned tokens stay clean and on the grid).
- Image tokens: the ODE dx/dt = v(x, t | h) runs from x0 ~ N(0, I) at t=0 to t=1 (rectified flow,
  v = x1 - x0 as trained in objectives.py), then the result is SNAPPED to the codebook (the FSQ
  grid, or a VQ tokenizer's learned table: mmjax.image_codebook), so every
  image token fed back (and decoded to pixels) is a code the tokenizer can produce.
- The "interleaved" chain uses only document layouts the model was trained on, packed in one
  sequence like a training row (one cache, documents separated by segment ids):
      [<bos> c_1 <boi> img_1] [<bos> <boi> img_1 <eoi> c_2 <eos>] [<bos> c_2 <boi> img_2] ...
  i.e. caption -> its image -> a caption of that image -> its image ...: a round trip that shows
  how well text and images stay consistent (drift). Documents do not attend to each other (that
  is how training rows are packed), so the chain is what one would get with fresh caches, in one
  jitted program.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import layout
from mmjax.choices import CHOICES
from mmjax.layout import IMAGE, PAD_ID, TEXT, SpecialIds  # noqa: F401 (PAD_ID: public name)
from mmjax.models import heads
from mmjax.models.model import MultimodalLM, init_cache
from mmjax.tokenizers.fsq import FSQ

SOLVERS = CHOICES["sample.ode_solver"]
# fold_in data of the inference noise (sample.noise_aug) draws: apart from the heads' streams.
NOISE_STREAM = 0x6E6F6973


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """Hashable sampling knobs: the typed `sample` block (see config_defaults.sample_config).

    config_validation.sample_settings builds it from a config and checks it; constructed by hand
    (tests, benchmarks) it is taken as given.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_text_len: int = 24
    ode_solver: str = "euler"
    ode_steps: int = 16
    cfg_scale: float = 2.0
    cfg_schedule: str = "constant"
    image_temperature: float = 1.0
    image_top_k: int = 0
    flow_temperature: float = 1.0
    noise_aug: float = 0.0

    @property
    def guided(self) -> bool:  # cfg_scale 1 is plain conditional sampling: no uncond half
        return self.cfg_scale != 1.0


# ---- token filtering -------------------------------------------------------------------------
def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """float32 logits [..., V] -> tempered logits with the discarded entries at -inf.

    Order as in common LM samplers: divide by `temperature`, keep the `top_k` largest (0 = all),
    then the smallest set of most likely tokens whose probability reaches `top_p` (the most likely
    token is always kept). temperature 0 keeps only the (first) argmax: greedy decoding.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    if temperature == 0:
        return jnp.where(jax.nn.one_hot(jnp.argmax(logits, -1), vocab) > 0, 0.0, -jnp.inf)
    logits = logits / temperature
    if not 0 < top_k < vocab and top_p >= 1.0:
        return logits  # nothing to filter: skip the sorts
    order = jnp.argsort(-logits, axis=-1, stable=True)  # most likely first
    ranks = jnp.argsort(order, axis=-1)  # rank of each token in that order
    keep = ranks < (top_k if 0 < top_k < vocab else vocab)
    if top_p < 1.0:
        ordered = jnp.take_along_axis(jnp.where(keep, logits, -jnp.inf), order, axis=-1)
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = keep & jnp.take_along_axis(mass_before < top_p, ranks, axis=-1)
    return jnp.where(keep, logits, -jnp.inf)


def sample_rows(keys: jax.Array, logits: jax.Array, **filter_kw) -> jax.Array:
    """One token per row: keys [B], logits [B, V] -> int32 [B] (filtered as `filter_logits`)."""
    filtered = filter_logits(logits, **filter_kw)
    return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)


def row_keys(rng: jax.Array, batch: int) -> jax.Array:
    """Per-row keys fold_in(rng, i): a row's randomness does not depend on the batch around it."""
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch))


def _fold(keys: jax.Array, data) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, data))(keys)


# ---- ODE integration -------------------------------------------------------------------------
def integrate_flow(velocity, x0: jax.Array, num_steps: int, solver: str = "euler") -> jax.Array:
    """x(1) of dx/dt = velocity(x, t) from x(0) = x0, `num_steps` uniform steps (t a scalar).

    Euler: x += dt v(x, t). Heun (2nd order): average the slopes at both ends of an Euler step.
    """
    if solver not in SOLVERS:
        raise ValueError(f"sample.ode_solver={solver!r}: must be one of {SOLVERS}.")
    dt = 1.0 / num_steps

    def step(i, x):
        t = i.astype(jnp.float32) * dt
        v0 = velocity(x, t)
        if solver == "euler":
            return x + dt * v0
        v1 = velocity(x + dt * v0, t + dt)
        return x + 0.5 * dt * (v0 + v1)

    return jax.lax.fori_loop(0, num_steps, step, x0)


def model_codebook(model: MultimodalLM, codebook=None):
    """The codebook the image tokens are snapped to and indexed in (mmjax.image_codebook): the
    one given, checked against the model's code width and size, else the FSQ grid of the
    model's levels. A VQ model (ModelConfig.vq_dim > 0) needs its learned codebook passed."""
    cfg = model.cfg
    if codebook is None:
        if cfg.vq_dim:
            raise ValueError("a model trained on VQ tokens samples with its learned codebook: "
                             "pass codebook=mmjax.image_codebook.load(config, workdir)")
        return FSQ(tuple(model.fsq_levels))
    if (codebook.dim, codebook.codebook_size) != (cfg.code_dim, cfg.codebook_size):
        raise ValueError(f"codebook of {codebook.codebook_size} codes of width {codebook.dim} "
                         f"does not fit the model's {cfg.codebook_size} codes of width "
                         f"{cfg.code_dim}")
    return codebook


# ---- the bound decoder and its state ---------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Decoder:
    """The model, its params and the settings, bound once for one traced sampling program.

    The loops below pass only a state pytree ({"cache", "hidden", "pos"}) and per-call inputs.
    """

    model: MultimodalLM
    params: Any
    settings: SampleSettings
    special: SpecialIds
    codebook: Any = None  # FSQ or LearnedCodebook (see `model_codebook`); None = the FSQ grid

    def __post_init__(self):
        object.__setattr__(self, "codebook", model_codebook(self.model, self.codebook))

    def apply(self, *args, method):
        return self.model.apply({"params": self.params}, *args, method=method)

    def decode(self, cache, chunk: dict):
        """(hidden [R, T, D], cache) of a chunk of the model's CHUNK_KEYS."""
        return self.apply(chunk, cache, method=MultimodalLM.decode)

    def sample_token(self, hidden, keys, cfg_scale):
        """The configured image head's next token: (index [B], code vector [B, d]), guided at
        `cfg_scale` (a traced scalar: `cfg_scale_at` of the token's place in the image)."""
        return self.model.cfg.head.sample_token(self, hidden, keys, cfg_scale)


def _chunk(tokens, codes, modality, positions, segment, block, image_pos) -> dict:
    return {"tokens": tokens, "codes": codes, "modality": modality, "positions": positions,
            "segment_ids": segment, "image_block": block, "image_pos": image_pos}


def _step_chunk(tokens, codes, modality: int, pos, segment: int, image_pos=-1) -> dict:
    """One causal position per row (no context block): tokens [R], codes [R, d], pos [R];
    image_pos: the token's index inside its image (-1 for text)."""
    ones = jnp.ones((tokens.shape[0], 1), jnp.int32)
    return _chunk(tokens[:, None], codes[:, None], ones * modality, pos[:, None], ones * segment,
                  ones * 0, ones * image_pos)


# ---- per-token samplers (hidden of the position before the new token -> new token) -----------
def cfg_scale_at(settings: SampleSettings, k, num_tokens: int) -> jax.Array:
    """The guidance scale of image token `k` (0-based) of `num_tokens` (sample.cfg_schedule).

    "constant": cfg_scale everywhere (LlamaGen). "linear": MAR's schedule, 1 + (s - 1)(k + 1)/n,
    weak guidance on the first tokens (the layout is still open) rising to s on the last; the
    image's mean scale is then about (1 + s) / 2.
    """
    s = jnp.float32(settings.cfg_scale)
    if settings.cfg_schedule == "linear":
        return 1.0 + (s - 1.0) * (jnp.asarray(k, jnp.float32) + 1.0) / num_tokens
    return s


def _guide(cond_uncond: jax.Array, batch: int, scale: float) -> jax.Array:
    cond, uncond = cond_uncond[:batch], cond_uncond[batch:]
    return uncond + scale * (cond - uncond)


def flow_token(dec: Decoder, hidden, keys, cfg_scale):
    """Flow head: hidden [G*B, D] (G = 2 with CFG, cond rows first), keys [B] -> (index [B],
    snapped code [B, d])."""
    codebook, settings = dec.codebook, dec.settings
    batch, guided = keys.shape[0], settings.guided
    # MAR's temperature: the ODE starts from N(0, tau^2 I); tau < 1 trades diversity for fidelity.
    x0 = settings.flow_temperature * jax.vmap(lambda k: jax.random.normal(k, (codebook.dim,)))(keys)

    def velocity(x, t):
        xs = jnp.concatenate([x, x]) if guided else x
        v = dec.apply(hidden, xs, jnp.full(xs.shape[:1], t), method=MultimodalLM.flow_velocity)
        return _guide(v, batch, cfg_scale) if guided else v

    x1 = integrate_flow(velocity, x0, settings.ode_steps, settings.ode_solver)
    codes = codebook.snap(x1)
    return codebook.codes_to_indices(codes), codes


def discrete_token(dec: Decoder, hidden, keys, cfg_scale):
    """Discrete head: FSQ indices sampled from (guided) index logits -> (index [B], code [B, d])."""
    codebook, settings = dec.codebook, dec.settings
    batch = keys.shape[0]
    logits = dec.apply(hidden, method=MultimodalLM.index_logits)
    if settings.guided:
        logits = tuple(_guide(lg, batch, cfg_scale) for lg in logits)
    kw = dict(temperature=settings.image_temperature, top_k=settings.image_top_k)
    if len(logits) == 1:
        index = sample_rows(keys, logits[0], **kw)
    else:  # factorised: one draw per FSQ channel
        digits = jnp.stack([sample_rows(_fold(keys, c), lg, **kw) for c, lg in enumerate(logits)],
                           axis=-1)
        index = heads.digits_to_indices(digits, codebook.levels)
    return index, codebook.indices_to_codes(index)


# ---- chunks and documents --------------------------------------------------------------------
def left_pad(ids: jax.Array, lengths: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """Right-padded ids [B, T] holding `lengths` [B] tokens -> ([B, width] with the tokens at the
    right end, bool mask of real tokens). Requires lengths <= width."""
    src = jnp.arange(width)[None, :] - (width - lengths)[:, None]
    valid = src >= 0
    out = jnp.take_along_axis(ids, jnp.clip(src, 0, ids.shape[1] - 1), axis=1)
    return jnp.where(valid, out, 0).astype(jnp.int32), valid


def uncond_prompt(caption_ids, special: SpecialIds):
    """The CFG-unconditional captions for a batch of caption ids [B, T] (T >= 1): every row is
    layout.uncond_caption (`<uncond>`) -> (ids [B, T], lengths [B])."""
    uncond = jnp.asarray(layout.uncond_caption(special), jnp.int32)
    ids = jnp.zeros_like(caption_ids, jnp.int32).at[:, :len(uncond)].set(uncond)
    return ids, jnp.full(caption_ids.shape[:1], len(uncond), jnp.int32)


def _t2i_prompt(caption_ids, lengths, special: SpecialIds):
    """`<bos> caption <boi>` (layout.t2i_parts' prefix) left-padded to caption width + 2 ->
    (tokens, valid, next position)."""
    b, width = caption_ids.shape
    extra = layout.T2I_PROMPT_SPECIALS
    seq = jnp.concatenate([jnp.full((b, 1), special.bos, jnp.int32), caption_ids.astype(jnp.int32),
                           jnp.zeros((b, 1), jnp.int32)], axis=1)
    seq = seq.at[jnp.arange(b), lengths + 1].set(special.boi)
    tokens, valid = left_pad(seq, lengths + extra, width + extra)
    return tokens, valid, lengths + extra


def _text_chunk(tokens, valid, segment: int, d: int) -> dict:
    """Decode inputs of a (left-padded) text chunk; positions restart at each first real token."""
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    seg = jnp.where(valid, segment, 0).astype(jnp.int32)
    zeros = jnp.zeros_like(tokens)
    return _chunk(tokens, jnp.zeros(tokens.shape + (d,), jnp.float32), zeros + TEXT,
                  positions.astype(jnp.int32), seg, zeros, zeros - 1)


def _image_loop(dec: Decoder, state: dict, segment, keys, num_tokens: int, collect: bool):
    """Samples `num_tokens` image tokens, feeding each back (modality IMAGE, causal).

    state: {"cache", "hidden" [R, D] predicting the first token, "pos" [R]}; R = G*B rows (G = 2
    with CFG). Returns (state after the image, {"indices" [B, n], "codes" [B, n, d], and when
    `collect` "hidden" [B, n, D]: the state that predicted each token}).
    """
    batch = keys.shape[0]
    groups = state["hidden"].shape[0] // batch
    noise_aug = dec.settings.noise_aug

    def body(s, k):
        index, codes = dec.sample_token(s["hidden"], _fold(keys, k),
                                        cfg_scale_at(dec.settings, k, num_tokens))
        fed = codes
        if noise_aug > 0:  # CAM at inference: the model reads a slightly noisy token
            fed = codes + noise_aug * jax.vmap(lambda r: jax.random.normal(r, codes.shape[1:]))(
                _fold(_fold(keys, k), NOISE_STREAM))
        index_r, codes_r = jnp.tile(index, groups), jnp.tile(fed, (groups, 1))
        new_h, cache = dec.decode(s["cache"], _step_chunk(index_r, codes_r, IMAGE, s["pos"],
                                                          segment, k))
        out = (index, codes, s["hidden"][:batch] if collect else None)
        return {"cache": cache, "hidden": new_h[:, 0], "pos": s["pos"] + 1}, out

    state, (index, codes, seen) = jax.lax.scan(body, state, jnp.arange(num_tokens))
    out = {"indices": index.T, "codes": jnp.swapaxes(codes, 0, 1)}
    if collect:
        out["hidden"] = jnp.swapaxes(seen, 0, 1)
    return state, out


def _text_loop(dec: Decoder, state: dict, segment, keys, collect: bool):
    """Samples up to max_text_len tokens per row until each row has produced <eos>.

    Tokens after a row's <eos> are PAD_ID; the loop stops early once every row is done. Returns
    (state, {"tokens" [R, T], and when `collect` "hidden" [R, T, D]: what predicted each token}).
    """
    settings, special = dec.settings, dec.special
    rows, width = state["hidden"].shape[0], settings.max_text_len
    keys = jnp.tile(keys, (rows // keys.shape[0],) + (1,) * (keys.ndim - 1))
    loop = dict(state, step=jnp.zeros((), jnp.int32), done=jnp.zeros((rows,), bool),
                tokens=jnp.full((rows, width), PAD_ID, jnp.int32))
    if collect:
        loop["seen"] = jnp.zeros((rows, width) + state["hidden"].shape[1:], state["hidden"].dtype)

    def body(s):
        logits = dec.apply(s["hidden"], method=MultimodalLM.lm_logits)
        tok = sample_rows(_fold(keys, s["step"]), logits, temperature=settings.temperature,
                          top_k=settings.top_k, top_p=settings.top_p)
        tok = jnp.where(s["done"], PAD_ID, tok)
        new_h, cache = dec.decode(s["cache"], _step_chunk(
            tok, jnp.zeros((rows, dec.codebook.dim), jnp.float32), TEXT, s["pos"], segment))
        out = dict(s, step=s["step"] + 1, cache=cache, hidden=new_h[:, 0], pos=s["pos"] + 1,
                   done=s["done"] | (tok == special.eos),
                   tokens=s["tokens"].at[:, s["step"]].set(tok))
        if collect:
            out["seen"] = s["seen"].at[:, s["step"]].set(s["hidden"])
        return out

    s = jax.lax.while_loop(lambda s: (s["step"] < width) & ~jnp.all(s["done"]), body, loop)
    out = {"tokens": s["tokens"]}
    if collect:
        out["hidden"] = s["seen"]
    return {k: s[k] for k in ("cache", "hidden", "pos")}, out


def text_lengths(tokens: jax.Array, eos: int) -> jax.Array:
    """Tokens before the first <eos> per row of sampled text [B, T] (T when none) -> int32 [B]."""
    stop = tokens == eos
    return jnp.where(stop.any(-1), jnp.argmax(stop, -1), tokens.shape[1]).astype(jnp.int32)


def _t2i_doc(dec: Decoder, cache, caption_ids, lengths, segment, keys, num_tokens: int,
             collect: bool):
    """Prefills `<bos> caption <boi>` (+ the uncond `<bos> <uncond> <boi>` half with CFG; the
    caption width must be >= 1), samples the image -> (cache, the image loop's outputs)."""
    tokens, valid, pos = _t2i_prompt(caption_ids, lengths, dec.special)
    if dec.settings.guided:
        u_tokens, u_valid, u_pos = _t2i_prompt(*uncond_prompt(caption_ids, dec.special),
                                               dec.special)
        tokens, valid = jnp.concatenate([tokens, u_tokens]), jnp.concatenate([valid, u_valid])
        pos = jnp.concatenate([pos, u_pos])
    hidden, cache = dec.decode(cache, _text_chunk(tokens, valid, segment, dec.codebook.dim))
    state = {"cache": cache, "hidden": hidden[:, -1], "pos": pos}
    state, out = _image_loop(dec, state, segment, keys, num_tokens, collect)
    return state["cache"], out


def _i2t_doc(dec: Decoder, cache, codes, segment, keys, collect: bool):
    """Prefills `<bos> <boi> img <eoi>` (layout.i2t_parts' prefix) as ONE chunk (the image is a
    bidirectional context block, image_block = segment as the packer writes it), then samples
    the caption -> (cache, the text loop's outputs)."""
    special = dec.special
    rows, n, _ = codes.shape
    col = lambda v: jnp.full((rows, 1), v, jnp.int32)  # noqa: E731
    tokens = jnp.concatenate([col(special.bos), col(special.boi), dec.codebook.codes_to_indices(codes),
                              col(special.eoi)], axis=1)
    is_img = jnp.arange(n + 3) - 2
    is_img = jnp.broadcast_to((is_img >= 0) & (is_img < n), tokens.shape)
    chunk_codes = jnp.pad(codes.astype(jnp.float32), ((0, 0), (2, 1), (0, 0)))
    positions = jnp.broadcast_to(jnp.arange(n + 3, dtype=jnp.int32), tokens.shape)
    hidden, cache = dec.decode(cache, _chunk(
        tokens, chunk_codes, jnp.where(is_img, IMAGE, TEXT), positions,
        jnp.full(tokens.shape, segment, jnp.int32),
        jnp.where(is_img, segment, 0).astype(jnp.int32),
        jnp.where(is_img, positions - 2, -1).astype(jnp.int32)))
    state = {"cache": cache, "hidden": hidden[:, -1], "pos": positions[:, -1] + 1}
    state, out = _text_loop(dec, state, segment, keys, collect)
    return state["cache"], out


def _at_least_one_column(caption_ids):
    """Caption ids [B, T] with T >= 1 (a padding column when T == 0): the unconditional half
    of CFG needs room for its `<uncond>` caption, and lengths are unchanged."""
    if caption_ids.shape[1] >= 1:
        return caption_ids
    return jnp.zeros((caption_ids.shape[0], 1), jnp.int32)


# ---- public entry points (pure; jit them with `Sampler`) --------------------------------------
def text_to_image(params, model, caption_ids, caption_lengths, rng, *, settings: SampleSettings,
                  special: SpecialIds, num_image_tokens: int, collect: bool = False,
                  codebook=None) -> dict:
    """Images for captions: caption_ids int [B, T] right-padded, caption_lengths [B] ->
    {"indices": int32 [B, n], "codes": float32 [B, n, d] in the codebook
     (+ "hidden": [B, n, D], the state that predicted each token, when `collect`)}."""
    dec = Decoder(model, params, settings, special, codebook)
    caption_ids = _at_least_one_column(caption_ids)
    b, width = caption_ids.shape
    cache = init_cache(model.cfg, (1 + settings.guided) * b,
                       width + layout.T2I_PROMPT_SPECIALS + num_image_tokens)
    _, out = _t2i_doc(dec, cache, caption_ids, caption_lengths, 1, _fold(row_keys(rng, b), 0),
                      num_image_tokens, collect)
    return out


def image_to_text(params, model, image_codes, rng, *, settings: SampleSettings,
                  special: SpecialIds, collect: bool = False, codebook=None) -> dict:
    """Captions for images given as FSQ code vectors [B, n, d] ->
    {"tokens": int32 [B, max_text_len] (PAD_ID after <eos>), "lengths": [B]
     (+ "hidden": [B, T, D] when `collect`)}."""
    dec = Decoder(model, params, settings, special, codebook)
    b, n, _ = image_codes.shape
    cache = init_cache(model.cfg, b, n + layout.I2T_PROMPT_SPECIALS + settings.max_text_len)
    _, out = _i2t_doc(dec, cache, image_codes, 1, _fold(row_keys(rng, b), 1), collect)
    result = {"tokens": out["tokens"], "lengths": text_lengths(out["tokens"], special.eos)}
    return {**result, **({"hidden": out["hidden"]} if collect else {})}


def interleaved(params, model, caption_ids, caption_lengths, rng, *, settings: SampleSettings,
                special: SpecialIds, num_image_tokens: int, rounds: int = 2,
                codebook=None) -> dict:
    """The caption -> image -> caption -> ... chain of the module docstring, `rounds` images.

    Round r is a text->image document (segment 2r+1) followed by an image->text document
    (segment 2r+2) in one cache; a `lax.scan` over rounds compiles one round only. With the same
    `rng`, round 0 equals `text_to_image` followed by `image_to_text` (same per-row keys).
    Returns {"indices": [B, rounds, n], "codes": [B, rounds, n, d], "tokens": [B, rounds, T]
    (the caption generated for each image), "lengths": [B, rounds]}.
    """
    if rounds < 1:
        raise ValueError(f"interleaved: rounds={rounds} must be >= 1.")
    dec = Decoder(model, params, settings, special, codebook)
    b, width = caption_ids.shape
    n, t = num_image_tokens, settings.max_text_len
    groups = 1 + settings.guided
    width = max(width, t, 1)  # every round's prompt has the same static width
    ids = jnp.pad(caption_ids.astype(jnp.int32), ((0, 0), (0, width - caption_ids.shape[1])))
    per_round = (width + layout.T2I_PROMPT_SPECIALS + n) + (n + layout.I2T_PROMPT_SPECIALS + t)
    cache = init_cache(model.cfg, groups * b, rounds * per_round)
    keys = row_keys(rng, b)

    def one_round(carry, r):
        cache, ids, lengths = carry
        cache, image = _t2i_doc(dec, cache, ids, lengths, 2 * r + 1, _fold(keys, 2 * r), n, False)
        codes = image["codes"]
        cache, text = _i2t_doc(dec, cache, jnp.tile(codes, (groups, 1, 1)), 2 * r + 2,
                               _fold(keys, 2 * r + 1), False)
        tokens = text["tokens"][:b]
        lengths = text_lengths(tokens, special.eos)
        next_ids = jnp.pad(tokens, ((0, 0), (0, width - t)))
        return (cache, next_ids, lengths), (image["indices"], codes, tokens, lengths)

    _, outs = jax.lax.scan(one_round, (cache, ids, caption_lengths.astype(jnp.int32)),
                           jnp.arange(rounds))
    return {name: jnp.swapaxes(v, 0, 1)
            for name, v in zip(("indices", "codes", "tokens", "lengths"), outs)}


def _edit_prompt(context_codes, instr_ids, lengths, special: SpecialIds, codebook):
    """`<bos> <boi> A <eoi> instr <boi>` (layout.edit_parts' prefix) left-padded to width
    n + 4 + T: A is a context block (image_block = segment 1), padding has segment 0 and
    positions restart at each row's first real token, as the packer writes them."""
    b, n, d = context_codes.shape
    width = n + 4 + instr_ids.shape[1]
    col = lambda v: jnp.full((b, 1), v, jnp.int32)  # noqa: E731
    tokens = jnp.concatenate([col(special.bos), col(special.boi), codebook.codes_to_indices(context_codes),
                              col(special.eoi), instr_ids.astype(jnp.int32), col(0)], axis=1)
    tokens = tokens.at[jnp.arange(b), n + 3 + lengths].set(special.boi)
    slot = jnp.broadcast_to(jnp.arange(width), (b, width))
    is_img = (slot >= 2) & (slot < n + 2)
    codes = jnp.pad(context_codes.astype(jnp.float32), ((0, 0), (2, width - n - 2), (0, 0)))
    real = lengths + n + 4
    src = jnp.arange(width)[None, :] - (width - real)[:, None]  # right-padded -> left-padded
    valid = src >= 0
    take = lambda a: jnp.take_along_axis(  # noqa: E731
        a, jnp.clip(src, 0, width - 1).reshape(src.shape + (1,) * (a.ndim - 2)), axis=1)
    is_img = take(is_img) & valid
    return _chunk(jnp.where(valid, take(tokens), 0), jnp.where(is_img[..., None], take(codes), 0.0),
                  jnp.where(is_img, IMAGE, TEXT), jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0),
                  valid.astype(jnp.int32), is_img.astype(jnp.int32),
                  jnp.where(is_img, take(slot) - 2, -1).astype(jnp.int32)), real


def edit_image(params, model, context_codes, instr_ids, instr_lengths, rng, *,
               settings: SampleSettings, special: SpecialIds, num_image_tokens: int,
               codebook=None) -> dict:
    """The image after an instruction: context image A as FSQ codes [B, n, d], instruction ids
    [B, T] right-padded with lengths [B] -> {"indices" [B, n], "codes" [B, n, d]}, sampled in
    the edit layout `<bos> <boi> A <eoi> instr <boi> B` (data.name="shapes_edits"). With CFG the
    unconditional half replaces the instruction by `<uncond>` (the packer's instruction dropout)."""
    dec = Decoder(model, params, settings, special, codebook)
    instr_ids = _at_least_one_column(instr_ids)
    b = instr_ids.shape[0]
    chunk, real = _edit_prompt(context_codes, instr_ids, instr_lengths, special, dec.codebook)
    if settings.guided:
        u_chunk, u_real = _edit_prompt(context_codes, *uncond_prompt(instr_ids, special), special,
                                       dec.codebook)
        chunk = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), chunk, u_chunk)
        real = jnp.concatenate([real, u_real])
    cache = init_cache(model.cfg, chunk["tokens"].shape[0],
                       chunk["tokens"].shape[1] + num_image_tokens)
    hidden, cache = dec.decode(cache, chunk)
    state = {"cache": cache, "hidden": hidden[:, -1], "pos": real}
    _, out = _image_loop(dec, state, 1, _fold(row_keys(rng, b), 3), num_image_tokens, False)
    return out


def check_prompts(caption_ids, caption_lengths) -> None:
    """ValueError unless ids are [B, T] and 0 <= lengths[b] <= T (host-side, before jit)."""
    ids, lengths = np.asarray(caption_ids), np.asarray(caption_lengths)
    if ids.ndim != 2 or lengths.shape != ids.shape[:1] or not (
            (lengths >= 0) & (lengths <= ids.shape[1])).all():
        raise ValueError(f"caption_ids must be [B, T] and caption_lengths [B] in [0, T]; got "
                         f"shapes {ids.shape}, {lengths.shape} and lengths {lengths.tolist()}.")


class Sampler:
    """The entry points above jitted once for a model and its settings (one compile per input
    shape), with host-side input checks."""

    def __init__(self, model: MultimodalLM, settings: SampleSettings, special: SpecialIds,
                 num_image_tokens: int, *, collect: bool = False, codebook=None):
        """`codebook`: the image tokens' codebook (`model_codebook`; None = the FSQ grid)."""
        codebook = model_codebook(model, codebook)
        common = dict(settings=settings, special=special, codebook=codebook)
        image = dict(common, num_image_tokens=int(num_image_tokens))
        self.code_dim = codebook.dim
        self._t2i = jax.jit(lambda params, ids, lengths, rng: text_to_image(
            params, model, ids, lengths, rng, **image, collect=collect))
        self._i2t = jax.jit(lambda params, codes, rng: image_to_text(
            params, model, codes, rng, **common, collect=collect))
        self._edit = jax.jit(lambda params, codes, ids, lengths, rng: edit_image(
            params, model, codes, ids, lengths, rng, **image))
        self._chain = jax.jit(lambda params, ids, lengths, rng, rounds: interleaved(
            params, model, ids, lengths, rng, **image, rounds=rounds), static_argnames=("rounds",))

    def text_to_image(self, params, caption_ids, caption_lengths, rng) -> dict:
        check_prompts(caption_ids, caption_lengths)
        return self._t2i(params, caption_ids, caption_lengths, rng)

    def image_to_text(self, params, image_codes, rng) -> dict:
        if np.ndim(image_codes) != 3 or np.shape(image_codes)[-1] != self.code_dim:
            raise ValueError(f"image_codes must be [B, n, {self.code_dim}] code vectors, got "
                             f"shape {np.shape(image_codes)}.")
        return self._i2t(params, image_codes, rng)

    def edit(self, params, context_codes, instr_ids, instr_lengths, rng) -> dict:
        """`edit_image` (the image after an instruction, given the image before it)."""
        check_prompts(instr_ids, instr_lengths)
        return self._edit(params, context_codes, instr_ids, instr_lengths, rng)

    def interleaved(self, params, caption_ids, caption_lengths, rng, rounds: int = 2) -> dict:
        check_prompts(caption_ids, caption_lengths)
        return self._chain(params, caption_ids, caption_lengths, rng, rounds=int(rounds))
