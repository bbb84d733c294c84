"""Typed config blocks, the CHOICES table and the image-head registry: each rule has one home
(config_validation), every choice list is read from mmjax.choices, models/ reads no ConfigDict and
imports no registry, and a head is driven only by its registry entry."""
import ast
import dataclasses
import pathlib

import jax
import numpy as np
import pytest

from mmjax import config_defaults, config_validation, flops, image_heads, objectives, sampling
from mmjax.choices import CHOICES
from mmjax.models import attention, mot
from mmjax.models import model as model_lib
from mmjax.tokenizers import autoencoder

ROOT = pathlib.Path(__file__).resolve().parents[1] / "mmjax"
LEVELS = (8, 5, 5, 5)


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_models_read_no_configdict_and_import_no_registry():
    for path in sorted((ROOT / "models").glob("*.py")):
        bad = {n for n in _imports(path)
               if n.startswith(("ml_collections", "mmjax.image_heads", "mmjax.config"))}
        assert not bad, (path.name, bad)
    assert not any(n.startswith("mmjax.data") for n in _imports(ROOT / "sampling.py"))
    assert _imports(ROOT / "choices.py") <= {"__future__", "__future__.annotations"}
    assert _imports(ROOT / "layout.py") <= {"__future__", "__future__.annotations", "typing",
                                            "typing.NamedTuple", "typing.Sequence"}


def test_every_implementation_table_matches_its_choice_list():
    assert tuple(image_heads.HEADS) == CHOICES["model.image_head"]
    assert tuple(objectives.T_DISTS) == CHOICES["objective.flow_t_dist"]
    assert sampling.SOLVERS == CHOICES["sample.ode_solver"]
    assert mot.IMPLS == CHOICES["model.mot_impl"]
    assert attention.IMPLS == CHOICES["model.attention_impl"]
    assert autoencoder.LOSS_TYPES == CHOICES["fsq.loss"]
    for path, choices in CHOICES.items():  # every choice list is a real config field
        block, field = path.split(".")
        assert field in getattr(config_defaults, f"{block}_config")(), path


def _model_cfg(**kw):
    c = config_defaults.model_config()
    c.update(dict(num_layers=1, d_model=32, num_heads=2, mlp_dim=64, flow_width=16,
                  flow_depth=1, max_seq_len=16), **kw)
    return c


def test_model_config_is_frozen_hashable_and_names_bad_fields():
    cfg = config_validation.model_block(_model_cfg(), 50, LEVELS)
    assert hash(cfg) == hash(config_validation.model_block(_model_cfg(), 50, LEVELS))
    assert cfg.head is image_heads.FLOW and cfg.image_head == "flow" and cfg.code_dim == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 64
    for kw, field in ((dict(mot_impl="fast"), "model.mot_impl"), (dict(remat="some"), "remat"),
                      (dict(num_heads=3), "num_heads"), (dict(noise_aug=-1.0), "noise_aug")):
        with pytest.raises(config_validation.ConfigError, match=field):
            config_validation.model_block(_model_cfg(**kw), 50, LEVELS)
    with pytest.raises(config_validation.ConfigError, match="vocab_size"):
        config_validation.model_block(_model_cfg(), 0, LEVELS)
    broken = _model_cfg()
    del broken.flow_width
    with pytest.raises(config_validation.ConfigError, match="flow_width"):
        config_validation.model_block(broken, 50, LEVELS)
    # The FSQ-levels rule is FSQ's own; the validator reports it for the field.
    config = config_defaults.base_config()
    config.fsq.levels = (8, 1)
    with pytest.raises(config_validation.ConfigError, match=r"fsq.levels.*levels\[1\]=1"):
        config_validation.validate(config)


def test_sample_block_rules_live_in_the_validator_only():
    config = config_defaults.base_config()
    config.sample.image_temperature = -1.0  # once checked only by SampleSettings itself
    with pytest.raises(config_validation.ConfigError, match="sample.image_temperature"):
        config_validation.validate(config)
    with pytest.raises(config_validation.ConfigError, match="objective.flow_t_dist"):
        config_validation.objective_config(dict(config_defaults.objective_config().to_dict(),
                                                flow_t_dist="beta"))


