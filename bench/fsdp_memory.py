"""Per-device bytes of params and optimizer state under FSDP on 1, 2, 4, 8 (simulated) devices.

  python -m bench.fsdp_memory --sizes=demo --planned_sizes=base,300m,1b

Measured (--sizes): the train state is initialised once and placed with the trainer's shardings
on a (1, n, 1) mesh for each n; bytes are summed over each device's addressable shards. Planned
(--planned_sizes): the same shardings applied to the abstract state (shard shapes only, nothing
allocated), for models too large to materialise here. ratio = max over devices / (total / n):
1.0 is perfect ZeRO-3; anything replicated (scalars, tiny vectors whose dims have no fsdp rule)
pushes it above 1. Sets XLA_FLAGS to 8 host devices *before* importing jax (on an accelerator
host the real devices are used). Writes bench/results/fsdp_memory.json.
"""
from __future__ import annotations

import math
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from bench.common import load_config, write_results  # noqa: E402
from bench.train_harness import mesh_from_flag, synthetic_rows  # noqa: E402
from mmjax import parallel, train  # noqa: E402
from mmjax.tasks.multimodal import MultimodalTask  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["demo"], "configs/mot_shapes.py sizes to materialise and measure.")
flags.DEFINE_list("planned_sizes", ["base", "300m", "1b"], "Sizes computed from shard shapes only.")
flags.DEFINE_list("devices", ["1", "2", "4", "8"], "FSDP sizes to compare.")
flags.DEFINE_string("out", None, "Output JSON (default bench/results/fsdp_memory.json).")


def setup_for(config, n: int):
    vocab = int(config.data.sp_vocab_size)
    example = synthetic_rows(config, n, vocab)  # batch only sets shapes; n rows shard over fsdp
    mesh = mesh_from_flag(f"1,{n},1", devices=jax.devices()[:n])
    return train.build_setup(MultimodalTask(config, vocab), example, mesh,
                             parallel.logical_rules())


def measured_bytes(tree) -> tuple[int, int]:
    """(total bytes, max bytes held by one device) of real arrays."""
    per_device: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    total = sum(x.nbytes for x in jax.tree.leaves(tree))
    return total, max(per_device.values())


def planned_bytes(abstract) -> tuple[int, int]:
    """(total bytes, bytes per device) from ShapeDtypeStructs with shardings."""
    total = per = 0
    for leaf in jax.tree.leaves(abstract):
        item = leaf.dtype.itemsize
        total += math.prod(leaf.shape) * item
        per += math.prod(leaf.sharding.shard_shape(leaf.shape)) * item
    return total, per


def row(size: str, n: int, part: str, total: int, per: int, kind: str) -> dict:
    return {"size": size, "fsdp": n, "part": part, "kind": kind, "total_bytes": total,
            "per_device_bytes": per, "ideal_bytes": total / n, "ratio": per / (total / n)}


def main(_):
    ns = [int(n) for n in FLAGS.devices if int(n) <= jax.device_count()]
    rows = []
    for size in FLAGS.sizes:
        config = load_config(f"configs/mot_shapes.py:{size}")
        host_state = None
        for n in ns:
            setup = setup_for(config, n)
            if host_state is None:  # initialise once; other meshes get the same values placed
                with jax.set_mesh(setup.mesh):
                    host_state = jax.device_get(setup.init_fn(jax.random.PRNGKey(0)))
            state = jax.device_put(host_state, setup.state_shardings)
            for part in ("params", "opt_state"):
                rows.append(row(size, n, part, *measured_bytes(state[part]), "measured"))
    for size in FLAGS.planned_sizes:
        config = load_config(f"configs/mot_shapes.py:{size}")
        for n in ns:
            abstract = setup_for(config, n).abstract_state
            for part in ("params", "opt_state"):
                rows.append(row(size, n, part, *planned_bytes(abstract[part]), "planned"))
    print(f"{'size':<6} {'kind':<9} {'part':<9} {'fsdp':>4} {'total MiB':>10} "
          f"{'per-dev MiB':>11} {'ratio':>6}")
    for r in rows:
        print(f"{r['size']:<6} {r['kind']:<9} {r['part']:<9} {r['fsdp']:>4} "
              f"{r['total_bytes'] / 2**20:>10.2f} {r['per_device_bytes'] / 2**20:>11.3f} "
              f"{r['ratio']:>6.3f}")
    write_results("fsdp_memory", {"rows": rows}, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
