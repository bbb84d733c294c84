"""The environment of a process a test starts (`mmjax.main`, a bench, a worker, a kernel).

Why one home: conftest.py gives the test processes 8 simulated CPU devices through XLA_FLAGS,
which a child must not inherit (smoke batches do not split 8 ways, and `mesh.cpu_devices` or the
child's own flags choose its count), while the other flags conftest sets (the fast-compile
optimisation level) and the shared compilation cache should reach every child.
"""
import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def xla_flags_without_device_count(flags: str) -> str:
    """`flags` minus any forced host device count."""
    return " ".join(f for f in flags.split() if not f.startswith(DEVICE_COUNT_FLAG))


def xla_flags_with_device_count(flags: str, count: int) -> str:
    """`flags` with exactly `count` forced host devices (a worker that needs its own count)."""
    return f"{xla_flags_without_device_count(flags)} {DEVICE_COUNT_FLAG}={count}".strip()


def child_env(*, drop_prefixes: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """os.environ for a child process: XLA_FLAGS without the device count, no variable starting
    with one of `drop_prefixes`, then `extra` set."""
    env = {k: v for k, v in os.environ.items() if not (drop_prefixes and k.startswith(drop_prefixes))}
    env["XLA_FLAGS"] = xla_flags_without_device_count(env.get("XLA_FLAGS", ""))
    env.update(extra)
    return env
