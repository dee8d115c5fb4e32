"""DistributeConfig: how a stage's jobs are spread over the Ray cluster (retries, backoff, timeouts, progress,
the cluster's address). A config section (trainer.clip.flags), shared by the task runner
(pipeline.distribute.run_tasks) and the actor pools (raykit.actors). Reads and writes nothing."""
from __future__ import annotations

from dataclasses import dataclass

from trainer.clip.flags import opt


@dataclass
class DistributeConfig:
    """How shard tasks are spread over the Ray cluster."""
    max_in_flight: int = opt(0, help="tasks submitted at once (0: 2 x the cluster's CPUs / --cpus-per-task)")
    cpus_per_task: float = opt(1.0, help="Ray CPUs reserved per shard task")
    max_shard_retry: int = opt(2, help="extra attempts for a shard whose task failed (worker error, lost node)")
    retry_backoff_s: float = opt(2.0, help="delay before a shard's first retry; doubles per attempt")
    task_timeout_s: float = opt(3600.0, help="a shard task running longer is cancelled and retried")
    progress_interval_s: float = opt(10.0, help="seconds between progress lines (0: none)")
    ray_address: str | None = opt(None, help="Ray cluster to join (default: $RAY_ADDRESS, else a local "
                                             "in-process Ray on 127.0.0.1)")

    def __post_init__(self):
        if self.max_in_flight < 0 or self.cpus_per_task <= 0 or self.max_shard_retry < 0:
            raise ValueError("--max-in-flight must be >= 0, --cpus-per-task > 0, --max-shard-retry >= 0")
        if self.retry_backoff_s < 0 or self.task_timeout_s <= 0:
            raise ValueError("--retry-backoff-s must be >= 0 and --task-timeout-s > 0")

    def in_flight(self) -> int:
        import ray

        if self.max_in_flight:
            return self.max_in_flight
        cpus = ray.cluster_resources().get("CPU", 1)
        return max(1, int(2 * cpus / self.cpus_per_task))
