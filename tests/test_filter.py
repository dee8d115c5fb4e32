"""The filter stage: pure rules, language ID, metadata balancing, presets and config files, and the whole stage on a
synthetic crawl (ledger rows, reasons, duplicates naming their key, rerun)."""
import json

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from crawl_data import jpeg, row, write_crawl_shard
from pipeline import filter as filt
from pipeline.balance import BalanceConfig, TermMatcher, balance
from pipeline.common import duckdb_connect
from pipeline.rules import LanguageID, RulesConfig, apply_rules, caption_features
from trainer.clip.formats.ledger import LEDGER_COLUMNS, REASONS, read_filter_manifest


def _table(rows):
    chars, words = caption_features([r.get("caption") for r in rows])
    t = pa.Table.from_pylist(rows)
    return t.append_column("caption_chars", pa.array(chars)).append_column("caption_words", pa.array(words))


def test_rules_first_reason_wins_and_every_bound_applies():
    base = {"status": "success", "error_class": None, "original_width": 300, "original_height": 300,
            "language": "en", "language_score": 0.9}
    rows = [
        {**base, "caption": "a red apple on a table"},                       # kept
        {**base, "caption": "a red apple", "status": "failed_to_download", "error_class": "http_error"},
        {**base, "caption": "two words"},                                    # too few words
        {**base, "caption": "apple " * 300},                                  # 1800 chars
        {**base, "caption": "une pomme rouge sur la table", "language": "fr"},
        {**base, "caption": "a red apple on a table", "original_width": 100},
        {**base, "caption": "a red apple on a table", "original_width": 1000, "original_height": 250},
        {**base, "caption": None},
    ]
    reason, detail = apply_rules(_table(rows), RulesConfig())
    assert reason.to_pylist() == [None, "crawl_failed", "caption_too_short", "caption_too_long", "language",
                                  "image_too_small", "aspect_ratio", "caption_too_short"]
    assert detail.to_pylist()[3] == "1799 chars" and detail.to_pylist()[6] == "1000x250"
    unsure = [{**base, "caption": "an emoji of a hot dog", "language": "ru", "language_score": 0.31}]
    assert apply_rules(_table(unsure), RulesConfig(min_other_language_score=0.5))[0].to_pylist() == [None]
    assert apply_rules(_table(unsure), RulesConfig())[0].to_pylist() == ["language"]
    off, _ = apply_rules(_table(rows), RulesConfig.off())
    assert off.to_pylist() == [None, "crawl_failed"] + [None] * 6  # only the crawl's own verdict stays


def test_language_id_ships_its_model():
    langs, scores = LanguageID()(["the quick brown fox jumps over the lazy dog", "le renard brun saute par-dessus "
                                  "le chien paresseux", "der schnelle braune Fuchs springt", "", None])
    assert langs[:3] == ["en", "fr", "de"] and langs[3:] == [None, None]
    assert scores[0] > 0.5 and scores[3] == 0


def test_term_matcher_substrings_case_insensitive(tmp_path):
    (tmp_path / "t.txt").write_text("# comment\ncat\nRed Apple\n\ndog\ncat\n")
    m = TermMatcher.load(str(tmp_path / "t.txt"))
    assert m(["A CATalog of red apples", "hot dog and cat", None, "nothing"]) == [
        ["cat", "red apple"], ["cat", "dog"], [], []]
    assert TermMatcher(["Cat"], case_sensitive=True)(["cat Cat"]) == [["Cat"]]


def _survivors(con, n_common=500, n_rare=20):
    rows = [(f"{i:09d}", f"{i % 3:05d}.tar", ["common"]) for i in range(n_common)]
    rows += [(f"{n_common + i:09d}", "00000.tar", ["common", "rare"]) for i in range(n_rare)]
    rows += [(f"{n_common + n_rare + i:09d}", "00001.tar", []) for i in range(5)]
    t = pa.table({"key": [r[0] for r in rows], "shard": [r[1] for r in rows],
                  "terms": pa.array([r[2] for r in rows], pa.list_(pa.string()))})
    con.register("input_rows", t)
    con.execute("CREATE TABLE survivors AS SELECT * FROM input_rows")


