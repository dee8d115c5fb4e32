"""What the pipeline stages share beyond the on-disk contracts (trainer.clip.formats): joining or starting Ray
(raykit.cluster.init_ray, re-exported here), DuckDB connections that spill to disk, the Ray node id."""

from __future__ import annotations

import os

from raykit.cluster import init_ray  # noqa: F401 -- the stages' (and the tests') import path for it


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
