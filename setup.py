"""Installs mmjax. Versions are pinned loosely: the lower bounds are what CI runs today."""
from setuptools import find_packages, setup

setup(
    name="mmjax",
    version="0.1.0",
    description="JAX/Flax multimodal autoregressive models: FSQ tokenizer, "
    "Mixture-of-Transformers backbone, flow-matching image head.",
    packages=find_packages(include=["mmjax", "mmjax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.10",
        "grain>=0.2.10",
        "tensorflow-datasets>=4.9.6",
        "array-record>=0.5",
        "ml-collections>=0.1.1",
        "absl-py>=2.0",
        "sentencepiece>=0.2",
        "numpy>=1.26",
        "scipy>=1.11",
        "scikit-learn>=1.3",
        "threadpoolctl>=3.0",  # mmjax.scaling.fits: one BLAS thread for the many small fits
        "pillow>=10",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "tensorboard>=2.15",  # so `tensorboard --logdir WORKDIR` works after the README install
    ],
    entry_points={"console_scripts": ["mmjax = mmjax.main:entry"]},
    extras_require={
        # Importers of users' data (mmjax.data.import_images): parquet and hf_disk formats.
        "import": ["pyarrow>=14", "datasets>=2.14"],
        "test": ["pytest>=8", "pytest-xdist>=3", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6",
                 "pyarrow>=14", "datasets>=2.14"],
        "gpu": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
    },
)