@pytest.mark.parametrize("field, value, message", [
    ("data.max_caption_len", 0, "must be a positive integer"),
    ("data.sp_max_sentences", 0, "must be a positive integer"),
    ("fsq.l1_weight", -1.0, "must be >= 0"),
    ("fsq.norm_groups", 3, "dividing every width in fsq.channels"),
    ("fsq.norm_groups", 0, "dividing every width in fsq.channels"),
    ("fsq.patch_size", 0, "must be a positive integer"),
    ("fsq.patch_size", -2, "must be a positive integer"),
    ("model.rope_theta", 0.0, "must be > 0"),
    ("model.norm_eps", -1.0, "must be > 0"),
    ("objective.direction_redraws", 0, "must be a positive integer"),
    ("sample.batch_size", 0, "must be a positive integer"),
    ("mesh.dcn_data", 0, "must be a positive integer"),
])
def test_values_that_once_failed_late_or_silently_fail_in_validate(field, value, message):
    """Each of these once passed validate() and then ran wrong (an empty train set, a tokenizer
    fitted on one caption, NaN rotations, pure-noise images) or failed deep in a stage."""
    config = config_defaults.base_config()
    block, name = field.split(".")
    config_validation.validate(config)  # the defaults pass
    config[block][name] = value
    with pytest.raises(config_validation.ConfigError, match=rf"config\.{field}=.*{message}"):
        config_validation.validate(config)


def test_malloc_hugepages_is_true_or_false():
    config = config_defaults.base_config()
    config.mesh.malloc_hugepages = None  # a Python-built config (the API): True or False only
    with pytest.raises(config_validation.ConfigError, match="mesh.malloc_hugepages=None"):
        config_validation.validate(config)


def test_a_head_is_driven_by_its_registry_entry_alone():
    """A new entry (here: the discrete head under another name and parameter attribute) is all
    the model and the FLOPs counts need."""
    other = dataclasses.replace(image_heads.DISCRETE, name="other", attr="other_head")
    cfg = dataclasses.replace(config_validation.model_block(_model_cfg(), 50, LEVELS), head=other)
    model = model_lib.MultimodalLM(cfg)
    batch = {k: np.zeros((1, 16), np.int32) for k in model_lib.CHUNK_KEYS if k != "codes"}
    batch["codes"] = np.zeros((1, 16, 4), np.float32)
    params = jax.eval_shape(lambda: model_lib.init_params(model, jax.random.PRNGKey(0), batch))
    assert "other_head" in params and "index_head" not in params and "flow_head" not in params
    assert flops.param_counts(cfg)["total"] == sum(x.size for x in jax.tree.leaves(params))
    assert flops.param_counts(cfg)["image_head"] == 32 * 1000
    with pytest.raises(ValueError, match="image_head='flow'"):
        jax.eval_shape(lambda p: model.apply({"params": p}, np.zeros((1, 32)), np.zeros((1, 4)),
                                             np.zeros((1,)),
                                             method=model_lib.MultimodalLM.flow_velocity), params)


def test_image_positions_field_and_image_side():
    with pytest.raises(config_validation.ConfigError, match="model.image_positions"):
        config_validation.model_block(_model_cfg(image_positions="rope_3d"), 50, LEVELS)
    with pytest.raises(config_validation.ConfigError, match="image_side"):
        config_validation.model_block(_model_cfg(image_positions="learned_2d"), 50, LEVELS)
    config = config_defaults.base_config()
    config.model.image_positions = "learned_2d"
    side = config.data.image_size // 2 ** (len(config.fsq.channels) - 1)
    assert config_validation.model_config(config, 50).image_side == side
    config.fsq.patch_size = 2  # folds 2x2 pixels first: half the tokens per side
    assert config_validation.model_config(config, 50).image_side == side // 2
    config.fsq.patch_size = 3  # 32 px is not a multiple of 3 * 2**(len(channels) - 1)
    with pytest.raises(config_validation.ConfigError, match=r"data.image_size=32.*fsq.patch_size"):
        config_validation.validate(config)
    with pytest.raises(config_validation.ConfigError, match="sample.noise_aug"):
        config_validation.sample_settings(dict(config.sample, noise_aug=-0.1))
