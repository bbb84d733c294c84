"""TFDS builders for the embedded datasets (shapes, digits), written as ArrayRecord.

Why TFDS at all for generated data: the same `as_data_source` random-access path then serves the
embedded sets and any standard TFDS dataset on a pod, and a prepared set is a plain directory that
can be copied to a bucket. Features are `Tensor` / `Text` only, which TFDS encodes and decodes
without TensorFlow.

Every generation setting is part of the builder *config name* (e.g. `s32_tr4096_va512_te512_o3_seed0`),
so two settings never share a directory under `<data_dir>/mmjax_shapes/`, and preparing twice
reuses what is on disk (TFDS writes to a temporary folder and renames it when complete).
Shuffling is disabled so that record `i` of a split is the generator's record `i` (its `index`).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from mmjax.data import digits, natural, shapes, shapes_edits
from mmjax.errors import InputError
from mmjax.workdir import EMBEDDED_DATASETS

EMBEDDED = EMBEDDED_DATASETS  # one list, shared with the Workdir (which places them)
FILE_FORMAT = "array_record"


@dataclasses.dataclass
class EmbeddedConfig(tfds.core.BuilderConfig):
    """Generation settings of an embedded dataset (all encoded in `name`)."""

    image_size: int = 32
    num_train: int = 4096
    num_validation: int = 512
    num_test: int = 512
    max_objects: int = 3
    seed: int = 0


def _features(image_size: int, max_objects: int) -> tfds.features.FeaturesDict:
    """The record contract of docs/INTERFACES.md as TF-free TFDS features."""
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Tensor(shape=(image_size, image_size, 3), dtype=np.uint8),
            "caption": tfds.features.Text(),
            "attributes": tfds.features.Tensor(shape=(max_objects, 5), dtype=np.int32),
            "label": tfds.features.Tensor(shape=(), dtype=np.int32),
            "index": tfds.features.Tensor(shape=(), dtype=np.int64),
        }
    )


class _GeneratedInfo(tfds.core.DatasetInfo):
    """DatasetInfo of a dataset generated on this machine.

    Why: a TFDS builder whose directory has no dataset_info.json yet (every build, and every
    look before one) calls `initialize_from_bucket`, which makes a temp directory for metadata
    from the TFDS bucket and never removes it: one empty /tmp/tmp*tfds per data stage, test or
    notebook run. An embedded dataset is never in that bucket, so there is nothing to fetch.
    """

    def initialize_from_bucket(self) -> None:
        return None


class _EmbeddedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared plumbing: info from the config, one generator per non-empty split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    DESCRIPTION = ""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        """No source path: TFDS would probe it for a checksums file (needs `importlib_resources`)."""
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return _GeneratedInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=_features(cfg.image_size, cfg.max_objects),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # generated locally, nothing to download
        sizes = self._split_sizes()
        return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

    def _split_sizes(self) -> dict[str, int]:
        """Examples per split (each embedded dataset defines its own; this base is abstract)."""
        raise NotImplementedError

    def _record(self, split: str, index: int) -> dict:
        """The deterministic record `index` of `split` (defined by each embedded dataset)."""
        raise NotImplementedError

    def _generate_examples(self, split: str, num: int):
        for index in range(num):
            yield index, self._record(split, index)


class MmjaxShapes(_EmbeddedBuilder):
    """Procedural shapes with captions (mmjax.data.shapes)."""

    DESCRIPTION = "Procedural shapes on a 3x3 grid with attribute captions (mmjax.data.shapes)."

    def _split_sizes(self):
        cfg = self.builder_config
        return {"train": cfg.num_train, "validation": cfg.num_validation, "test": cfg.num_test}

    def _record(self, split, index):
        cfg = self.builder_config
        return shapes.generate_record(cfg.seed, split, index, cfg.image_size, cfg.max_objects)


class MmjaxDigits(_EmbeddedBuilder):
    """scikit-learn's handwritten digits with captions (mmjax.data.digits)."""

    DESCRIPTION = "scikit-learn handwritten digits, upsampled to RGB, with captions (mmjax.data.digits)."

    def _split_sizes(self):
        cfg = self.builder_config
        caps = {"train": cfg.num_train, "validation": cfg.num_validation, "test": cfg.num_test}
        return {split: digits.split_size(split, cap) for split, cap in caps.items()}

    def _record(self, split, index):
        cfg = self.builder_config
        return digits.generate_record(split, index, cfg.image_size, cfg.max_objects)


