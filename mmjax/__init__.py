"""mmjax: multimodal autoregressive models in JAX/Flax. `mmjax.load(workdir)` -> mmjax.api.Run.

The API is imported lazily, so `python -m mmjax.main` can reject a bad config before jax loads.
"""


def __getattr__(name):
    if name in ("load", "Run"):
        from mmjax import api
        return getattr(api, name)
    raise AttributeError(f"module 'mmjax' has no attribute {name!r}")
