"""bench/bench_quality.py end to end at a toy size: the sample web becomes training shards, the Noto held-out set is
built, both real trainers (clipforge, open_clip_train) are probed and then trained for the same minutes, every
checkpoint is evaluated with trainer.evaluate on the held-out set, and the table, the JSON and the curves come out.
No held-out image is ever in the training shards."""

import hashlib
import json

import pytest

from helpers import load_bench
from trainer.clip.formats.shards import iter_tar_samples, list_shards


def _hashes(root):
    out = set()
    for shard in list_shards(root).shards:
        for s in iter_tar_samples(shard.tar):
            out |= {hashlib.sha256(m.data).hexdigest() for ext, m in s.members.items() if ext in ("png", "jpg")}
    return out


@pytest.mark.slow
def test_bench_quality_tiny(tmp_path, capsys):
    pytest.importorskip("open_clip_train")
    bench = load_bench("bench_quality")
    from pipeline import heldout

    try:
        heldout.noto_font_path()
    except heldout.HeldoutError as e:
        pytest.skip(str(e))
    out, png, work = tmp_path / "q.json", tmp_path / "q.png", tmp_path / "work"
    rc = bench.main(["--minutes", "0.15", "--seeds", "2", "--max-emoji", "30", "--heldout-max", "30", "--points", "2",
                     "--probe-steps", "6", "--batch", "8", "--workdir", str(work), "--out", str(out),
                     "--plot", str(png)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "ratio clipforge/open_clip held-out text->image R@10 =" in printed
    r = json.loads(out.read_text())
    assert png.stat().st_size > 10_000
    assert r["data"]["heldout_samples"] == 30 and r["data"]["train_samples"] == 60
    assert {(x["side"], x["seed"]) for x in r["runs"]} == {(s, k) for s in ("clipforge", "open_clip") for k in (0, 1)}
    for x in r["runs"]:
        assert len(x["curve"]) == 2 and x["curve"][0]["train_s"] < x["curve"][1]["train_s"]
        assert all(0.0 <= v <= 1.0 for k, v in x["final"].items()), x["final"]
        assert x["final"]["t2i_R@10"] >= x["final"]["t2i_R@1"]
        assert x["loss"] and all(p["loss"] > 0 for p in x["loss"])
    # both ran the same wall-clock budget (+- the probe's estimate), and their schedules to the end
    for side in ("clipforge", "open_clip"):
        assert 0.3 * 9 < r["summary"][side]["train_s"] < 3 * 9, r["summary"][side]
    assert set(r["ratios"]) == set(bench.METRICS)
    # the seeds differ (the std is over real repeats)
    cf = [x for x in r["runs"] if x["side"] == "clipforge"]
    assert cf[0]["loss"] != cf[1]["loss"]
    # no held-out image is training data
    assert not (_hashes(work / "shards") & _hashes(work / "heldout"))


def test_bench_quality_rejects_bad_flags(capsys):
    bench = load_bench("bench_quality")
    assert bench.main(["--minutes", "0"]) == 2
    assert bench.main(["--probe-steps", "1"]) == 2
