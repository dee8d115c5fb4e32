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


def test_bench_index_tiny(tmp_path):
    from helpers import load_bench

    # 12 MB holds IVF-Flat (10.7 MB) but not HNSW32; --flat-max 1000: not Flat, so nprobe is tuned and applied
    r = load_bench("bench_index").run(n=20_000, dim=128, queries=200, budget="12MB", workdir=str(tmp_path),
                                      autofaiss=False, part_rows=6_000, build_args="--flat-max 1000",
                                      http_requests=200, http_concurrency=4, latency_queries=50)
    sides = r["sides"]
    assert [s.get("error") for s in sides.values()] == [None] * 3, sides
    exact, ours, web = sides["exact"], sides["clipforge"], sides["http"]
    assert exact["recall_at_k"] == 1.0 and exact["bytes"] == 20_000 * 128 * 4
    assert ours["factory"] != "Flat" and 0 < ours["bytes"] <= 12_000_000  # within the budget
    assert ours["recall_at_k"] >= 0.9  # tuned by the builder on its own sample, measured on held-out queries
    assert ours["qps_1_thread"] > 0 and ours["p99_ms"] >= ours["p50_ms"] > 0
    # every query once over HTTP: the service answers what the index answers
    assert web["ok"] == web["requests"] == 200 and abs(web["recall_at_k"] - ours["recall_at_k"]) <= 0.01
    assert r["verdict"]["vs_exact"]["result"] in ("PASS", "FAIL") and r["verdict"]["vs_autofaiss"]["result"] == "n/a"


def test_sweep_ivf_lists_tiny(capsys):
    from helpers import load_bench

    assert load_bench("sweep_ivf_lists").main(["--n", "3000", "--dim", "32", "16:8:SQ8", "8:8:none"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "recall=" in ln]
    refined = [ln for ln in lines if ln.lstrip().startswith("16:8:SQ8:scan")]
    assert len(refined) == 2 * 4 and len([ln for ln in lines if ln.lstrip().startswith("8:8:none")]) == 1
    recall = [float(ln.split("recall=")[1].split()[0]) for ln in refined]
    assert all(0 < r <= 1 for r in recall) and recall[-1] >= recall[0]  # nprobe 16 of 16 lists: no worse than 8
