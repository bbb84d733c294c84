"""Device mesh, logical-axis rules and multi-host start-up.

Why one table: every parameter and activation carries logical axis names (`embed`, `mlp`, `heads`,
...). Placement is decided only here, by mapping those names onto the mesh axes
`(data, fsdp, tensor)`. Data parallel, FSDP (ZeRO-3: params and optimizer state sharded over
`fsdp`) and tensor parallel (heads / mlp split over `tensor`) are therefore config choices, never
code changes, and a 1-device run goes through the very same path.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmjax.errors import InputError

MESH_AXES = ("data", "fsdp", "tensor")

# Priority-ordered: flax assigns a rule only while its mesh axes are still free in that array, so
# activations named ("batch", "length", "embed") shard the batch over (data, fsdp) and leave
# `embed` whole, while parameters with an `embed` dimension are sharded over `fsdp` (ZeRO-3).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("flow_mlp", "tensor"),
    ("embed", "fsdp"),
    # The flow head's residual width: without it the whole head (AdaLN modulations, MLPs) would
    # stay replicated under FSDP, a large share of small models' params and optimizer state.
    ("flow_embed", "fsdp"),
    ("kv", None),
    ("modality", None),
    ("code", None),
    ("codebook", None),  # VQ tokenizer codebook rows (small; replicated)
    ("image_grid", None),  # rows / columns of the learned 2-D image position tables (small)
    ("conv_h", None),
    ("conv_w", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
)


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """Turns the config's axis sizes (-1 = 'the rest') into concrete sizes, or says which is wrong."""
    sizes = {name: int(mesh_cfg[name]) for name in MESH_AXES}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise InputError(f"mesh.{name}={size}: axis sizes must be positive or -1 (the rest).")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise InputError(f"mesh: only one axis may be -1, got {', '.join('mesh.' + f for f in free)}.")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise InputError(
                f"mesh.{free[0]}=-1: the other axes multiply to {fixed}, which does not divide "
                f"the {num_devices} devices.")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise InputError(
            f"mesh.data*mesh.fsdp*mesh.tensor = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']} "
            f"= {math.prod(sizes.values())}, but there are {num_devices} devices.")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def create_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh; topology-aware on TPU/GPU, multi-slice over DCN."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    dcn_data = int(mesh_cfg.get("dcn_data", 1))
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if dcn_data > 1 or num_slices > 1:
        if shape[0] % dcn_data:
            raise InputError(f"mesh.dcn_data={dcn_data} must divide mesh.data={shape[0]}.")
        ici = (shape[0] // dcn_data, shape[1], shape[2])
        # TPU slices carry `slice_index`; elsewhere (multi-node GPU) each process is a granule.
        granules = {} if hasattr(devices[0], "slice_index") else {"process_is_granule": True}
        try:
            array = mesh_utils.create_hybrid_device_mesh(ici, (dcn_data, 1, 1), devices=devices,
                                                         **granules)
        except ValueError as e:
            raise InputError(f"mesh.dcn_data={dcn_data}: cannot split the data axis over "
                             f"{dcn_data} slices/processes of these devices ({e}).") from e
    else:
        try:
            array = mesh_utils.create_device_mesh(shape, devices=devices)
        except (ValueError, NotImplementedError, AssertionError):
            array = np.asarray(devices).reshape(shape)
    return Mesh(array, MESH_AXES)


def logical_rules(extra: Sequence[tuple[str, Any]] = ()) -> tuple[tuple[str, Any], ...]:
    """The rules table, with optional user overrides taking priority."""
    return tuple(extra) + LOGICAL_RULES


def logical_to_sharding(logical_specs, mesh: Mesh, rules=None):
    """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules or LOGICAL_RULES)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_divisible(shapes_and_specs, mesh: Mesh, what: str) -> None:
    """Raises a clear error when an array dimension is not divisible by its mesh axes."""
    flat_shapes = jax.tree.leaves(shapes_and_specs[0])
    flat_specs = jax.tree.leaves(shapes_and_specs[1], is_leaf=lambda x: isinstance(x, P))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes_and_specs[0])[0]]
    for path, shape, spec in zip(paths, flat_shapes, flat_specs):
        for dim, axes in zip(shape.shape, spec):
            if axes is None:
                continue
            axes = axes if isinstance(axes, tuple) else (axes,)
            size = math.prod(mesh.shape[a] for a in axes)
            if dim % size:
                raise InputError(
                    f"{what}{path}: dimension {dim} is not divisible by mesh axes {axes} of size "
                    f"{size}; change mesh.{axes[0]} or the model size.")


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles this process's part of the global batch into globally sharded arrays."""
    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
    return {k: put(v) for k, v in batch.items() if np.asarray(v).dtype != object}


def split_cpu_host(num_devices: int) -> None:
    """Splits a CPU host into `num_devices` XLA devices (jax_num_cpu_devices), so the mesh's data
    axis runs over cores.

    Why: one XLA CPU device spreads an op over cores with its intra-op thread pool, which small
    convolutions use poorly (the demo's FSQ tokenizer: 1.17x from a second core); as data
    parallel over 2 devices its step runs 1.45x faster on 2 cores, while the transformer runs
    at the same speed either way (bench/results/cpu_devices.json). Only the CPU backend reads the
    setting, so accelerator runs ignore it. It must be set before JAX starts its backends: when
    they are running already (a notebook that used JAX) the run goes on with the devices it has.
    0 keeps XLA's default (one device, or XLA_FLAGS' --xla_force_host_platform_device_count).
    """
    if num_devices <= 0:
        return
    try:
        jax.config.update("jax_num_cpu_devices", num_devices)
    except RuntimeError as e:  # backends already initialized
        logging.warning("mesh.cpu_devices=%d not applied (%s); going on with %d CPU device(s)",
                        num_devices, str(e).split(" i.e.")[0], len(jax.devices("cpu")))


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
    """Starts JAX's multi-host runtime when asked to (flags, env, or a cluster JAX detects).

    Explicit values win; otherwise MMJAX_COORDINATOR / MMJAX_NUM_PROCESSES / MMJAX_PROCESS_ID;
    otherwise, on a TPU pod or under SLURM, `jax.distributed.initialize()` auto-detects the rest.
    """
    coordinator_address = coordinator_address or os.environ.get("MMJAX_COORDINATOR", "")
    num_processes = num_processes or int(os.environ.get("MMJAX_NUM_PROCESSES", "0") or 0)
    if process_id < 0:
        process_id = int(os.environ.get("MMJAX_PROCESS_ID", "-1") or -1)
    auto = os.environ.get("MMJAX_DISTRIBUTED_AUTO", "") == "1"
    if coordinator_address:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise InputError(
                f"--num_processes={num_processes} / --process_id={process_id} are invalid for "
                f"coordinator {coordinator_address} (need 0 <= process_id < num_processes).")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif auto:
        jax.distributed.initialize()
    else:
        return
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    meet_other_processes()


def meet_other_processes() -> None:
    """One collective over every device, right after the processes have connected.

    Why now: on CPU, Gloo builds its cross-process context at the first collective and gives each
    process 30 s to join it (a fixed key-value timeout). When that first collective came later
    (orbax's barrier as the checkpoint manager starts), one process compiling on a loaded 2-core
    host reached it more than 30 s after the other and the job failed (`GetKeyValue() timed out
    with key: cpu:gloo/...`). Just after `jax.distributed.initialize`, which waits for every
    process, they are in step. Elsewhere it is a cheap barrier.
    """
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("mmjax_processes_connected")
