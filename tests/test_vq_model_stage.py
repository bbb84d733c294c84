"""A VQ tokenizer feeds the model stage as FSQ does: LearnedCodebook against brute force, the
stored codebook's checks, and `configs/mot_shapes.py:smoke,vq` end to end (tokens and table on
disk, the packer's code vectors = table rows, sampled image tokens in the codebook)."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import config_defaults, image_codebook
from mmjax.config_validation import ConfigError, model_config, validate
from mmjax.errors import InputError, MissingArtifactError
from mmjax.tokenizers.fsq import FSQ
from mmjax.tokenizers.vq import LearnedCodebook
from mmjax.workdir import Workdir
from child_env import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = np.random.default_rng(0).normal(size=(37, 3)).astype(np.float32)


def brute_force_nearest(x, table):
    return np.argmin(((x[..., None, :] - table) ** 2).sum(-1), axis=-1)


def test_learned_codebook_is_nearest_row_on_numpy_jax_and_under_jit():
    cb = LearnedCodebook(TABLE)
    assert (cb.dim, cb.codebook_size, cb.levels) == (3, 37, (37,))
    x = np.random.default_rng(1).normal(size=(4, 5, 3)).astype(np.float32)
    want = brute_force_nearest(x, TABLE)
    got_np = cb.codes_to_indices(x)
    assert isinstance(got_np, np.ndarray) and got_np.shape == (4, 5)
    np.testing.assert_array_equal(got_np, want)
    np.testing.assert_array_equal(jax.jit(cb.codes_to_indices)(jnp.asarray(x)), want)
    np.testing.assert_array_equal(jax.jit(cb.snap)(jnp.asarray(x)), TABLE[want])
    np.testing.assert_array_equal(cb.indices_to_codes(want), TABLE[want])
    np.testing.assert_array_equal(cb.codes_to_indices(TABLE), np.arange(37))  # rows map to themselves
    with pytest.raises(ValueError, match="last axis must be the code width 3"):
        cb.codes_to_indices(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="must be integers"):
        cb.indices_to_codes(np.zeros(2, np.float32))
    with pytest.raises(ValueError, match=r"\[K >= 2, d >= 1\]"):
        LearnedCodebook(np.zeros((1, 3)))


def vq_config():
    c = config_defaults.base_config()
    c.fsq.quantizer, c.fsq.vq_codebook_size, c.fsq.vq_dim = "vq", 37, 3
    return c


def test_vq_model_config_has_the_codebook_width_and_size():
    validate(vq_config())
    cfg = model_config(vq_config(), vocab_size=50)
    assert (cfg.code_dim, cfg.codebook_size, cfg.fsq_levels) == (3, 37, (37,))
    fsq_cfg = model_config(config_defaults.base_config(), vocab_size=50)
    assert (fsq_cfg.code_dim, fsq_cfg.vq_dim) == (len(fsq_cfg.fsq_levels), 0)
    c = vq_config()
    c.model.discrete_factorized = True
    with pytest.raises(ConfigError, match=r"model\.discrete_factorized.*needs FSQ tokens"):
        validate(c)


def test_stored_codebook_is_checked_and_never_overwritten(tmp_path):
    wd = Workdir.from_config(vq_config(), str(tmp_path))
    config = vq_config()
    with pytest.raises(MissingArtifactError, match=r"codebook\.npy.*--mode=tokenize"):
        image_codebook.load(config, wd)
    image_codebook.save(wd, TABLE)
    image_codebook.save(wd, TABLE)  # the same table again: a no-op (a rerun of the stage)
    np.testing.assert_array_equal(image_codebook.load(config, wd).codebook(), TABLE)
    with pytest.raises(InputError, match="refusing to overwrite"):
        image_codebook.save(wd, TABLE + 1)
    np.testing.assert_array_equal(image_codebook.read_table(wd.image_token_codebook), TABLE)
    config.fsq.vq_codebook_size = 38
    with pytest.raises(InputError, match=r"codebook\.npy: codebook of shape \(37, 3\).*\(38, 3\)"):
        image_codebook.load(config, wd)
    assert isinstance(image_codebook.load(config_defaults.base_config(), wd), FSQ)


def test_a_vq_model_needs_its_codebook_to_sample():
    from mmjax import sampling
    from mmjax.models.model import MultimodalLM
    model = MultimodalLM(model_config(vq_config(), vocab_size=50))
    with pytest.raises(ValueError, match="pass codebook="):
        sampling.model_codebook(model)
    with pytest.raises(ValueError, match="does not fit the model's 37 codes of width 3"):
        sampling.model_codebook(model, LearnedCodebook(TABLE[:, :2]))
    assert sampling.model_codebook(model, LearnedCodebook(TABLE)).codebook_size == 37


@pytest.fixture(scope="module")
def vq_workdir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("vq_pipeline"))
    env = child_env()
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, env.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-m", "mmjax.main",
                          "--config=configs/mot_shapes.py:smoke,vq", f"--workdir={wd}",
                          "--mode=pipeline", "--config.sample.num_eval=6",
                          "--config.sample.batch_size=4"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return wd


@pytest.mark.slow
def test_vq_pipeline_trains_and_samples_in_the_learned_codebook(vq_workdir):
    from configs import mot_shapes
    from mmjax import api
    from mmjax.data import image_tokens, text
    from mmjax.stages.tokenizer import load_tokenizer
    from mmjax.tasks import multimodal
    from mmjax.tokenizers import autoencoder as ae
    config = mot_shapes.get_config("smoke,vq")
    wd = Workdir.from_config(config, vq_workdir)
    # the stored table is the trained tokenizer's codebook
    model, weights = load_tokenizer(config, wd)
    table = image_codebook.read_table(wd.image_token_codebook)
    np.testing.assert_array_equal(table, np.asarray(ae.codebook_table(model, weights)))
    assert table.shape == (config.fsq.vq_codebook_size, config.fsq.vq_dim)
    assert image_tokens.token_meta(wd)["quantizer"] == "vq"
    # the model stage's input code vectors are the table's rows of the stored indices
    sp = text.load_text_tokenizer(wd.sp_model)
    rows = multimodal.packed_dataset(config, wd, sp, "validation", train=False)
    row = rows[0]
    is_image = row["modality"] == 1
    assert is_image.any()
    np.testing.assert_array_equal(row["codes"][is_image], table[row["tokens"][is_image]])
    # sampling: every generated token is a codebook row, and its index names that row
    run = api.load(vq_workdir)
    out = run.sampler(run.settings).text_to_image(
        run.params, *run.encode_prompts(["a red circle"]), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(out["codes"][0]), table[np.asarray(out["indices"][0])])
    assert run.caption(run.reconstruct(run.pixels(np.asarray(out["indices"])))) is not None
