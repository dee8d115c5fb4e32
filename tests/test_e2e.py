"""The whole demo at a smaller size: sample web -> crawl (img2dataset on Ray) -> filter -> shard -> DeepSpeed ZeRO-2
on 2 gloo ranks -> FAISS index -> search + HTML. Asserts on what every stage wrote on disk."""

import json
import re
import tarfile

import pyarrow.parquet as pq
import pytest

from pipeline import demo
from trainer.clip.formats.index import open_index_set
from trainer.clip.formats.shards import read_manifest

pytestmark = pytest.mark.slow


def test_demo_end_to_end(tmp_path, capsys):
    cfg = demo.DemoConfig.tiny(str(tmp_path / "demo"))
    s = demo.run(cfg)
    w = tmp_path / "demo"
    out = capsys.readouterr().out

    web = json.loads((w / "web" / "web.json").read_text())
    n_bad = sum(web["kinds"][k] for k in ("http_404", "not_image", "truncated", "opt_out"))
    # crawl: every row accounted for, the four bad rows recorded as failures
    assert s["crawl"]["rows"] == web["rows"]
    assert s["crawl"]["failed_to_download"] + s["crawl"]["failed_to_resize"] == n_bad
    assert s["crawl"]["success"] == web["rows"] - n_bad
    # filter: a reason for every drop, counts add up
    d = pq.read_table(w / "filter" / "ledger").to_pylist()
    assert len(d) == web["rows"] and all(r["keep"] == (r["reason"] is None) for r in d)
    kept = sum(r["keep"] for r in d)
    assert s["filter"]["kept"] == kept
    # a planted copy is dropped naming its kept original (unless a rule dropped either of them first)
    by_key = {r["key"]: r for r in d}
    dups = [r for r in d if r["reason"] == "duplicate_image"]
    assert 1 <= len(dups) <= web["kinds"]["duplicate"] and len(dups) == s["filter"]["dropped"]["duplicate_image"]
    kept_sha = [r["sha256"] for r in d if r["keep"]]
    assert len(kept_sha) == len(set(kept_sha))  # one image of each group stays
    assert all(by_key[r["duplicate_of"]]["keep"] and by_key[r["duplicate_of"]]["sha256"] == r["sha256"] for r in dups)
    assert (w / "filter" / "plots" / "caption_chars.png").exists() and "ledger" in out
    # shard: the expected number of shards holding exactly the kept samples
    m = read_manifest(w / "shards")
    assert m["num_samples"] == kept and len(m["shards"]) == -(-kept // cfg.shard_samples_per_shard)
    n_jpg = sum(sum(n.endswith(".jpg") for n in tarfile.open(w / "shards" / sh["tar"]).getnames())
                for sh in m["shards"])
    assert n_jpg == kept
    # train: 2 ranks, ZeRO-2, finite losses, a checkpoint
    t = s["train"]
    assert t["world_size"] == 2 and t["zero_stage"] == 2 and t["steps"] == cfg.steps
    losses = [json.loads(line)["loss"] for line in (w / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses and all(l == l and l < 1e4 for l in losses)
    assert (w / "run" / "checkpoint" / "model.safetensors").exists()
    ds = json.loads((w / "run" / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2
    assert json.loads((w / "run" / "train_config.json").read_text())["grad_checkpointing"] is True
    # held-out style: the trainer evaluated the Noto set at the end, and the demo printed it
    h = s["heldout"]
    assert h is not None and h["step"] == cfg.steps and h["num_images"] == cfg.heldout_max
    assert all(0.0 <= h[k] <= 1.0 for k in ("text->image R@10", "zero-shot group top-1"))
    assert "held-out style (Noto Color Emoji" in out
    # index: one vector per kept sample, aligned metadata
    assert s["embed"]["num_rows"] == s["embed"]["num_embedded"] == kept and not s["embed"]["failed"]
    assert s["index"]["num_vectors"] == kept
    assert pq.ParquetFile(open_index_set(w / "index").meta_path).metadata.num_rows == kept
    # search: k results per query, scores sorted, printed, and in the HTML page
    for q in cfg.queries:
        hits = s["search"][q]
        assert len(hits) == cfg.k
        scores = [h["score"] for h in hits]
        assert scores == sorted(scores, reverse=True)
        assert f'"{q}"' in out
    assert len(re.findall(r"<img ", (w / "results.html").read_text())) == cfg.k * len(cfg.queries)
    assert "where everything is" in out