def test_balance_caps_each_term_with_a_seed(tmp_path):
    def run(seed, keep_unmatched=False):
        con = duckdb_connect()
        _survivors(con)
        cfg = BalanceConfig(metadata_terms="x", per_term_cap=50, balance_seed=seed, keep_unmatched=keep_unmatched)
        n = balance(con, "survivors", cfg, tmp_path / f"d{seed}.parquet", tmp_path / f"t{seed}.parquet")
        return n, pq.read_table(tmp_path / f"d{seed}.parquet").to_pylist(), \
            {r["term"]: r for r in pq.read_table(tmp_path / f"t{seed}.parquet").to_pylist()}

    n, drops, terms = run(0)
    assert terms["common"]["matches_before"] == 520 and terms["rare"]["matches_before"] == 20
    assert terms["rare"]["probability"] == 1.0 and terms["rare"]["kept_after"] == 20  # under the cap: all kept
    assert 20 + 20 < terms["common"]["kept_after"] < 50 + 20 + 30  # ~cap (+ the rare term's captions)
    assert sum(d["reason"] == "no_metadata_match" for d in drops) == 5
    assert [d["shard"] for d in drops] == sorted(d["shard"] for d in drops)
    assert run(0)[1] == drops and run(1)[1] != drops  # the seed decides, the same seed repeats
    assert sum(d["reason"] == "no_metadata_match" for d in run(2, keep_unmatched=True)[1]) == 0


