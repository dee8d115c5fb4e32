"""What the pipeline stages share beyond the on-disk contracts (trainer.clip.formats): joining or starting Ray."""

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


def sql_str(value) -> str:
    """A value (a path) as a DuckDB string literal."""
    return "'" + str(value).replace("'", "''") + "'"


def duckdb_connect(database: str = ":memory:", memory_limit: str = "2GB", temp_dir: str | None = None,
                   threads: int | None = None):
    """A DuckDB connection that spills to `temp_dir` beyond `memory_limit` (the pipeline's out-of-core engine)."""
    import duckdb

    con = duckdb.connect(database)
    con.execute(f"SET memory_limit = {sql_str(memory_limit)}")
    con.execute("SET preserve_insertion_order = false")
    if temp_dir:
        os.makedirs(temp_dir, exist_ok=True)
        con.execute(f"SET temp_directory = {sql_str(temp_dir)}")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    return con


def ray_node_id() -> str:
    """The Ray node the calling task runs on ("" outside Ray): what the stages record per shard."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
