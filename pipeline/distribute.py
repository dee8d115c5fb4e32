"""The pipeline's distributor: a list of tasks run on Ray with backpressure, retries with backoff, a progress line.

    failures = run_tasks(items, submit, cfg, on_result, progress)

- at most `max_in_flight` tasks exist at any time (the driver never floods the scheduler; the default is twice
  what the cluster's CPUs can run at once, read when the run starts);
- a task that raises (the worker's exception, a worker or node that died, a cancelled straggler) is resubmitted
  after `retry_backoff_s * 2**(attempt-1)` seconds, up to `max_retries` times; Ray's own retries are off, so
  every attempt is counted here and lands wherever the scheduler has room (a lost node's work moves on);
- a task running past `task_timeout_s` is cancelled (force) and counts as a failed attempt;
- what still fails comes back with its cause (exception type, message, attempts): never a silent drop.

The driver holds only the item list and the in-flight references, never the data the tasks read or write.
"""
from __future__ import annotations

import heapq
import itertools
import sys
import time
from typing import Any, Callable

from raykit.actors import failure_cause
from raykit.config import DistributeConfig  # noqa: F401 -- defined in raykit, imported from here by the stages


class Progress:
    """The driver's progress line: tasks done / total, rows, success rate, images/s, ETA."""

    def __init__(self, name: str, total_tasks: int, total_rows: int, interval_s: float):
        self.name, self.total_tasks, self.total_rows, self.interval = name, total_tasks, total_rows, interval_s
        self.t0 = self.last = time.monotonic()
        self.tasks = self.rows = self.ok = self.failed = self.retrying = 0

    def add(self, rows: int, ok: int) -> None:
        self.tasks += 1
        self.rows += rows
        self.ok += ok

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.interval or (not force and now - self.last < self.interval):
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        rate, ok_rate = self.ok / dt, self.ok / max(self.rows, 1)
        left = self.total_rows - self.rows
        eta = f"{left / (self.rows / dt):.0f} s" if self.rows else "?"
        print(f"{self.name}: {self.tasks}/{self.total_tasks} shards ({self.failed} failed, {self.retrying} "
              f"retrying) | {self.rows}/{self.total_rows} rows, {ok_rate:.1%} ok | {rate:.1f} images/s | ETA {eta}",
              file=sys.stderr, flush=True)


def run_tasks(items: list, submit: Callable[[Any, int], Any], cfg: DistributeConfig,
              on_result: Callable[[Any, Any], None], progress: Progress | None = None) -> dict:
    """Run every item: submit(item, attempt) -> ObjectRef. -> {item: cause} of the items that failed every attempt."""
    import ray

    limit, seq = cfg.in_flight(), itertools.count()
    todo, retry, failures = list(reversed(items)), [], {}
    flying: dict = {}  # ref -> (item, attempt, started)
    while todo or retry or flying:
        now = time.monotonic()
        while len(flying) < limit and (todo or (retry and retry[0][0] <= now)):
            if retry and retry[0][0] <= now:
                _, _, item, attempt = heapq.heappop(retry)
                if progress:
                    progress.retrying -= 1
            else:
                item, attempt = todo.pop(), 1
            flying[submit(item, attempt)] = (item, attempt, now)
        if not flying:
            time.sleep(min(1.0, max(0.0, retry[0][0] - now)))
            continue
        ready, _ = ray.wait(list(flying), num_returns=1, timeout=1.0)
        for ref in ready:
            item, attempt, _ = flying.pop(ref)
            try:
                on_result(item, ray.get(ref))
            except Exception as e:  # noqa: BLE001 -- the worker's failure, a lost node, a cancelled straggler
                cause = failure_cause(e, attempt)
                if attempt <= cfg.max_shard_retry:
                    delay = cfg.retry_backoff_s * 2 ** (attempt - 1)
                    heapq.heappush(retry, (time.monotonic() + delay, next(seq), item, attempt + 1))
                    print(f"distribute: {item!r} attempt {attempt} failed ({cause['type']}: {cause['error']}); "
                          f"retrying in {delay:.1f} s", file=sys.stderr, flush=True)
                    if progress:
                        progress.retrying += 1
                else:
                    failures[item] = cause
                    if progress:
                        progress.failed += 1
        _cancel_stragglers(flying, cfg.task_timeout_s)
        if progress:
            progress.tick()
    if progress:
        progress.tick(force=True)
    return failures


def _cancel_stragglers(flying: dict, timeout_s: float) -> None:
    import ray

    now = time.monotonic()
    for ref, (item, attempt, started) in list(flying.items()):
        if now - started > timeout_s:
            ray.cancel(ref, force=True)
            flying[ref] = (item, attempt, float("inf"))  # cancelled once; its error arrives through ray.wait
