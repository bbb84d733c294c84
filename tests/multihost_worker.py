"""One process of the two-process CPU test (run by tests/test_multihost.py, not by pytest).

argv: coordinator_address num_processes process_id workdir
Trains the toy task of tests/test_train.py for a few steps under jax.distributed and prints the
losses as JSON on the last line.
"""
import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(__file__))
from child_env import xla_flags_with_device_count  # noqa: E402

# 2 device(s), after the flags the test passed on (child_env: no count of its own)
os.environ["XLA_FLAGS"] = xla_flags_with_device_count(os.environ.get("XLA_FLAGS", ""), 2)

import jax  # noqa: E402

from mmjax import parallel, train  # noqa: E402


def main():
    coordinator, nproc, pid, workdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if nproc > 1:
        parallel.initialize_distributed(coordinator, nproc, pid)
    from test_train import ToyTask, toy_config, losses  # noqa: E402
    config = toy_config(steps=5)
    config.mesh.data = -1
    train.train(config, workdir, ToyTask().build(config))
    if jax.process_index() == 0:
        print(json.dumps(losses(workdir)))


if __name__ == "__main__":
    main()
