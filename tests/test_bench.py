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


def test_bench_crawl_tiny(tmp_path):
    r = _load("bench_crawl").run(n_urls=200, runs=1, slow=0.01, failing=0.05, workdir=str(tmp_path))
    ok = r["kinds"]["ok"] + r["kinds"]["slow"]
    assert r["img2dataset"]["images"] == r["clipforge"]["images"] == ok  # the same list, the same successes
    assert r["ratio"] > 0 and r["clipforge"]["peak_rss_mb"] > 0


def test_bench_filter_tiny(tmp_path):
    r = _load("bench_filter").run(rows=20_000, images=120, clip_images=16, workdir=str(tmp_path), per_shard=5_000)
    s, f = r["scale"], r["floor"]
    assert s["kept"] + sum(s["dropped"].values()) == 20_000 and s["peak_rss_tree_mb"] > 0
    assert f["kept"] == 120 and f["floor_over_stages"] > 0  # distinct images, all kept and sharded
    assert r["clip"]["images"] == 16 and r["clip"]["images_per_s"] > 0
