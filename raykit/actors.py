"""A pool of stateful Ray actors (one loaded model each) that runs a list of jobs: what the CLIP-score step and
`clipforge embed` share. Reads and writes nothing itself: the actors do, the driver sees small per-job results.

    results, failed = run_actors(Worker, (cfg, sha), jobs, dist, method="embed", args=(out_dir,),
                                 n_actors=n, gpu=gpu, cpus_per_actor=1.0, name="embed", label=lambda j: j.id)

calls `actor.embed(*args, job, attempt)` for every job, with
- `per_actor` calls queued per actor at most (one running, one waiting behind it: the actor never idles between
  jobs, and the driver never floods the scheduler);
- a job whose actor raised or died is retried after `retry_backoff_s * 2**(attempt-1)` s, up to
  `max_shard_retry` times (Ray's own retries are off: every attempt is counted here); a dead actor is replaced
  (the other calls queued on it fail with it and are retried too);
- an actor whose running call passes `task_timeout_s` is killed (its calls are then retried elsewhere);
- a job that failed every attempt comes back in `failed` with its cause (type, message, attempts): never raised.

`actor_plan` sizes the pool from the cluster's resources: one GPU per actor when the cluster has GPUs, else the
CPUs / cpus_per_actor. The loop is Ray's `wait` over the in-flight refs; ray is imported only inside functions.
"""
from __future__ import annotations

import contextlib
import heapq
import itertools
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from raykit.config import DistributeConfig

PER_ACTOR = 2  # calls in flight per actor: one running, one queued behind it
DEVICES = ("auto", "cpu", "cuda")


def failure_cause(e: BaseException, attempt: int) -> dict:
    """{"type", "error" (the last line of the message, 500 chars at most), "attempts"} of a failed attempt; a
    RayTaskError's cause (the worker's own exception) when it has one."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip()
    return {"type": type(cause).__name__, "error": text.splitlines()[-1][:500] if text else "", "attempts": attempt}


@dataclass
class _Slot:
    actor: Any
    gen: int = 0
    queue: list = field(default_factory=list)  # refs in submission order (an actor runs them in that order)
    head_since: float = 0.0  # when the first ref of the queue started running


class ActorPool:
    """`n` actors made by make(); submit(i, job, attempt) calls actor i's `method(*args, job, attempt)`."""

    def __init__(self, make: Callable[[], Any], n: int, method: str, args: tuple = (), per_actor: int = PER_ACTOR,
                 name: str = "raykit"):
        self.make, self.method, self.args, self.per_actor, self.name = make, method, tuple(args), per_actor, name
        self.slots, self.flying = [_Slot(make()) for _ in range(n)], {}

    def free(self) -> int | None:
        """The least busy actor with room for one more call, else None."""
        i = min(range(len(self.slots)), key=lambda s: len(self.slots[s].queue))
        return i if len(self.slots[i].queue) < self.per_actor else None

    def submit(self, i: int, job, attempt: int) -> None:
        slot = self.slots[i]
        ref = getattr(slot.actor, self.method).remote(*self.args, job, attempt)
        self.flying[ref] = (i, slot.gen, job, attempt)
        slot.queue.append(ref)
        if len(slot.queue) == 1:
            slot.head_since = time.monotonic()

    def finished(self, ref) -> tuple[int, int, Any, int]:
        """Forget a ref that completed (or failed). -> (slot, actor generation, job, attempt)."""
        i, gen, job, attempt = self.flying.pop(ref)
        slot = self.slots[i]
        if slot.gen == gen and ref in slot.queue:
            was_head = slot.queue[0] == ref
            slot.queue.remove(ref)
            if was_head:
                slot.head_since = time.monotonic()
        return i, gen, job, attempt

    def replace(self, i: int, gen: int) -> None:
        """A fresh actor in slot i, unless that happened already since generation `gen` died."""
        import ray

        slot = self.slots[i]
        if slot.gen != gen:
            return
        with contextlib.suppress(Exception):
            ray.kill(slot.actor, no_restart=True)
        self.slots[i] = _Slot(self.make(), gen + 1)  # the old calls still in flight fail and are retried

    def kill_stragglers(self, timeout_s: float) -> None:
        import ray

        now = time.monotonic()
        for i, slot in enumerate(self.slots):
            if slot.queue and now - slot.head_since > timeout_s:
                print(f"{self.name}: actor {i} ran one part for over {timeout_s:.0f} s; killing it", file=sys.stderr,
                      flush=True)
                with contextlib.suppress(Exception):
                    ray.kill(slot.actor, no_restart=True)
                slot.head_since = float("inf")  # its calls now fail with RayActorError and are retried

    def close(self) -> None:
        import ray

        for slot in self.slots:
            with contextlib.suppress(Exception):
                ray.kill(slot.actor, no_restart=True)


