"""Request coalescing: concurrent searches of one index run as one batched search.

A service answers one query per request, but a FAISS search of a batch costs far less per query than the same
queries one at a time (the coarse quantizer and the refine become matrix products, OpenMP splits the batch across
cores, and concurrent single-query searches stop fighting over the same cores). `Coalescer.search` is called from
many threads at once: while one batch is being searched, the queries that arrive wait, and the next batch takes all
of them (up to `max_batch`). Nothing waits on a timer: a lone query is searched at once, so an idle service answers
as fast as without coalescing, and a loaded one batches as deep as its load.

Reads and writes nothing; results are exactly those of searching each query alone (a batch of rows of different k
is searched at the largest k and cut; FAISS returns each row's top k in order, whatever the batch).
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclass
class _Ask:
    x: np.ndarray                     # [q, D] float32
    k: int
    done: bool = False
    scores: np.ndarray | None = None
    ids: np.ndarray | None = None
    error: BaseException | None = None


class Coalescer:
    """Runs `search(x [n, D], k) -> (scores [n, k], ids [n, k])` for many threads, one batch at a time."""

    def __init__(self, search: SearchFn, max_batch: int = 256):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._search, self.max_batch = search, max_batch
        self._cond = threading.Condition()
        self._queue: list[_Ask] = []
        self._busy = False
        self.batches = 0   # searches run, and the queries they held (mean batch: queries / batches)
        self.queries = 0

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of x [q, D] at k, as `search(x, k)` would give them; its exceptions are re-raised here."""
        ask = _Ask(np.ascontiguousarray(x, np.float32), int(k))
        with self._cond:
            self._queue.append(ask)
            while not ask.done:
                if self._busy or not self._queue:
                    self._cond.wait()  # a batch is being searched; it or the next one holds this ask
                    continue
                batch = self._take()
                self._cond.release()
                try:
                    self._run(batch)
                finally:
                    self._cond.acquire()
                    self._finish(batch)
        if ask.error is not None:
            raise ask.error
        return ask.scores, ask.ids

    def _take(self) -> list[_Ask]:
        """The queue's head, up to max_batch rows (always at least one ask); under the lock."""
        batch, rows = [], 0
        while self._queue and (not batch or rows + len(self._queue[0].x) <= self.max_batch):
            batch.append(self._queue.pop(0))
            rows += len(batch[-1].x)
        self._busy = True
        return batch

    def _run(self, batch: list[_Ask]) -> None:
        """One search for the batch (outside the lock); an error goes to every ask of it, none hangs."""
        try:
            k = max(a.k for a in batch)
            scores, ids = self._search(np.concatenate([a.x for a in batch]), k)
            at = 0
            for a in batch:
                a.scores, a.ids = scores[at:at + len(a.x), :a.k], ids[at:at + len(a.x), :a.k]
                at += len(a.x)
        except BaseException as e:  # noqa: BLE001 -- re-raised in each caller's own thread
            for a in batch:
                a.error = e

    def _finish(self, batch: list[_Ask]) -> None:
        """Under the lock: the batch's asks are answered, the next waiting thread may search."""
        self._busy = False
        self.batches += 1
        self.queries += sum(len(a.x) for a in batch)
        for a in batch:
            a.done = True
        self._cond.notify_all()
