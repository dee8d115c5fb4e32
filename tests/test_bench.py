"""bench/ scripts stay runnable: each is exercised at a tiny size (numbers are not asserted, only that both
sides did the same work)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_crawl_tiny(ray_local, tmp_path):
    r = _load("bench_crawl").run(max_emoji=30, variants=1, samples_per_shard=50, threads=8, workdir=str(tmp_path))
    assert r["img2dataset"]["ok"] == r["clipforge"]["ok"] == r["rows"] - 4  # 404, opt-out, html, truncated
    assert r["ratio"] > 0
