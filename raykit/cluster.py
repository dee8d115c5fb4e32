"""Joining or starting Ray: what every Ray-driven stage does first. Reads $RAY_ADDRESS; writes nothing."""
from __future__ import annotations

import os


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Join the cluster at `address` (or $RAY_ADDRESS, as inside `ray job submit`), else start a local
    in-process Ray bound to 127.0.0.1. Idempotent: reuses an already initialised Ray."""
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1", configure_logging=False)
    return ray