class MmjaxNatural(_EmbeddedBuilder):
    """Crops of scikit-learn's two sample photos plus digits (mmjax.data.natural)."""

    DESCRIPTION = ("Random multi-scale, flipped crops of scikit-learn's sample photos (held-out "
                   "tiles for validation/test) plus handwritten digits (mmjax.data.natural).")

    def _split_sizes(self):
        cfg = self.builder_config
        return {"train": cfg.num_train, "validation": cfg.num_validation, "test": cfg.num_test}

    def _record(self, split, index):
        cfg = self.builder_config
        return natural.generate_record(cfg.seed, split, index, cfg.image_size, cfg.max_objects)


class MmjaxShapesEdits(_EmbeddedBuilder):
    """Chains of one-change edits of shapes images (mmjax.data.shapes_edits); data.num_* count
    chains, each CHAIN_IMAGES records."""

    DESCRIPTION = ("Chains of shapes images, each one instructed edit (move, recolour, resize, add, "
                   "remove) from the last (mmjax.data.shapes_edits).")

    def _split_sizes(self):
        cfg = self.builder_config
        return {"train": shapes_edits.num_records(cfg.num_train),
                "validation": shapes_edits.num_records(cfg.num_validation),
                "test": shapes_edits.num_records(cfg.num_test)}

    def _record(self, split, index):
        cfg = self.builder_config
        return shapes_edits.generate_record(cfg.seed, split, index, cfg.image_size, cfg.max_objects)


_BUILDERS = {"shapes": MmjaxShapes, "digits": MmjaxDigits, "natural": MmjaxNatural,
             "shapes_edits": MmjaxShapesEdits}
if tuple(_BUILDERS) != EMBEDDED:
    raise ImportError(f"builders._BUILDERS {tuple(_BUILDERS)} must match workdir.EMBEDDED_DATASETS {EMBEDDED}")


def config_from_data_cfg(data_cfg) -> EmbeddedConfig:
    """EmbeddedConfig from a `data` ConfigDict, validated, named after every setting."""
    if data_cfg.name not in EMBEDDED:
        raise InputError(f"data.name={data_cfg.name!r} is not an embedded dataset {EMBEDDED}")
    values = {
        "image_size": int(data_cfg.image_size),
        "num_train": int(data_cfg.num_train),
        "num_validation": int(data_cfg.num_validation),
        "num_test": int(data_cfg.num_test),
        "max_objects": int(data_cfg.max_objects),
        "seed": int(data_cfg.seed),
    }
    if values["num_train"] < 1 or values["num_validation"] < 0 or values["num_test"] < 0:
        raise InputError(f"data.num_train must be >= 1 and num_validation/num_test >= 0, got {values}")
    if data_cfg.name in ("shapes", "shapes_edits"):
        if values["image_size"] < shapes.MIN_IMAGE_SIZE:
            raise InputError(f"data.image_size={values['image_size']} < {shapes.MIN_IMAGE_SIZE} for shapes")
        if not 1 <= values["max_objects"] <= shapes.GRID**2:
            raise InputError(f"data.max_objects={values['max_objects']} must be in [1, {shapes.GRID ** 2}]")
    elif values["image_size"] < 8:
        raise InputError(f"data.image_size={values['image_size']} < 8 for {data_cfg.name}")
    name = "s{image_size}_tr{num_train}_va{num_validation}_te{num_test}_o{max_objects}_seed{seed}".format(**values)
    return EmbeddedConfig(name=name, **values)


def embedded_builder(data_cfg, data_dir: str) -> tfds.core.GeneratorBasedBuilder:
    """The (not necessarily prepared) builder of an embedded dataset in `data_dir`."""
    config = config_from_data_cfg(data_cfg)
    return _BUILDERS[data_cfg.name](data_dir=data_dir, config=config, file_format=FILE_FORMAT)


def prepare_embedded(data_cfg, data_dir: str) -> tfds.core.GeneratorBasedBuilder:
    """Generate the dataset once (no-op when already prepared) and return its builder."""
    builder = embedded_builder(data_cfg, data_dir)
    if not builder.is_prepared():
        builder.download_and_prepare()
    return builder
