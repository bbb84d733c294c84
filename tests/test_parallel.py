"""Scale-out of the real MultimodalLM (MoT, flow head) through the trainer: the same losses on every
mesh, FSDP really divides params and optimizer state, tensor parallelism splits heads / mlp as
the rules table says, a checkpoint restores onto a different mesh and continues identically, and
bad mesh configs fail naming the config field.

The task below is the real model and loss on synthetic packed rows (docs/INTERFACES.md format,
built with the real packer), so no tokenizer or dataset has to be prepared. Compilations are the
cost here: train steps are compiled once per mesh; params are initialised once and *placed*
(device_put) on other meshes, which exercises the same shardings without recompiling init.
"""
import os
import shutil
import subprocess
import sys

import grain
import jax
import ml_collections
import numpy as np
import pytest

from mmjax import checkpointing, config_defaults, config_validation, objectives, parallel, train
from mmjax.data import packing
from mmjax.data.pipeline import batched_iterator
from mmjax.metrics_writer import read_jsonl
from mmjax.models import model as model_lib
from mmjax.tokenizers.fsq import FSQ

VOCAB, LEVELS, SEQ = 64, (5, 5, 5), 32
SPECIAL = packing.SpecialIds(bos=1, eos=2, boi=3, eoi=4, uncond=5)
IMAGE_TOKENS, MAX_CAPTION = 8, 4  # documents of <= 16 tokens: two per 32-token row
NUM_ROWS = 64
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]


def synthetic_row(index: int, offset: int = 0, fixed_layout: bool = False) -> dict:
    """One packed row of two random documents (random captions / FSQ indices / directions).

    fixed_layout: every row is a t2i then an i2t document with a full-length caption, so all rows
    carry the same number of text- and image-loss positions (then the mean over microbatches of
    per-microbatch masked means equals the full-batch mean).
    """
    rng = np.random.default_rng([index, offset])
    fsq = FSQ(LEVELS)
    docs = []
    for d in range(2):
        length = MAX_CAPTION if fixed_layout else int(rng.integers(1, MAX_CAPTION + 1))
        caption = rng.integers(5, VOCAB, size=length)
        indices = rng.integers(0, fsq.codebook_size, size=IMAGE_TOKENS)
        if fixed_layout:
            direction = ("t2i", "i2t")[d]
        else:
            direction = "t2i" if rng.random() < 0.6 else "i2t"
        docs.append(packing.build_document(caption, indices, fsq.indices_to_codes(indices),
                                           direction, SPECIAL))
    return packing.pack_documents(docs, SEQ, len(LEVELS))


class SyntheticTask:
    """MultimodalLM + objectives.compute_losses on synthetic packed rows (no data stage).

    `.build(config)` binds it to a config (the trainer's Task protocol); `setup_for` does that.
    """

    name = "model"

    def __init__(self, fixed_layout: bool = False, config=None):
        self.fixed_layout = fixed_layout
        self.config = config
        self.train_config = None if config is None else config.train

    def build(self, config):
        return type(self)(self.fixed_layout, config)

    def dataset(self, split, *, train):
        offset = 0 if split == "train" else 1
        return grain.MapDataset.range(NUM_ROWS).map(
            lambda i: synthetic_row(i, offset, self.fixed_layout))

    def model(self, config=None):
        config = config or self.config
        return model_lib.MultimodalLM(config_validation.model_config(config, VOCAB))

    def init_params(self, rng, batch):
        return model_lib.init_params(self.model(), rng, batch)

    def loss_fn(self, params, batch, rng, train):
        return objectives.compute_losses(self.model(), params, batch, rng,
                                         config_validation.objective_config(self.config.objective),
                                         train=train)


def tiny_config(steps=4, model=None, **train_overrides):
    """A 2-layer MoT (d_model 32, 2 heads of 16, mlp 64, flow head width 32), fp32."""
    c = config_defaults.base_config()
    c.fsq.levels = LEVELS
    c.model.update(dict(num_layers=2, d_model=32, num_heads=2, mlp_dim=64, flow_width=32,
                        flow_depth=1, flow_t_samples=2, max_seq_len=SEQ))
    c.model.update(model or {})
    c.train.update(dict(steps=steps, batch_size=8, lr=3e-3, warmup_steps=1, log_every=1,
                        checkpoint_every=2, eval_batches=1, progress_bar=False))
    c.train.update(train_overrides)
    return c


def make_mesh(shape, devices=None):
    cfg = ml_collections.ConfigDict(dict(zip(parallel.MESH_AXES, shape)))
    return parallel.create_mesh(cfg, devices=devices)


def example_batch(config, task):
    ds = task.dataset("train", train=True)
    return next(iter(batched_iterator(ds, int(config.train.batch_size), seed=0, shuffle=False)))


def train_batches(config, task, n):
    """The first `n` global batches the trainer's iterator yields."""
    ds = task.dataset("train", train=True)
    it = iter(batched_iterator(ds, int(config.train.batch_size), seed=config.data.shuffle_seed,
                               shuffle=True))
    return [next(it) for _ in range(n)]