class Progress:
    """The driver's progress line: parts done / total, failed, retrying, and the work the results count."""

    def __init__(self, name: str, total: int, interval_s: float, unit: str = "images", verb: str = "done"):
        self.name, self.total, self.interval, self.unit, self.verb = name, total, interval_s, unit, verb
        self.t0 = self.last = time.monotonic()
        self.done = self.failed = self.retrying = self.items = 0

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.interval or (not force and now - self.last < self.interval):
            return
        self.last = now
        rate = self.items / max(now - self.t0, 1e-9)
        print(f"{self.name}: {self.done}/{self.total} parts ({self.failed} failed, {self.retrying} retrying) | "
              f"{self.items} {self.unit} {self.verb} | {rate:.1f} {self.unit}/s", file=sys.stderr, flush=True)


def _submit_ready(pool: ActorPool, todo: deque, retry: list, progress: Progress) -> None:
    now = time.monotonic()
    while (todo or (retry and retry[0][0] <= now)) and (i := pool.free()) is not None:
        if retry and retry[0][0] <= now:
            _, _, job, attempt = heapq.heappop(retry)
            progress.retrying -= 1
        else:
            job, attempt = todo.popleft(), 1
        pool.submit(i, job, attempt)


def drive(pool: ActorPool, jobs: list, dist: DistributeConfig, label: Callable[[Any], Any],
          count: Callable[[dict], int] = lambda r: 0, progress: Progress | None = None) -> tuple[dict, dict]:
    """Run every job on the pool. -> ({label: result}, {label: cause of the last failed attempt}).
    count(result): the work a result did, for the progress line."""
    import ray
    from ray.exceptions import RayActorError

    todo, retry, seq, results, failed = deque(jobs), [], itertools.count(), {}, {}
    progress = progress or Progress(pool.name, len(jobs), dist.progress_interval_s)
    while todo or retry or pool.flying:
        _submit_ready(pool, todo, retry, progress)
        if not pool.flying:
            time.sleep(min(1.0, max(0.0, retry[0][0] - time.monotonic())))
            continue
        ready, _ = ray.wait(list(pool.flying), num_returns=1, timeout=1.0)
        for ref in ready:
            i, gen, job, attempt = pool.finished(ref)
            try:
                results[label(job)] = r = ray.get(ref)
                progress.done += 1
                progress.items += count(r)
                continue
            except RayActorError as e:  # the actor died (crash, OOM kill, lost node, killed as a straggler)
                pool.replace(i, gen)
                cause = failure_cause(e, attempt)
            except Exception as e:  # noqa: BLE001 -- the actor raised: bad input, a full disk, ...
                cause = failure_cause(e, attempt)
            if attempt <= dist.max_shard_retry:
                delay = dist.retry_backoff_s * 2 ** (attempt - 1)
                heapq.heappush(retry, (time.monotonic() + delay, next(seq), job, attempt + 1))
                progress.retrying += 1
                print(f"{pool.name}: part {label(job)} attempt {attempt} failed ({cause['type']}: "
                      f"{cause['error']}); retrying in {delay:.1f} s", file=sys.stderr, flush=True)
            else:
                failed[label(job)] = cause
                progress.failed += 1
        pool.kill_stragglers(dist.task_timeout_s)
        progress.tick()
    progress.tick(force=True)
    return results, failed


def actor_plan(n_jobs: int, actors: int = 0, cpus_per_actor: float = 1.0, device: str = "auto",
               flags: str = "--", name: str = "raykit") -> tuple[int, bool]:
    """-> (number of actors, whether each takes a GPU), from the cluster's resources. `actors` 0: as many as fit
    (one per GPU, else CPUs // cpus_per_actor); never more than fit nor than jobs. `flags`: the prefix of the
    caller's option names in messages ("--clip-" -> --clip-device). ValueError for device cuda without GPUs."""
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0)) if device != "cpu" else 0
    if device == "cuda" and not gpus:
        raise ValueError(f"{flags}device cuda: the Ray cluster has no GPUs")
    fit = max(1, int(res.get("CPU", 1) // cpus_per_actor))
    fit = min(fit, gpus) if gpus else fit
    n = actors or fit
    if n > fit:
        print(f"{name}: {flags}actors {n} > the {fit} the cluster can hold at once; using {fit}",
              file=sys.stderr, flush=True)
        n = fit
    return max(1, min(n, n_jobs)), bool(gpus)


def run_actors(cls: type, ctor_args: tuple, jobs: list, dist: DistributeConfig, *, method: str, n_actors: int,
               gpu: bool, cpus_per_actor: float, label: Callable[[Any], Any], args: tuple = (), name: str = "raykit",
               count: Callable[[dict], int] = lambda r: 0, unit: str = "images", verb: str = "done",
               runtime_env: dict | None = None) -> tuple[dict, dict]:
    """Start `n_actors` actors cls(*ctor_args) (1 GPU each if `gpu`, else `cpus_per_actor` CPUs), run every job
    on them (see drive), kill them. -> ({label: result}, {label: cause})."""
    import ray

    if not jobs:
        return {}, {}
    remote = ray.remote(cls).options(num_cpus=cpus_per_actor, num_gpus=1 if gpu else 0, max_restarts=0,
                                     max_concurrency=1, runtime_env=runtime_env)
    pool = ActorPool(lambda: remote.remote(*ctor_args), n_actors, method, args, name=name)
    try:
        return drive(pool, jobs, dist, label, count, Progress(name, len(jobs), dist.progress_interval_s, unit, verb))
    finally:
        pool.close()
