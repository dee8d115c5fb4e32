"""indexing/coalesce.py: concurrent searches batched into one, with each caller's own exact answer."""
from __future__ import annotations

import threading
import time

import faiss
import numpy as np
import pytest

from indexing.coalesce import Coalescer


def _flat(n: int = 500, d: int = 16, seed: int = 0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    index = faiss.IndexFlatIP(d)
    index.add(x)
    return index, x


class Slow:
    """A search function that takes `delay` seconds per call and records the batch sizes it was given."""

    def __init__(self, index, delay: float = 0.02, fail_on: int = -1):
        self.index, self.delay, self.fail_on, self.sizes = index, delay, fail_on, []

    def __call__(self, x, k):
        self.sizes.append(len(x))
        time.sleep(self.delay)
        if self.fail_on >= 0 and len(self.sizes) == self.fail_on:
            raise RuntimeError("faiss fell over")
        return self.index.search(x, k)


def _together(fn, args: list) -> list:
    """fn(*a) for every a, each in its own thread, all released at once -> results (or exceptions) in order."""
    out, gate = [None] * len(args), threading.Barrier(len(args))

    def work(j):
        gate.wait()
        try:
            out[j] = fn(*args[j])
        except Exception as e:  # noqa: BLE001 -- the test looks at it
            out[j] = e

    threads = [threading.Thread(target=work, args=(j,)) for j in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    return out


def test_concurrent_callers_get_their_own_exact_answers_in_fewer_batches():
    index, _ = _flat()
    q = np.random.default_rng(1).standard_normal((40, 16)).astype(np.float32)
    slow = Slow(index)
    c = Coalescer(slow, max_batch=256)
    ks = [1 + j % 7 for j in range(len(q))]
    got = _together(c.search, [(q[j:j + 1], ks[j]) for j in range(len(q))])
    for j, (scores, ids) in enumerate(got):
        want_s, want_i = index.search(q[j:j + 1], ks[j])
        assert ids.shape == (1, ks[j]) and np.array_equal(ids, want_i)
        np.testing.assert_allclose(scores, want_s, rtol=1e-5)
    assert c.queries == len(q) == sum(slow.sizes)
    assert c.batches == len(slow.sizes) < len(q) // 4  # 40 callers, a 20 ms search: batched, not one by one
    assert max(slow.sizes) > 1


def test_a_lone_query_is_searched_at_once_and_multi_row_asks_stay_whole():
    index, _ = _flat()
    slow = Slow(index, delay=0.0)
    c = Coalescer(slow)
    q = np.random.default_rng(2).standard_normal((5, 16)).astype(np.float32)
    t0 = time.perf_counter()
    scores, ids = c.search(q, 3)
    assert time.perf_counter() - t0 < 1.0 and slow.sizes == [5]
    assert np.array_equal(ids, index.search(q, 3)[1])


def test_max_batch_bounds_every_batch():
    index, _ = _flat()
    slow = Slow(index)
    c = Coalescer(slow, max_batch=4)
    q = np.random.default_rng(3).standard_normal((30, 16)).astype(np.float32)
    got = _together(c.search, [(q[j:j + 1], 5) for j in range(len(q))])
    assert max(slow.sizes) <= 4 and sum(slow.sizes) == 30
    assert all(np.array_equal(g[1], index.search(q[j:j + 1], 5)[1]) for j, g in enumerate(got))


def test_an_error_reaches_every_caller_of_its_batch_and_the_next_batches_still_run():
    index, _ = _flat()
    slow = Slow(index, fail_on=1)
    c = Coalescer(slow)
    q = np.random.default_rng(4).standard_normal((12, 16)).astype(np.float32)
    got = _together(c.search, [(q[j:j + 1], 2) for j in range(len(q))])
    failed = [g for g in got if isinstance(g, RuntimeError)]
    assert len(failed) == slow.sizes[0] >= 1  # exactly the first batch's callers
    assert all(isinstance(g, tuple) for g in got if not isinstance(g, RuntimeError))
    assert np.array_equal(c.search(q[:1], 2)[1], index.search(q[:1], 2)[1])


def test_bad_max_batch_is_refused():
    with pytest.raises(ValueError, match="max_batch"):
        Coalescer(lambda x, k: (x, x), max_batch=0)
