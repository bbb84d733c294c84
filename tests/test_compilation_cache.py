"""train.compilation_cache_dir: where mmjax.main keeps JAX's persistent compilation cache."""
import jax
from mmjax import compilation_cache, config_defaults


def test_default_is_under_the_workdir_and_off_disables():
    config = config_defaults.base_config()
    assert compilation_cache.directory_for(config, "/runs/a") == "/runs/a/jax_cache"
    assert compilation_cache.directory_for(config, "gs://b/run") == "gs://b/run/jax_cache"
    config.train.compilation_cache_dir = "/shared/cache"
    assert compilation_cache.directory_for(config, "/runs/a") == "/shared/cache"
    config.train.compilation_cache_dir = "off"
    assert compilation_cache.directory_for(config, "/runs/a") == ""


def test_enable_keeps_a_cache_already_configured(tmp_path):
    previous = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "users"))
        assert compilation_cache.enable(tmp_path / "ours") == str(tmp_path / "users")
        assert not (tmp_path / "ours").exists()
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)


def test_a_cache_that_cannot_be_created_is_skipped_not_fatal(tmp_path):
    previous = jax.config.jax_compilation_cache_dir
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert compilation_cache.enable(blocker / "jax_cache") == ""
        assert not jax.config.jax_compilation_cache_dir
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
