"""bench/bench_train_gpu.py stays runnable without a GPU: the whole benchmark at the tiny preset on CPU (both sides,
real DeepSpeed engine and real open_clip model), and the largest-batch search logic against a fake memory limit."""

import math

import pytest

from helpers import load_bench



def _load():
    return load_bench("bench_train_gpu")


def test_bench_train_tiny_cpu(tmp_path):
    pytest.importorskip("deepspeed")
    pytest.importorskip("open_clip")
    bench = _load()
    out = tmp_path / "bench_train.json"
    r = bench.run(["tiny"], batch=8, steps=2, device="cpu", warmup=1, max_batch=False, out=str(out))
    assert out.exists()
    assert r["precision"] == "fp32" and not r["errors"]
    rows = {row["side"]: row for row in r["throughput"]}
    assert set(rows) == {"clipforge", "open_clip"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["finite"] and row["batch"] == 8 and row["steps"] == 2
        for key in ("samples_per_s", "step_s", "mfu", "hfu", "loss_last"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["hfu"] > row["mfu"]  # the recompute counts as hardware FLOPs only
    assert r["summary"]["tiny"]["samples_per_s_ratio"] > 0


def test_flops_per_sample_vit_b():
    bench = _load()
    f32, f16 = bench.flops_per_sample("ViT-B-32", 256), bench.flops_per_sample("ViT-B-16", 256)
    assert 40e9 < f32["model"] < 50e9 and 115e9 < f16["model"] < 130e9  # ~44 and ~123 GFLOP/sample
    assert f16["hardware"] / f16["model"] == pytest.approx(4 / 3, rel=0.01)


def test_max_batch_search_against_fake_limit():
    bench = _load()
    seen = []

    def fake_try(limit):
        def try_fn(b):
            seen.append(b)
            return {"ok": True, "wall_s": 0.0, "last_step_s": 1.0} if b <= limit else {"ok": False, "oom": True}
        return try_fn

    r = bench.search_max_batch(fake_try(5000), known_ok=256, start=2048, cap=32768, deadline=math.inf)
    assert r["stopped_by"] == "converged" and r["first_oom"] > 5000 >= r["max_batch"] >= 5000 * 15 / 16
    assert seen[:3] == [2048, 4096, 8192] and all(b % 64 == 0 for b in seen)
    r = bench.search_max_batch(fake_try(10**9), known_ok=8, start=16, cap=64, deadline=math.inf)
    assert (r["max_batch"], r["capped"], r["first_oom"]) == (64, True, None)
    r = bench.search_max_batch(fake_try(100), known_ok=8, start=512, cap=4096, deadline=math.inf, granule=8)
    assert r["stopped_by"] == "converged" and 100 >= r["max_batch"] >= 88  # bisects below the start too
    r = bench.search_max_batch(lambda b: {"ok": False, "oom": False, "error": "boom"}, known_ok=8, start=16,
                               cap=64, deadline=math.inf)
    assert (r["max_batch"], r["stopped_by"]) == (8, "error")
    r = bench.search_max_batch(fake_try(10**9), known_ok=8, start=16, cap=64, deadline=0.0)
    assert (r["max_batch"], r["stopped_by"], r["tries"]) == (8, "time budget", [])


def test_bench_train_variant_sides_tiny_cpu():
    """The large-batch clipforge side (--offload-activations --checkpoint-chunks 16) and the fast ones
    (--checkpoint-policy selective, with and without --compile) run through the same bench, with their own
    summary keys."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("open_clip")
    sides = ("open_clip", "clipforge_offload", "clipforge_group", "clipforge_selective", "clipforge_selective_compile")
    r = _load().run(["tiny"], batch=16, steps=1, device="cpu", warmup=1, max_batch=False, sides=sides)
    rows = {row["side"]: row for row in r["throughput"]}
    assert set(rows) == set(sides) and all(row["finite"] for row in rows.values())
    assert r["summary"]["tiny"]["samples_per_s_ratio_offload"] > 0
    assert r["summary"]["tiny"]["samples_per_s_ratio_group"] > 0
    assert r["summary"]["tiny"]["samples_per_s_ratio_selective"] > 0
    assert r["summary"]["tiny"]["samples_per_s_ratio_selective_compile"] > 0
    assert rows["clipforge_selective"]["hfu"] == rows["clipforge_selective"]["mfu"]  # no matmul recomputed
    assert rows["clipforge_offload"]["hfu"] > rows["clipforge_offload"]["mfu"]
