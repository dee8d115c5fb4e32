"""clipforge stats: a ledger of a few parts built here (write_ledger_part), read back by DuckDB into counts by
reason / error_class / language, quantiles, PNG histograms and stats.json."""
import json
from collections import Counter

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import cli, stats
from trainer.clip.flags import CLI
from trainer.clip.formats.ledger import (LEDGER_SCHEMA, REASONS, TERMS, ledger_part, ledger_schema, part_name,
                                         write_filter_manifest, write_ledger_part)

LANGS = ["en", "de", "fr", "es", "ja", "zh", "pt", "it", None]
ERRORS = ["HTTPError", "Timeout", "DecodeError"]


def ledger_rows(rng, n: int, start: int, clip_scores: bool = True) -> list[dict]:
    """n ledger rows: crawl failures with an error_class, varied reasons, languages, sizes and scores."""
    rows = []
    for i in range(start, start + n):
        failed = rng.random() < 0.15
        keep = not failed and rng.random() < 0.45
        reason = "crawl_failed" if failed else (None if keep else str(rng.choice(REASONS[1:])))
        side = None if failed else int(rng.integers(16, 1024))
        chars = int(rng.integers(1, 400)) if rng.random() > 0.01 else 20_000
        rows.append({
            "key": f"{i:09d}", "url": f"http://x.test/{i}.jpg", "caption": "c" * min(chars, 50),
            "shard": f"{start // 1000:05d}.tar", "part_row": i - start,
            "status": "failed_to_download" if failed else "success",
            "error_class": str(rng.choice(ERRORS)) if failed else None, "error_message": None,
            "width": side, "height": side, "original_width": side,
            "original_height": None if failed else side + int(rng.integers(0, 300)),
            "sha256": None, "image_ext": None, "image_offset": None, "image_size": None, "pair_sha256": None,
            "caption_chars": chars, "caption_words": chars // 5,
            "language": LANGS[int(rng.integers(0, len(LANGS)))], "language_score": float(rng.random()),
            "phash": None, "terms": None,
            "clip_score": float(rng.uniform(0.05, 0.45)) if clip_scores and not failed else None,
            "cluster": None, "keep": keep, "reason": reason, "detail": None, "duplicate_of": None,
            "extra_col": f"carried-{i}",
        })
    return rows


def make_filter_dir(root, parts=3, per_part=1200, clip_scores=True, terms=True, manifest=True, seed=0):
    rng = np.random.default_rng(seed)
    schema = ledger_schema([pa.field("extra_col", pa.string())])
    everything, entries = [], []
    for p in range(parts):
        rows = ledger_rows(rng, per_part, p * 1000 + p * per_part, clip_scores)
        write_ledger_part(ledger_part(root, p), pa.Table.from_pylist(rows, schema=schema))
        everything += rows
        entries.append({"part": part_name(p), "rows": len(rows), "kept": sum(r["keep"] for r in rows)})
    if terms:
        names = [f"term{i:03d}" for i in range(60)]
        before = [int(x) for x in rng.integers(1, 5000, len(names))]
        table = pa.table({"term": names, "matches_before": pa.array(before, pa.int64()),
                          "kept_after": pa.array([min(b, 500) for b in before], pa.int64()),
                          "probability": pa.array([min(1.0, 500 / b) for b in before], pa.float64())})
        pq.write_table(table, root / TERMS)
    if manifest:
        write_filter_manifest(root, {"input_rows": len(everything), "kept": sum(r["keep"] for r in everything),
                                     "parts": entries})
    return everything


@pytest.fixture(scope="module")
def filter_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("filter")
    return root, make_filter_dir(root)