def setup_for(config, task, mesh):
    return train.build_setup(task.build(config), example_batch(config, task), mesh,
                             parallel.logical_rules())


def run_steps(setup, state, batches):
    """Trainer steps (the trainer's jitted step and batch placement) -> (state, losses)."""
    losses = []
    with jax.set_mesh(setup.mesh):
        for batch in batches:
            state, metrics = setup.train_step(state, parallel.shard_batch(batch, setup.mesh))
            losses.append(float(metrics["loss"]))
    return state, losses


def place(state, setup):
    """A host copy of `state` put onto `setup`'s mesh with its shardings (no init compile)."""
    return jax.device_put(jax.device_get(state), setup.state_shardings)


def per_device_bytes(tree) -> dict:
    """Bytes each device holds for the arrays of `tree` (sum over addressable shards)."""
    out: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def _losses(workdir):
    return [r["loss"] for r in read_jsonl(os.path.join(workdir, "model", "train_metrics.jsonl"))
            if "loss" in r]


@pytest.fixture(scope="module")
def reference():
    """4 steps on one device: the initial state (host copy), batches and losses."""
    config, task = tiny_config(), SyntheticTask()
    setup = setup_for(config, task, make_mesh((1, 1, 1), jax.devices()[:1]))
    with jax.set_mesh(setup.mesh):
        state = setup.init_fn(jax.random.PRNGKey(config.seed))
    init_host = jax.device_get(state)
    batches = train_batches(config, task, 4)
    _, losses = run_steps(setup, state, batches)
    return dict(config=config, task=task, init=init_host, batches=batches, losses=losses)


@pytest.fixture(scope="module")
def full_run(reference, tmp_path_factory):
    """The trainer itself (train.train) for 4 steps on (2, 4, 1), checkpoints at steps 2 and 4."""
    workdir = str(tmp_path_factory.mktemp("full"))
    out = train.train(reference["config"], workdir, reference["task"].build(reference["config"]), mesh=make_mesh((2, 4, 1)))
    return dict(workdir=workdir, params=out["state"]["params"], losses=_losses(workdir))


def test_mot_losses_match_on_every_mesh(reference, full_run):
    ref = reference["losses"]
    assert all(np.isfinite(ref)) and ref[-1] < ref[0], ref
    np.testing.assert_allclose(full_run["losses"], ref, rtol=1e-4, err_msg="mesh (2, 4, 1)")
    for shape in MESHES:
        if shape == (2, 4, 1):  # already run through train.train above
            continue
        setup = setup_for(reference["config"], reference["task"], make_mesh(shape))
        _, got = run_steps(setup, place(reference["init"], setup), reference["batches"])
        np.testing.assert_allclose(got, ref, rtol=1e-4, err_msg=f"mesh {shape}")


