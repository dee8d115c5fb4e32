"""bench/bench_train_cpu.py end to end at a toy size: both real trainers (clipforge's `python -m trainer.train` and
open_clip_train through the wrapper) run on the same synthetic shards, the ratio line is printed and the JSON
holds positive steady-state samples/s for both sides."""

import json
import math
import re

import pytest

from helpers import load_bench
from trainer.clip.formats.shards import read_manifest



def _load():
    return load_bench("bench_train_cpu")


def test_bench_train_cpu_tiny(tmp_path, capsys):
    # two trainer start-ups (DeepSpeed, open_clip_train) + 3 steps each: ~20 s on 2 idle cores (~70 s when busy)
    pytest.importorskip("deepspeed")
    pytest.importorskip("open_clip_train")
    bench = _load()
    out = tmp_path / "r.json"
    rc = bench.main(["--batch", "4", "--steps", "3", "--warmup-steps", "1", "--shards-n", "2", "--per-shard", "16",
                     "--zero", "2", "--grad-checkpointing", "--checkpoint-policy", "selective",
                     "--workdir", str(tmp_path / "work"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert re.search(r"^ratio clipforge/open_clip samples/s = \d+\.\d\d$", printed, re.M), printed
    r = json.loads(out.read_text())
    rows = {row["side"]: row for row in r["results"]}
    assert set(rows) == {"clipforge_zero2", "open_clip"}
    assert rows["clipforge_zero2"]["checkpoint_policy"] == "selective" and rows["open_clip"]["grad_checkpointing"]
    (resolved,) = (tmp_path / "work").rglob("train_config.json")  # what the clipforge side really ran
    assert json.loads(resolved.read_text())["checkpoint_policy"] == "selective"
    for row in rows.values():
        assert "error" not in row, row
        assert row["rc"] == 0 and row["timed_steps"] == 2 and row["global_batch"] == 4
        for st in ("best", "mean", "median"):
            assert math.isfinite(row[f"samples_per_s_{st}"]) and row[f"samples_per_s_{st}"] > 0, (st, row)
        assert row["samples_per_s"] == row["samples_per_s_best"]
    assert r["ratio"] == pytest.approx(rows["clipforge_zero2"]["samples_per_s"] / rows["open_clip"]["samples_per_s"])
    # the open_clip side trained the same architecture clipforge's tiny preset maps to
    assert r["open_clip_model_config"]["vision_cfg"]["image_size"] == 64
    assert r["machine"]["cores"] >= 1 and r["machine"]["versions"]["open_clip"]


def test_brace_pattern_and_steady_state(tmp_path):
    bench = _load()
    d = bench.build_shards(tmp_path / "s", n_shards=3, per_shard=2, px=16)
    assert bench.brace_pattern(d) == str(d / "shard-{00000..00002}.tar")
    assert read_manifest(d)["num_samples"] == 6
    times = {1: 10.0, 2: 11.0, 3: 11.5, 4: 12.0, 5: 12.5}
    s = bench.steady_state(times, steps=5, warmup=1, global_batch=8)
    assert s["samples_per_s_mean"] == pytest.approx(4 * 8 / 2.5) and s["step_s_median"] == pytest.approx(0.5)
    assert s["samples_per_s_best"] == pytest.approx(4 * 8 / 2.5)  # window 10 > 4 timed steps: all of them
    s = bench.steady_state(times, steps=5, warmup=1, global_batch=8, window=2)
    assert s["samples_per_s_best"] == pytest.approx(2 * 8 / 1.0) and s["best_window_steps"] == 2
    with pytest.raises(ValueError):
        bench.steady_state({1: 0.0}, steps=5, warmup=1, global_batch=8)