def printed_table(out: str, title: str) -> dict[str, list[str]]:
    """The rows of one printed table: {first cell: the other cells}."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    table = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        name, *cells = line.split()
        table[name] = cells
    return table


def _int(cell: str) -> int:
    return int(cell.replace(",", ""))


def test_printed_counts_by_reason_match_a_direct_count(filter_dir, capsys):
    root, rows = filter_dir
    assert stats.main([str(root), "--top", "5"]) == 0
    out = capsys.readouterr().out
    expected = Counter(r["reason"] for r in rows if not r["keep"])
    table = printed_table(out, "dropped, by reason")
    assert {name: _int(cells[0]) for name, cells in table.items()} == dict(expected)
    assert list(table) == [r for r in REASONS if r in expected]  # the stage's order
    share = 100 * expected["crawl_failed"] / len(rows)
    assert table["crawl_failed"][1] == f"{share:.2f}%"
    assert f"stats: {len(rows):,} rows in 3 parquet files" in out
    kept = printed_table(out, "stats:")
    assert _int(kept["kept"][0]) == sum(r["keep"] for r in rows)
    errors = printed_table(out, "crawl error_class")
    assert {k: _int(v[0]) for k, v in errors.items()} == dict(Counter(r["error_class"] for r in rows
                                                                     if r["error_class"]))
    langs = printed_table(out, "language (top 5)")
    top = Counter("(none)" if r["language"] is None else r["language"] for r in rows).most_common()
    assert len(langs) == 6 and _int(langs["other"][-1]) == sum(n for _, n in top[5:])
    for name, n in top[:5]:
        assert _int(langs[name][0]) == n
        assert _int(langs[name][1]) == sum(r["keep"] for r in rows if (r["language"] or "(none)") == name)


def test_summary_quantiles_and_terms(filter_dir):
    root, rows = filter_dir
    s = stats.run(stats.StatsConfig(ledger=str(root), top=7))
    assert s["rows"] == len(rows) and s["kept"] + s["dropped"] == len(rows) and s["files"] == 3
    assert sum(r["rows"] for r in s["by_reason"]) == s["dropped"]
    assert not [n for n in s["notes"] if "records" in n]  # the manifest agrees with the ledger
    sides = [min(r["original_width"], r["original_height"]) for r in rows if r["original_width"] is not None]
    q = s["quantiles"]["image_side"]["all"]
    assert q["n"] == len(sides) and q["min"] == min(sides) and q["max"] == max(sides)
    assert abs(q["p50"] - np.median(sides)) < 0.03 * (max(sides) - min(sides))
    kept_scores = [r["clip_score"] for r in rows if r["keep"]]
    assert s["quantiles"]["clip_score"]["kept"]["n"] == len(kept_scores)
    assert s["quantiles"]["clip_score"]["kept"]["mean"] == pytest.approx(np.mean(kept_scores), rel=1e-5)
    terms = pq.read_table(root / TERMS).to_pylist()
    assert s["terms"]["terms"] == 60 and len(s["terms"]["top"]) == 7
    assert s["terms"]["top"][0]["matches_before"] == max(t["matches_before"] for t in terms)
    assert "histograms" not in s and "plots" not in s


def _is_png(path) -> bool:
    with Image.open(path) as im:
        return im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200 and len(im.getcolors(1 << 16)) > 2


def test_plots_and_stats_json(filter_dir, tmp_path, capsys):
    root, rows = filter_dir
    plots = tmp_path / "plots"
    assert stats.main([str(root), "--plots", str(plots), "--top", "6"]) == 0
    assert "plots: caption_chars.png" in capsys.readouterr().out
    names = {"caption_chars.png", "image_side.png", "clip_score.png", "language.png", "terms.png"}
    assert {p.name for p in plots.glob("*.png")} == names
    for name in names:
        assert (plots / name).stat().st_size > 5_000 and _is_png(plots / name)
    s = json.loads((plots / stats.STATS_JSON).read_text())
    assert s["format"] == stats.STATS_FORMAT and sorted(s["plots"]) == sorted(names)
    h = s["histograms"]["caption_chars"]
    assert sum(h["kept"]) + sum(h["dropped"]) == len(rows)  # everything is in some bin (the tail in the last)
    assert sum(h["kept"]) == sum(r["keep"] for r in rows) and h["last_bin_open"]
    assert len(h["edges"]) == len(h["kept"]) + 1 and len(h["kept"]) <= stats.BINS
    scores = s["histograms"]["clip_score"]
    assert sum(scores["kept"]) + sum(scores["dropped"]) == sum(r["clip_score"] is not None for r in rows)


def test_all_null_clip_score_skips_its_plot_and_a_rerun_removes_the_stale_one(tmp_path, capsys):
    root, plots = tmp_path / "f", tmp_path / "plots"
    make_filter_dir(root, parts=2, per_part=300, clip_scores=True, terms=False)
    assert stats.main([str(root), "--plots", str(plots)]) == 0
    assert (plots / "clip_score.png").exists() and not (plots / "terms.png").exists()
    make_filter_dir(root, parts=2, per_part=300, clip_scores=False, terms=False, seed=1)
    capsys.readouterr()
    assert stats.main([str(root), "--plots", str(plots)]) == 0
    captured = capsys.readouterr()
    assert "clip_score: all null, skipped" in captured.err
    assert not (plots / "clip_score.png").exists() and (plots / "image_side.png").exists()
    s = json.loads((plots / stats.STATS_JSON).read_text())
    assert s["quantiles"]["clip_score"] == {"all": None, "kept": None} and "clip_score" not in s["histograms"]
    assert "clip_score" not in printed_table(captured.out, "quantiles").get("clip_score", [""])[0]


def test_a_glob_a_ledger_dir_and_a_filter_dir_without_manifest(tmp_path, filter_dir):
    root, rows = filter_dir
    direct = stats.run(stats.StatsConfig(ledger=str(root)))
    for spec in (str(root / "ledger"), str(root / "ledger" / "*.parquet")):
        s = stats.run(stats.StatsConfig(ledger=spec))
        assert (s["rows"], s["by_reason"], s["by_language"]) == (direct["rows"], direct["by_reason"],
                                                                   direct["by_language"])
        assert s["terms"] == direct["terms"]  # terms.parquet found next to the ledger/ dir
    one = stats.run(stats.StatsConfig(ledger=str(root / "ledger" / "part-00001.parquet")))
    assert one["rows"] == 1200 and one["files"] == 1
    bare = tmp_path / "bare"
    make_filter_dir(bare, parts=2, per_part=100, terms=False, manifest=False)
    s = stats.run(stats.StatsConfig(ledger=str(bare)))
    assert s["rows"] == 200 and any("no filter_manifest.json" in n for n in s["notes"])


def test_the_manifest_decides_which_parts_count(tmp_path):
    root = tmp_path / "f"
    make_filter_dir(root, parts=2, per_part=100, terms=False)
    stray = ledger_rows(np.random.default_rng(5), 50, 9000)
    write_ledger_part(ledger_part(root, 7), pa.Table.from_pylist(
        stray, schema=ledger_schema([pa.field("extra_col", pa.string())])))
    assert stats.run(stats.StatsConfig(ledger=str(root)))["rows"] == 200  # part 7 is not in the manifest
    assert stats.run(stats.StatsConfig(ledger=str(root / "ledger" / "*.parquet")))["rows"] == 250
    ledger_part(root, 1).unlink()
    with pytest.raises(stats.StatsError, match="missing"):
        stats.run(stats.StatsConfig(ledger=str(root)))


def test_user_errors_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert stats.main([str(tmp_path / "empty")]) == 2
    assert "no parquet files" in capsys.readouterr().err
    assert stats.main([str(tmp_path / "nope")]) == 2
    assert stats.main([str(tmp_path / "nothing-*.parquet")]) == 2
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "other.parquet")
    assert stats.main([str(tmp_path / "other.parquet")]) == 2
    assert "no column 'keep'" in capsys.readouterr().err
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    assert stats.main([str(tmp_path / "bad.parquet")]) == 2
    assert "cannot read the ledger" in capsys.readouterr().err
    assert stats.main([str(tmp_path), "--top", "0"]) == 2
    assert stats.main([str(tmp_path), "--memory-limit", "lots"]) == 2
    assert "--memory-limit must be a size" in capsys.readouterr().err


def test_a_ledger_with_missing_columns_and_no_rows(tmp_path, capsys):
    minimal = pa.table({"keep": [True, False, False, None], "reason": [None, "language", "odd_reason", None]})
    pq.write_table(minimal, tmp_path / "m.parquet")
    s = stats.run(stats.StatsConfig(ledger=str(tmp_path / "m.parquet")))
    assert s["kept"] == 1 and {r["reason"]: r["rows"] for r in s["by_reason"]} == {
        "language": 1, "odd_reason": 1, "(none)": 1}
    assert any("clip_score: not in the ledger" in n for n in s["notes"])
    empty = pa.Table.from_pylist([], schema=LEDGER_SCHEMA)
    pq.write_table(empty, tmp_path / "e.parquet")
    s = stats.run(stats.StatsConfig(ledger=str(tmp_path / "e.parquet"), plots=str(tmp_path / "p")))
    assert s["rows"] == 0 and s["by_reason"] == [] and s["plots"] == []
    assert stats.report(s) == 0 and "stats: 0 rows" in capsys.readouterr().out


def test_the_readme_duckdb_query_reads_the_ledger(filter_dir):
    root, rows = filter_dir
    got = dict(duckdb.sql(f"select reason, count(*) from '{root}/ledger/*.parquet' group by 1").fetchall())
    assert got == dict(Counter(r["reason"] for r in rows))


def test_cli_wiring_and_flags(filter_dir, capsys):
    root, _ = filter_dir
    parser = CLI(stats.StatsConfig, prog="x").parser
    assert all((a.help or "").strip() for a in parser._actions)
    assert cli.main(["stats", str(root), "--top", "3"]) == 0
    assert "dropped, by reason" in capsys.readouterr().out


def wide_part(rng, n: int) -> pa.Table:
    """n ledger rows built column-wise (no per-row Python objects); unset columns are null."""
    reasons = np.array([None, *REASONS], dtype=object)[rng.integers(0, len(REASONS) + 1, n)]
    cols = {f.name: pa.nulls(n, f.type) for f in LEDGER_SCHEMA}
    side = rng.integers(16, 2048, n).astype(np.int32)
    cols.update(keep=pa.array(reasons == None), reason=pa.array(reasons, pa.string()),  # noqa: E711
                caption_chars=pa.array(rng.integers(1, 600, n).astype(np.int32)),
                original_width=pa.array(side), original_height=pa.array(side),
                language=pa.array(np.array(LANGS[:-1], dtype=object)[rng.integers(0, 8, n)], pa.string()),
                clip_score=pa.array(rng.uniform(0, 0.5, n).astype(np.float32)))
    return pa.table(cols, schema=LEDGER_SCHEMA)


@pytest.mark.slow
def test_many_parts_under_a_small_memory_limit(tmp_path):
    rng, expected, rows = np.random.default_rng(3), Counter(), 0
    for p in range(40):
        table = wide_part(rng, 50_000)
        write_ledger_part(ledger_part(tmp_path, p), table)
        expected.update(r for r in table.column("reason").to_pylist() if r is not None)
        rows += len(table)
    s = stats.run(stats.StatsConfig(ledger=str(tmp_path / "ledger"), memory_limit="64MB",
                                    plots=str(tmp_path / "plots")))
    assert s["rows"] == rows == 2_000_000 and s["files"] == 40
    assert {r["reason"]: r["rows"] for r in s["by_reason"]} == dict(expected)
    assert sum(s["histograms"]["image_side"]["kept"]) == s["kept"]
    assert abs(s["quantiles"]["clip_score"]["all"]["p50"] - 0.25) < 0.01