@pytest.mark.parametrize("n", [8, 4, 2])
def test_fsdp_divides_params_and_optimizer_state(reference, n):
    config, task = reference["config"], reference["task"]
    setup = setup_for(config, task, make_mesh((8 // n, n, 1)))
    state = place(reference["init"], setup)
    for part in ("params", "opt_state"):
        total = sum(x.nbytes for x in jax.tree.leaves(reference["init"][part]))
        held = per_device_bytes(state[part])
        assert len(held) == 8
        ratio = max(held.values()) / (total / n)
        print(f"fsdp={n} {part}: {total} B total, max {max(held.values())} B per device, "
              f"ratio to total/n = {ratio:.3f}")
        assert ratio < 1.10, (part, n, ratio)
    # The data axis replicates: both data groups hold the same (full) set of shards.
    assert state["step"].sharding.is_fully_replicated


def _spec(setup, *path):
    node = setup.state_shardings["params"]
    for key in path:
        node = node[key]
    return node.spec


def test_tensor_parallel_splits_heads_and_mlp(reference):
    config, task = reference["config"], reference["task"]
    setup = setup_for(config, task, make_mesh((4, 1, 2)))
    state = place(reference["init"], setup)
    block = state["params"]["blocks_0"]
    # [modality, embed, heads, kv]: heads over tensor, embed over fsdp (size 1 here).
    for name in ("query", "key", "value"):
        assert _spec(setup, "blocks_0", name, "kernel") == jax.sharding.PartitionSpec(
            None, "fsdp", "tensor", None)
        assert block[name]["kernel"].addressable_shards[0].data.shape == (2, 32, 1, 16)
    assert _spec(setup, "blocks_0", "out", "kernel")[1] == "tensor"
    assert block["out"]["kernel"].addressable_shards[0].data.shape == (2, 1, 16, 32)
    for name in ("gate", "up"):  # [modality, embed, mlp]
        assert _spec(setup, "blocks_0", name, "kernel")[2] == "tensor"
        assert block[name]["kernel"].addressable_shards[0].data.shape == (2, 32, 32)
    assert _spec(setup, "blocks_0", "down", "kernel")[1] == "tensor"  # [modality, mlp, embed]
    assert block["down"]["kernel"].addressable_shards[0].data.shape == (2, 32, 32)
    # The two tensor shards hold different halves; data replicas hold the same half.
    shards = {s.device: np.asarray(s.data) for s in block["gate"]["kernel"].addressable_shards}
    mesh_devices = setup.mesh.devices  # [data, fsdp, tensor]
    a, b = shards[mesh_devices[0, 0, 0]], shards[mesh_devices[0, 0, 1]]
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, shards[mesh_devices[3, 0, 0]])


def test_checkpoint_restores_onto_a_smaller_mesh(reference, full_run, tmp_path):
    """The (2, 4, 1) run's step-2 checkpoint continues on a 2-device (1, 2, 1) mesh and must
    reproduce the uninterrupted run's steps 3-4 and final params."""
    config, task = reference["config"], reference["task"]
    resumed_dir = str(tmp_path / "resumed")
    shutil.copytree(full_run["workdir"], resumed_dir)
    shutil.rmtree(os.path.join(resumed_dir, "model", "checkpoints", "4"))
    os.remove(os.path.join(resumed_dir, "model", "train_metrics.jsonl"))

    small = make_mesh((1, 2, 1), devices=jax.devices()[:2])
    # The step-2 params read onto the 2-device mesh equal the ones read back unsharded.
    setup = setup_for(config, task, small)
    step, on_small = checkpointing.restore_params(f"{resumed_dir}/model/checkpoints",
                                                  setup.abstract_state["params"])
    _, on_host = checkpointing.restore_params(f"{resumed_dir}/model/checkpoints",
                                              reference["init"]["params"])
    assert step == 2
    for x, y in zip(jax.tree.leaves(on_small), jax.tree.leaves(on_host)):
        assert {d.id for d in x.sharding.device_set} <= {0, 1}
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    resumed = train.train(config, resumed_dir, task.build(config), mesh=small)
    assert resumed["step"] == 4
    np.testing.assert_allclose(_losses(resumed_dir), full_run["losses"][2:], rtol=1e-4)
    for x, y in zip(jax.tree.leaves(resumed["state"]["params"]),
                    jax.tree.leaves(full_run["params"])):
        assert len(x.sharding.device_set) == 2
        # float32 sums in another order on the other mesh, and Adam divides each entry's update
        # by its own gradient scale, so an entry with a near-zero gradient moves by up to ~lr per
        # step on rounding alone (seen at lr 3e-3: 1.3e-6 on an AVX2 CPU at -O0, 3.2e-6 in one
        # entry of 2048 on an AVX-512 one). 1% of lr is still far below what another batch or
        # lost optimizer state would change (O(lr) in most entries: fresh Adam moments make
        # every update ~lr * sign(gradient)).
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4,
                                   atol=1e-2 * config.train.lr)


def test_bad_mesh_configs_name_the_field(reference):
    config, task = reference["config"], reference["task"]
    bad = config.copy_and_resolve_references()
    bad.mesh.update(dict(data=-1, fsdp=3, tensor=1))  # 3 does not divide 8 devices
    with pytest.raises(ValueError, match=r"mesh\.data=-1"):
        train.train(bad, "/nonexistent", task.build(bad))
    bad.mesh.update(dict(data=-1, fsdp=1, tensor=1, dcn_data=2))  # one process, no slices
    with pytest.raises(ValueError, match=r"mesh\.dcn_data=2"):
        train.train(bad, "/nonexistent", task.build(bad))
    bad.mesh.update(dict(data=1, fsdp=1, tensor=3, dcn_data=1))
    with pytest.raises(ValueError, match=r"mesh\.data\*mesh\.fsdp\*mesh\.tensor"):
        train.train(bad, "/nonexistent", task.build(bad))
    # d_model 36 is not divisible by fsdp=8; 2 heads are not divisible by tensor=4.
    wide = tiny_config(model=dict(d_model=36))
    with pytest.raises(ValueError, match=r"dimension 36 .* change mesh\.fsdp"):
        setup_for(wide, task, make_mesh((1, 8, 1)))
    with pytest.raises(ValueError, match=r"dimension 2 .* change mesh\.tensor"):
        setup_for(config, task, make_mesh((2, 1, 4)))


def test_split_cpu_host_before_jax_starts_wins_over_xla_flags():
    """In a fresh process, mesh.cpu_devices decides the CPU device count (XLA_FLAGS asks for 8)."""
    code = ("from mmjax import parallel; parallel.split_cpu_host({n}); import jax; "
            "print(jax.device_count())")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    counts = [subprocess.run([sys.executable, "-c", code.format(n=n)], env=env, check=True,
                             capture_output=True, text=True).stdout.split()[-1] for n in (3, 0)]
    assert counts == ["3", "8"]  # 0 leaves XLA's setting alone


def test_split_cpu_host_after_jax_started_warns_and_keeps_the_devices(caplog):
    before = jax.device_count()
    parallel.split_cpu_host(3)
    assert jax.device_count() == before
    assert any("mesh.cpu_devices=3 not applied" in r.getMessage() for r in caplog.records)
