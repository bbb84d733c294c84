"""Edit sampling (sampling.edit_image) == the packer's edit layout under teacher forcing: the
guided ODE endpoint of every sampled token of B is re-derived from full-forward hidden states of
the packed documents `A instr B` and `A <uncond> B` (mmjax.data.edit_packing)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import sampling
from mmjax.data import edit_packing, packing
from mmjax.models.model import MultimodalLM
from test_sampling import LEVELS, FSQ_, N, SETTINGS, SPECIAL, build, example_batch, key, tiny_cfg

INSTR = np.array([[7, 8, 9, 0, 0], [10, 11, 12, 13, 14], [6, 0, 0, 0, 0]], np.int32)
LENGTHS = np.array([3, 5, 1], np.int32)
SEQ = 24


@pytest.fixture(scope="module")
def edit():
    # 2 layers: with one, later positions read only A's embeddings and A's own mask is unseen
    model, params = build(tiny_cfg(num_modalities=2, num_layers=2), example_batch())
    sampler = sampling.Sampler(model, SETTINGS, SPECIAL, N)
    a = np.random.default_rng(0).integers(0, FSQ_.codebook_size, (3, N)).astype(np.int32)
    out = sampler.edit(params, FSQ_.indices_to_codes(a), INSTR, LENGTHS, key(0))
    return model, params, sampler, a, out


def _hidden_before_b(model, params, a, instr, lengths, b):
    """Full-forward hidden states at the positions predicting B's tokens (<boi>, B[:-1])."""
    docs = [edit_packing.build_edit_document([ai, bi], [FSQ_.indices_to_codes(ai),
                                             FSQ_.indices_to_codes(bi)], [t[:n]], SPECIAL)
            for ai, bi, t, n in zip(a, b, instr, lengths)]
    rows = [packing.pack_documents([d], SEQ, len(LEVELS)) for d in docs]
    batch = {k: np.stack([r[k] for r in rows]) for k in
             ("tokens", "codes", "modality", "positions", "segment_ids", "image_block", "image_pos")}
    hidden = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, batch))
    starts = np.array([np.nonzero(d["image_mask"])[0][0] for d in docs])
    return hidden[np.arange(len(a))[:, None], starts[:, None] + np.arange(N)]


def test_guided_edit_matches_packed_layout(edit):
    model, params, _, a, out = edit
    b = np.asarray(out["indices"])
    assert b.shape == (3, N)
    np.testing.assert_array_equal(FSQ_.indices_to_codes(b), np.asarray(out["codes"]))
    h_c = _hidden_before_b(model, params, a, INSTR, LENGTHS, b)
    h_u = _hidden_before_b(model, params, a, np.full((3, 1), SPECIAL.uncond), [1, 1, 1], b)
    keys = sampling._fold(sampling.row_keys(key(0), 3), 3)
    x0 = jnp.stack([jax.vmap(lambda k: jax.random.normal(k, (len(LEVELS),)))(
        sampling._fold(keys, jnp.int32(i))) for i in range(N)], axis=1)

    def velocity(x, t):
        t = jnp.full(x.shape[:-1], t)
        v_c, v_u = (model.apply({"params": params}, h, x, t, method=MultimodalLM.flow_velocity)
                    for h in (h_c, h_u))
        return v_u + SETTINGS.cfg_scale * (v_c - v_u)

    x1 = jax.jit(lambda x: sampling.integrate_flow(velocity, x, SETTINGS.ode_steps, "heun"))(x0)
    np.testing.assert_array_equal(FSQ_.snap(np.asarray(x1)), np.asarray(out["codes"]))


def test_edit_depends_on_the_context_image_and_checks_inputs(edit):
    model, params, sampler, a, out = edit
    other = sampler.edit(params, FSQ_.indices_to_codes((a + 1) % FSQ_.codebook_size), INSTR,
                         LENGTHS, key(0))
    assert (np.asarray(other["indices"]) != np.asarray(out["indices"])).any()
    with pytest.raises(ValueError, match="caption_lengths"):
        sampler.edit(params, FSQ_.indices_to_codes(a), INSTR, np.array([3, 6, 1]), key(0))
