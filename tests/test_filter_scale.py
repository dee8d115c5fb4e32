"""The filter at scale: a synthetic crawl of 5M metadata rows filtered on this machine (language ID, rules, exact
dedup, metadata balancing) with the peak RSS of the whole process tree (driver, Ray, workers) under 4 GB.
bench/bench_filter.py runs the same thing and reports the time per million rows (docs/benchmarks.md)."""
import pytest

from helpers import load_bench

pytestmark = pytest.mark.slow


def test_five_million_rows_in_bounded_memory(tmp_path):
    r = load_bench("bench_filter").scale(5_000_000, tmp_path, memory_limit="1GB")
    print(r)
    assert r["rows"] == 5_000_000
    assert r["kept"] + sum(r["dropped"].values()) == 5_000_000  # every row decided, none lost
    assert r["dropped"]["duplicate_image"] > 0 and r["dropped"]["duplicate_pair"] > 0
    assert r["dropped"]["language"] > 0 and r["dropped"]["balanced_out"] > 0
    assert r["peak_rss_tree_mb"] < 4096, r  # the bound, for driver + Ray + workers together