def test_config_file_and_presets(tmp_path, capsys):
    (tmp_path / "c.toml").write_text('[rules]\nmin_image_side = 64\nlanguages = []\n[dedup]\nnear_dup = true\n')
    (tmp_path / "c.json").write_text(json.dumps({"per_term_cap": 7, "rules": {"max_caption_chars": 99}}))
    assert filt.main(["a", "b", "--preset", "basic", "--config", str(tmp_path / "c.toml"), "--min-image-side", "90",
                      "--print-config"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert c["rules"]["min_image_side"] == 90 and c["rules"]["languages"] == [] and c["dedup"]["near_dup"] is True
    assert c["rules"]["max_caption_chars"] == 0  # basic = DataComp's: no upper bound
    assert filt.main(["a", "b", "--config", str(tmp_path / "c.json"), "--print-config"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert c["balance"]["per_term_cap"] == 7 and c["rules"]["max_caption_chars"] == 99
    (tmp_path / "bad.json").write_text(json.dumps({"rules": {"no_such_rule": 1}}))
    assert filt.main(["a", "b", "--config", str(tmp_path / "bad.json")]) == 2
    assert "no_such_rule" in capsys.readouterr().err
    assert filt.main([str(tmp_path), str(tmp_path / "f"), "--laion"]) == 2  # needs --clip-checkpoint
    assert "--clip-checkpoint" in capsys.readouterr().err


# ---- the stage on a synthetic crawl ------------------------------------------------------------------------------
def _noise(seed, side=256):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side // 8, side // 8, 3), np.uint8)
                           ).resize((side, side), Image.NEAREST)


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    root = tmp_path_factory.mktemp("crawl")
    img = {i: jpeg(_noise(i)) for i in range(40)}
    rows0 = [row(f"{i:09d}", f"a photo of a cat number {i}", img[i], license=f"cc-{i}") for i in range(20)]
    rows0 += [row("000000020", "a photo of a dog, again", img[3], license="x"),            # same bytes as 3
              row("000000021", "a photo", img[21], license="x"),                             # too short
              row("000000022", "a photo of a cat number 5", None, license="x"),              # failed
              row("000000023", "a resized photo of a cat", jpeg(_noise(7).resize((200, 200)), 70), license="x")]
    rows1 = [row(f"{10000 + i:09d}", f"a picture of a dog number {i}", img[20 + i], license=f"cc-{i}")
             for i in range(15)]
    rows1 += [row("000010015", "a photo of a cat number 1", img[39], license="y",
                  url="http://example.com/000000001.jpg"),                                   # same (url, caption) as 1
              row("000010016", "the small image of a bird", jpeg(_noise(38, 64)), size=(64, 64), license="y")]
    extra = [pa.field("license", pa.string())]
    write_crawl_shard(root, 0, rows0, extra)
    write_crawl_shard(root, 1, rows1, extra)
    (root / "terms.txt").write_text("cat\ndog\nbird\n")
    return root


def _ledger(out):
    return {r["key"]: r for r in duckdb.sql(f"select * from '{out}/ledger/*.parquet'").to_arrow_table().to_pylist()}


def test_filter_stage_on_a_crawl(crawl, tmp_path, ray_local):
    out = tmp_path / "f"
    argv = [str(crawl), str(out), "--languages", "en", "--min-image-side", "100", "--near-dup",
            "--metadata-terms", str(crawl / "terms.txt"), "--per-term-cap", "10", "--progress-interval-s", "0"]
    assert filt.main(argv) == 0
    m, led = read_filter_manifest(out), _ledger(out)
    assert m["input_rows"] == len(led) == 41 and m["kept"] == sum(r["keep"] for r in led.values())
    assert m["kept"] + sum(m["dropped"].values()) == 41 and set(m["dropped"]) == set(REASONS)
    assert list(pq.read_schema(out / "ledger" / "part-00000.parquet").names) == [*LEDGER_COLUMNS, "license"]
    assert led["000000020"]["reason"] == "duplicate_image" and led["000000020"]["duplicate_of"] == "000000003"
    assert led["000010015"]["reason"] == "duplicate_pair" and led["000010015"]["duplicate_of"] == "000000001"
    assert led["000000023"]["reason"] == "near_duplicate" and led["000000023"]["duplicate_of"] == "000000007"
    assert led["000000021"]["reason"] == "caption_too_short" and led["000000022"]["reason"] == "crawl_failed"
    assert led["000010016"]["reason"] == "image_too_small" and led["000000005"]["license"] == "cc-5"
    assert led["000000005"]["language"] == "en" and led["000000005"]["terms"] == ["cat"]
    assert led["000000005"]["image_offset"] > 0 and led["000000005"]["image_size"] > 100
    kept_cats = sum(r["keep"] and r["terms"] == ["cat"] for r in led.values())
    assert 0 < kept_cats < 19 and m["dropped"]["balanced_out"] > 0  # cat is over its cap of 10
    terms = {r["term"]: r for r in pq.read_table(out / "terms.parquet").to_pylist()}
    assert terms["cat"]["kept_after"] == kept_cats and terms["dog"]["matches_before"] == 15
    counts = dict(duckdb.sql(f"select reason, count(*) from '{out}/ledger/*.parquet' group by 1").fetchall())
    assert counts[None] == m["kept"]
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    cli = shutil.which("duckdb", path=str(Path(sys.executable).parent))  # the README's command, from the venv
    shown = subprocess.run([cli, "-csv", "-c", f"select reason, count(*) from '{out}/ledger/*.parquet' group by 1"],
                           capture_output=True, text=True, check=True).stdout
    assert f"near_duplicate,{counts['near_duplicate']}" in shown.splitlines()

    before = {p.name: p.read_bytes() for p in (out / "ledger").glob("*.parquet")}
    assert filt.main(argv) == 0  # rerun: the features are reused, the ledger comes out the same
    m2 = read_filter_manifest(out)
    assert m2["reused_features"] == 2 and m2["fingerprint"] == m["fingerprint"]
    assert {p.name: p.read_bytes() for p in (out / "ledger").glob("*.parquet")} == before


def test_filter_none_keeps_every_image_and_refuses_an_empty_crawl(crawl, tmp_path, ray_local):
    out = tmp_path / "none"
    assert filt.main([str(crawl), str(out), "--preset", "none", "--progress-interval-s", "0"]) == 0
    m = read_filter_manifest(out)
    assert m["kept"] == 40 and m["dropped"]["crawl_failed"] == 1
    (tmp_path / "empty").mkdir()
    assert filt.main([str(tmp_path / "empty"), str(tmp_path / "x")]) == 2


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    import torch

    from trainer.clip.checkpoint import save_model
    from trainer.clip.configs import get_config
    from trainer.clip.model import CLIP

    torch.manual_seed(0)
    return str(save_model(CLIP(get_config("tiny")).eval(), tmp_path_factory.mktemp("ckpt") / "tiny"))


def test_filter_clip_top_fraction_and_row_aligned_embeddings(crawl, tiny_ckpt, tmp_path, ray_local):
    from trainer.clip.formats.ledger import embedding_paths

    out = tmp_path / "dc"
    assert filt.main([str(crawl), str(out), "--datacomp-clip", "--clip-checkpoint", tiny_ckpt,
                      "--clip-top-fraction", "0.5", "--progress-interval-s", "0"]) == 0
    m, led = read_filter_manifest(out), _ledger(out)
    scored = [r for r in led.values() if r["clip_score"] is not None]
    assert len(scored) == 40 and m["embeddings"]  # every crawled image (no other rule in datacomp-clip)
    kept = [r["clip_score"] for r in scored if r["keep"]]
    dropped = [r["clip_score"] for r in scored if r["reason"] == "clip_score"]
    assert 12 <= len(kept) <= 28 and len(kept) + len(dropped) == 40 and min(kept) >= max(dropped)
    for shard_id in (0, 1):
        img, txt = (np.load(p) for p in embedding_paths(out, shard_id))
        part = pq.read_table(out / "ledger" / f"part-{shard_id:05d}.parquet").to_pylist()
        assert img.shape[0] == txt.shape[0] == len(part) and img.dtype == np.float16
        for r in part:
            i = r["part_row"]
            if r["clip_score"] is None:
                assert not img[i].any() and not txt[i].any()
            else:
                cos = float(img[i].astype(np.float32) @ txt[i].astype(np.float32))
                assert abs(cos - r["clip_score"]) < 2e-2
    ids = sorted(embedding_paths(out, 0)[0].parent.glob("img-*.npy"))
    mtimes = [p.stat().st_mtime_ns for p in ids]
    assert filt.main([str(crawl), str(out), "--datacomp-clip", "--clip-checkpoint", tiny_ckpt,
                      "--clip-top-fraction", "0.5", "--progress-interval-s", "0"]) == 0
    assert [p.stat().st_mtime_ns for p in ids] == mtimes  # the scores and embeddings are reused


def test_filter_semantic_dedup_names_the_kept_image(crawl, tiny_ckpt, tmp_path, ray_local):
    out = tmp_path / "sem"
    assert filt.main([str(crawl), str(out), "--preset", "none", "--clip-checkpoint", tiny_ckpt, "--semantic-dup",
                      "--semantic-threshold", "0.99999", "--progress-interval-s", "0"]) == 0
    led = _ledger(out)
    sem = {k: r["duplicate_of"] for k, r in led.items() if r["reason"] == "semantic_duplicate"}
    # the same pictures under other captions (cosine 1) are found, no distinct one is
    assert sem == {"000000020": "000000003", "000010001": "000000021"}
    assert all(r["cluster"] is not None for r in led.values() if r["clip_score"] is not None)
    assert filt.main([str(crawl), str(tmp_path / "x"), "--semantic-dup"]) == 2  # needs the embeddings


@pytest.mark.slow
def test_kill_9_mid_filter_then_rerun_gives_the_same_ledger(tmp_path, ray_local):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from pipeline.filter_part import FAULT_ENV

    crawl = tmp_path / "crawl"
    for s in range(6):
        write_crawl_shard(crawl, s, [row(f"{s * 100 + i:09d}", f"a photo of a dog number {s * 100 + i}",
                                         jpeg(_noise(s * 100 + i)), license="x") for i in range(10)])
    argv = ["--near-dup", "--progress-interval-s", "0", "--max-in-flight", "1"]
    assert filt.main([str(crawl), str(tmp_path / "ref"), *argv]) == 0
    out = tmp_path / "out"
    env = {**os.environ, FAULT_ENV: "sleep:1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.filter", str(crawl), str(out), *argv],
                            cwd=Path(__file__).resolve().parents[1], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list((out / "_clipforge" / "features").glob("*.parquet"))) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before it was killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-run
        proc.wait()
    assert not (out / "filter_manifest.json").exists()
    assert filt.main([str(crawl), str(out), *argv]) == 0
    assert read_filter_manifest(out)["reused_features"] >= 2
    ledger = lambda d: {p.name: p.read_bytes() for p in (d / "ledger").glob("*.parquet")}  # noqa: E731
    assert ledger(out) == ledger(tmp_path / "ref") and len(ledger(out)) == 6


def test_filter_scores_the_same_with_open_clip_and_hf_checkpoints(crawl, tmp_path, ray_local):
    """--clip-checkpoint takes whatever the trainer loads: the same weights as an open_clip file and a Hugging Face
    dir give the clipforge dir's scores. (QuickGELU: a plain OpenAI-layout file does not record its activation,
    and the loader assumes OpenAI's.)"""
    import dataclasses

    import torch

    from trainer.clip.checkpoint import export_hf, export_open_clip, save_model
    from trainer.clip.configs import get_config
    from trainer.clip.model import CLIP

    torch.manual_seed(1)
    model = CLIP(dataclasses.replace(get_config("tiny"), quick_gelu=True)).eval()
    paths = {"clipforge": str(save_model(model, tmp_path / "cf")),
             "open_clip": str(export_open_clip(model, tmp_path / "oc" / "model.pt"))}
    export_hf(model, tmp_path / "hf")
    paths["hf"] = str(tmp_path / "hf")
    scores = {}
    for name, path in paths.items():
        out = tmp_path / name
        assert filt.main([str(crawl), str(out), "--preset", "none", "--clip-checkpoint", path,
                          "--progress-interval-s", "0"]) == 0
        scores[name] = {k: r["clip_score"] for k, r in _ledger(out).items()}
    assert sum(v is not None for v in scores["clipforge"].values()) == 40
    for name in ("open_clip", "hf"):
        assert scores[name].keys() == scores["clipforge"].keys()
        for k, v in scores["clipforge"].items():
            assert (v is None and scores[name][k] is None) or abs(v - scores[name][k]) < 1e-3, (name, k)
