"""`clipforge stats` — what the filter stage decided, read back from its ledger: row counts by reason, by crawl
error_class and by language, quantiles of caption length, image size and CLIP score, and (with --plots) kept-vs-
dropped histograms of them.

Reads  LEDGER, one of: a filter dir (the ledger parts its filter_manifest.json lists, or every ledger/*.parquet
       while it has no manifest yet), its ledger/ dir, one parquet file, or a glob of parquet files (quote it);
       and FILTER_DIR/terms.parquet (metadata balancing) next to the ledger when it exists.
Writes nothing without --plots. With --plots DIR: DIR/caption_chars.png, DIR/image_side.png, DIR/clip_score.png,
       DIR/language.png, DIR/terms.png (each only when it has data: an all-null column is skipped with a note)
       and DIR/stats.json (the summary `run` returns), each atomically.

Everything is computed by DuckDB straight from the parquet files (read_parquet([...], union_by_name=true)) under
a memory_limit, spilling to a temp dir that is removed afterwards; only aggregates (counts, approximate quantiles,
histogram bin counts) reach Python, so a 400M-row ledger in thousands of parts costs a few scans, not its size in
memory. Quantiles are DuckDB's approx_quantile (t-digest). A rerun recomputes everything and replaces the files
above; a plot that has no data this time is removed, so DIR never shows a stale one.
"""
from __future__ import annotations

import contextlib
import glob
import math
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import duckdb

from pipeline.common import duckdb_connect, sql_str
from trainer.clip.flags import CLI, opt, require, run_main
from trainer.clip.formats.atomic import atomic_write, atomic_write_json
from trainer.clip.formats.ledger import (FILTER_MANIFEST, LEDGER_DIR, REASONS, TERMS, LedgerError, ledger_files,
                                         read_filter_manifest)

STATS_FORMAT = "clipforge.stats.v1"
STATS_JSON = "stats.json"
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
BINS = 50
_SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$", re.IGNORECASE)


@dataclass(frozen=True)
class Metric:
    """A numeric ledger quantity that gets quantiles and a histogram."""
    name: str            # summary key and PNG stem
    title: str
    expr: str            # DuckDB expression over the ledger's columns
    needs: tuple         # the columns it reads
    integer: bool        # integer-valued: bins are whole numbers wide
    clip_tail: bool      # the histogram ends at p99; the last bin counts everything above it


METRICS = (
    Metric("caption_chars", "caption length (characters)", "caption_chars", ("caption_chars",), True, True),
    Metric("image_side", "image size (shorter original side, px)",
           "CASE WHEN original_width IS NOT NULL AND original_height IS NOT NULL "
           "THEN least(original_width, original_height) END", ("original_width", "original_height"), True, True),
    Metric("clip_score", "CLIP score (image-caption cosine)", "clip_score", ("clip_score",), False, False),
)
PLOTS = (*(m.name for m in METRICS), "language", "terms")


@dataclass
class StatsConfig:
    """Which ledger to summarise, and what to write besides the printed table."""
    ledger: str = opt("", positional=True,
                      help="a filter dir, its ledger/ dir, a parquet file, or a glob of parquet files (quoted)")
    plots: str | None = opt(None, help="write PNG histograms and stats.json (the summary) into this dir")
    top: int = opt(20, help="languages, crawl error classes and metadata terms listed (the rest summed as 'other')")
    memory_limit: str = opt("4GB", help="DuckDB memory_limit; beyond it DuckDB spills to a temp dir")

    def __post_init__(self):
        require(self, "ledger", bool(self.ledger), "is required")
        require(self, "top", self.top >= 1, "must be >= 1")
        require(self, "memory_limit", bool(_SIZE.match(self.memory_limit.strip())),
                "must be a size such as 4GB or 512MiB")


class StatsError(ValueError):
    """No ledger to read, or one DuckDB cannot read as a ledger."""


# ---- where the ledger is ------------------------------------------------------------------------------------------

@dataclass
class Source:
    files: list[str]
    filter_dir: Path | None            # where terms.parquet is looked for
    manifest: dict | None = None       # set when the files are exactly the parts the manifest lists
    notes: list[str] = field(default_factory=list)


def _from_manifest(filter_dir: Path) -> Source:
    try:
        manifest = read_filter_manifest(filter_dir)
        files = ledger_files(filter_dir, manifest)
    except (LedgerError, KeyError, TypeError) as e:
        raise StatsError(f"{filter_dir / FILTER_MANIFEST}: {e}") from e
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise StatsError(f"{len(missing)} ledger parts that {FILTER_MANIFEST} lists are missing, e.g. {missing[0]}")
    return Source([str(f) for f in files], filter_dir, manifest)


def _parquets(paths) -> list[str]:
    return sorted(str(p) for p in paths if Path(p).is_file() and str(p).endswith(".parquet"))


def _filter_dir_of(files: list[str]) -> Path:
    """The dir a terms.parquet would sit in: the parent of a ledger/ dir, else the files' own dir."""
    parent = Path(files[0]).parent
    return parent.parent if parent.name == LEDGER_DIR else parent


def resolve(spec: str) -> Source:
    """The parquet files LEDGER names (see the module docstring). StatsError when there are none."""
    path = Path(spec)
    if path.is_dir():
        if (path / FILTER_MANIFEST).exists():
            return _from_manifest(path)
        if path.name == LEDGER_DIR and (path.parent / FILTER_MANIFEST).exists():
            return _from_manifest(path.parent)
        ledger = path / LEDGER_DIR if (path / LEDGER_DIR).is_dir() else path
        files = _parquets(ledger.glob("*.parquet"))
        notes = [f"{path} has no {FILTER_MANIFEST}: reading every part in {ledger}"] if ledger != path else []
    elif path.is_file():
        files, notes = _parquets([path]), []
    elif glob.has_magic(spec):
        files, notes = _parquets(glob.glob(spec, recursive=True)), []
    else:
        raise StatsError(f"{spec}: no such file or directory")
    if not files:
        raise StatsError(f"no parquet files in {spec!r}")
    return Source(files, _filter_dir_of(files), None, notes)


# ---- DuckDB -------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def connect(memory_limit: str) -> Iterator[duckdb.DuckDBPyConnection]:
    """A DuckDB connection held to memory_limit, spilling into a temp dir removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="clipforge-stats-") as spill:
        con = duckdb_connect(":memory:", memory_limit.strip(), spill)
        try:
            yield con
        finally:
            con.close()


def _column(cols: set[str], name: str, sql_type: str) -> str:
    return f"CAST({name} AS {sql_type})" if name in cols else f"CAST(NULL AS {sql_type})"


def open_ledger(con, files: list[str]) -> set[str]:
    """Views `ledger` (the files as they are) and `v` (k, reason, error_class, language and the metrics, NULL where
    the ledger lacks a column). Returns the ledger's columns."""
    listed = ", ".join(sql_str(f) for f in files)
    try:
        con.execute(f"CREATE TEMP VIEW ledger AS SELECT * FROM read_parquet([{listed}], union_by_name=true)")
        cols = {row[0] for row in con.execute("DESCRIBE ledger").fetchall()}
    except duckdb.Error as e:
        raise StatsError(f"cannot read the ledger: {e}") from e
    if "keep" not in cols:
        raise StatsError(f"not a ledger: no column 'keep' in {files[0]} ...")
    select = ["coalesce(CAST(keep AS BOOLEAN), false) AS k"]
    select += [f"{_column(cols, c, 'VARCHAR')} AS {c}" for c in ("reason", "error_class", "language")]
    for m in METRICS:
        expr = m.expr if set(m.needs) <= cols else "NULL"
        select.append(f"CASE WHEN isfinite(CAST({expr} AS DOUBLE)) THEN CAST({expr} AS DOUBLE) END AS {m.name}")
    con.execute(f"CREATE TEMP VIEW v AS SELECT {', '.join(select)} FROM ledger")
    return cols


def _fetch(con, sql: str, params=None) -> list[tuple]:
    try:
        return con.execute(sql, params or []).fetchall()
    except duckdb.Error as e:  # a column of the wrong type, an unreadable part
        raise StatsError(f"cannot read the ledger: {e}") from e


# ---- the summary --------------------------------------------------------------------------------------------------

def _dist(n, lo, hi, mean, qs) -> dict | None:
    if not n:
        return None
    return {"n": n, "min": lo, "max": hi, "mean": mean,
            **{f"p{round(q * 100)}": v for q, v in zip(QUANTILES, qs or [None] * len(QUANTILES))}}


def totals_and_quantiles(con) -> dict:
    """One scan: rows, kept, and per metric (all rows / kept rows) its count, min, max, mean and quantiles."""
    qs = "[" + ", ".join(map(str, QUANTILES)) + "]"
    parts = ["count(*)", "count(*) FILTER (WHERE k)"]
    for m in METRICS:
        for where in ("", " FILTER (WHERE k)"):
            parts += [f"count({m.name}){where}", f"min({m.name}){where}", f"max({m.name}){where}",
                      f"avg({m.name}){where}", f"approx_quantile({m.name}, {qs}){where}"]
    row = _fetch(con, f"SELECT {', '.join(parts)} FROM v")[0]
    out = {"rows": row[0], "kept": row[1], "quantiles": {}}
    for i, m in enumerate(METRICS):
        base = 2 + i * 10
        out["quantiles"][m.name] = {"all": _dist(*row[base:base + 5]), "kept": _dist(*row[base + 5:base + 10])}
    return out


def top_values(con, key: str, where: str, limit: int) -> dict:
    """The `limit` most frequent values of `key` among rows matching `where`: rows and kept per value, and what
    the rest add up to."""
    rows = _fetch(con, f"""
        SELECT value, n, kept, sum(n) OVER () AS total, count(*) OVER () AS n_values
        FROM (SELECT {key} AS value, count(*) AS n, count(*) FILTER (WHERE k) AS kept FROM v WHERE {where}
              GROUP BY 1)
        ORDER BY n DESC, value LIMIT ?""", [limit])
    listed = [{"value": r[0], "rows": r[1], "kept": r[2]} for r in rows]
    total, values = (int(rows[0][3]), rows[0][4]) if rows else (0, 0)
    return {"top": listed, "total": total, "other_rows": total - sum(r["rows"] for r in listed),
            "other_values": values - len(listed)}


def by_reason(con, rows: int) -> list[dict]:
    """Dropped rows by reason, in the order the stage applies the reasons (unknown ones after, by count)."""
    found = top_values(con, "coalesce(reason, '(none)')", "NOT k", 10_000)["top"]
    order = {r: i for i, r in enumerate(REASONS)}
    found.sort(key=lambda r: (order.get(r["value"], len(REASONS)), -r["rows"], r["value"]))
    return [{"reason": r["value"], "rows": r["rows"], "share": r["rows"] / rows if rows else 0.0} for r in found]


def _bins(m: Metric, q: dict) -> tuple[float, float, int]:
    """(lo, width, n) of a histogram over the metric's [min, p99] (or [min, max])."""
    lo, hi = q["min"], (q["p99"] if m.clip_tail and q["p99"] is not None else q["max"])
    hi = max(hi, lo)
    if m.integer:
        width = max(1, math.ceil((hi - lo + 1) / BINS))
        return float(lo), float(width), math.ceil((hi - lo + 1) / width)
    width = (hi - lo) / BINS or 1e-6
    return float(lo), width, BINS


def histogram(con, m: Metric, q: dict) -> dict:
    """Kept and dropped counts per bin (computed in DuckDB); values past the last edge count in the last bin."""
    lo, width, n = _bins(m, q)
    rows = _fetch(con, f"""
        SELECT CAST(least(greatest(floor(({m.name} - ?) / ?), 0), ? - 1) AS BIGINT) AS b,
               count(*) FILTER (WHERE k), count(*) FILTER (WHERE NOT k)
        FROM v WHERE {m.name} IS NOT NULL GROUP BY 1""", [lo, width, n])
    kept, dropped = [0] * n, [0] * n
    for b, nk, nd in rows:
        kept[b], dropped[b] = nk, nd
    edges = [lo + i * width for i in range(n + 1)]
    return {"edges": edges, "kept": kept, "dropped": dropped, "last_bin_open": q["max"] >= edges[-1]}


def terms_summary(path: Path, con, top: int) -> dict:
    """The terms.parquet of metadata balancing: how many terms, and the `top` most matched."""
    src = f"read_parquet({sql_str(str(path))})"
    try:
        n, before, after = con.execute(f"SELECT count(*), sum(matches_before), sum(kept_after) FROM {src}").fetchone()
        rows = con.execute(f"SELECT CAST(term AS VARCHAR), matches_before, kept_after FROM {src} "
                           f"ORDER BY matches_before DESC, term LIMIT ?", [top]).fetchall()
    except duckdb.Error as e:
        raise StatsError(f"{path}: {e}") from e
    return {"terms": n, "matches_before": int(before or 0), "kept_after": int(after or 0),
            "top": [{"term": t, "matches_before": b, "kept_after": a} for t, b, a in rows]}


def _note_missing(summary: dict, cols: set[str]) -> None:
    notes = summary["notes"]
    for m in METRICS:
        if summary["quantiles"][m.name]["all"] is None:
            why = "not in the ledger" if not set(m.needs) <= cols else "all null"
            notes.append(f"{m.name}: {why}, skipped")
    if summary["by_language"]["top"] and all(r["value"] is None for r in summary["by_language"]["top"]):
        notes.append("language: all null, skipped")
        summary["by_language"]["top"] = []
    if "error_class" not in cols:
        notes.append("error_class: not in the ledger, skipped")


def _manifest_check(summary: dict, manifest: dict | None) -> None:
    if manifest is None:
        return
    expected = (manifest.get("input_rows"), manifest.get("kept"))
    if expected != (summary["rows"], summary["kept"]):
        summary["notes"].append(f"{FILTER_MANIFEST} records {expected[0]} rows / {expected[1]} kept, "
                                f"the ledger has {summary['rows']} / {summary['kept']}")


def summarise(con, source: Source, top: int, histograms: bool) -> dict:
    """The summary dict of the ledger in `source` (see run)."""
    cols = open_ledger(con, source.files)
    summary = {"format": STATS_FORMAT, "files": len(source.files),
               "filter_dir": str(source.filter_dir) if source.filter_dir else None,
               "notes": list(source.notes), **totals_and_quantiles(con)}
    summary["dropped"] = summary["rows"] - summary["kept"]
    summary["by_reason"] = by_reason(con, summary["rows"])
    summary["by_error_class"] = top_values(con, "error_class", "error_class IS NOT NULL", top)
    summary["by_language"] = top_values(con, "language", "true", top)
    _note_missing(summary, cols)
    _manifest_check(summary, source.manifest)
    if histograms:
        summary["histograms"] = {m.name: histogram(con, m, summary["quantiles"][m.name]["all"])
                                 for m in METRICS if summary["quantiles"][m.name]["all"] is not None}
    terms = source.filter_dir / TERMS if source.filter_dir else None
    summary["terms"] = None
    if terms and terms.is_file():
        try:
            summary["terms"] = terms_summary(terms, con, top)
        except StatsError as e:  # the ledger's numbers stand without it
            summary["notes"].append(f"{TERMS} unreadable, skipped: {e}")
    return summary


def run(cfg: StatsConfig) -> dict:
    """The summary: rows, kept, dropped, by_reason, by_error_class, by_language, quantiles, terms, notes (and with
    --plots: histograms and plots, also written to PLOTS_DIR/stats.json)."""
    source = resolve(cfg.ledger)
    with connect(cfg.memory_limit) as con:
        summary = summarise(con, source, cfg.top, histograms=bool(cfg.plots))
    summary["ledger"] = cfg.ledger
    if cfg.plots:
        out = Path(cfg.plots)
        summary["plots"] = write_plots(summary, out)
        for stale in set(PLOTS) - {Path(p).stem for p in summary["plots"]}:
            (out / f"{stale}.png").unlink(missing_ok=True)
        atomic_write_json(out / STATS_JSON, summary)
    return summary


# ---- the plots (matplotlib's Agg canvas, imported only here) --------------------------------------------------

def _figure(width: float = 8.0, height: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path.name


def _hist_png(path: Path, title: str, h: dict) -> str:
    """Kept and dropped rows per bin, as two filled step series."""
    fig, ax = _figure()
    ax.stairs(h["dropped"], h["edges"], fill=True, alpha=0.5, color="tab:red", label=f"dropped ({sum(h['dropped']):,})")
    ax.stairs(h["kept"], h["edges"], fill=True, alpha=0.6, color="tab:blue", label=f"kept ({sum(h['kept']):,})")
    ax.set_xlabel(title + ("  (the last bin holds everything above it)" if h["last_bin_open"] else ""))
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def _bars_png(path: Path, title: str, labels: list[str], series: dict[str, list[int]]) -> str:
    """Grouped bars: one group per label, one bar per series."""
    fig, ax = _figure(max(8.0, 0.45 * len(labels) + 2), 4.5)
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))], values, width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def write_plots(summary: dict, out: Path) -> list[str]:
    """The PNGs that have data (see the module docstring); a note for each skipped. Returns their file names."""
    out.mkdir(parents=True, exist_ok=True)
    written = [_hist_png(out / f"{m.name}.png", m.title, summary["histograms"][m.name])
               for m in METRICS if m.name in summary["histograms"]]
    langs = summary["by_language"]["top"]
    if langs:
        labels = ["(none)" if r["value"] is None else str(r["value"]) for r in langs]
        written.append(_bars_png(out / "language.png", f"language (top {len(langs)})", labels,
                                 {"kept": [r["kept"] for r in langs],
                                  "dropped": [r["rows"] - r["kept"] for r in langs]}))
    terms = summary["terms"]
    if terms and terms["top"]:
        written.append(_bars_png(out / "terms.png", f"metadata terms (top {len(terms['top'])} by matches)",
                                 [str(t["term"]) for t in terms["top"]],
                                 {"matches before": [t["matches_before"] or 0 for t in terms["top"]],
                                  "kept after": [t["kept_after"] or 0 for t in terms["top"]]}))
    else:
        summary["notes"].append(f"terms: no {TERMS} with rows next to the ledger, plot skipped")
    return written


# ---- the printed table --------------------------------------------------------------------------------------------

def _pct(n: int, of: int) -> str:
    return f"{100 * n / of:9.2f}%" if of else f"{'-':>10}"


def _num(value, integer: bool) -> str:
    if value is None:
        return "-"
    return f"{round(value):,}" if integer else f"{value:.4f}"


def _table_top(title: str, t: dict, rows: int) -> list[str]:
    lines = [f"{title:<30} {'rows':>13} {'kept':>13} {'% of input':>10}"]
    for r in t["top"]:
        name = "(none)" if r["value"] is None else str(r["value"])
        lines.append(f"  {name:<28} {r['rows']:>13,} {r['kept']:>13,} {_pct(r['rows'], rows)}")
    if t["other_values"]:
        other = f"other ({t['other_values']} value{'s' if t['other_values'] > 1 else ''})"
        lines.append(f"  {other:<28} {t['other_rows']:>13,}")
    return lines + [""]


def _table_quantiles(summary: dict) -> list[str]:
    keys = ["n", "min", *(f"p{round(q * 100)}" for q in QUANTILES), "max", "mean"]
    lines = [f"{'quantiles (approximate)':<30}" + "".join(f"{k:>10}" for k in keys)]
    for m in METRICS:
        for part in ("all", "kept"):
            q = summary["quantiles"][m.name][part]
            if q is None:
                continue
            cells = [f"{q['n']:,}"] + [_num(q[k], m.integer and k != "mean") for k in keys[1:]]
            lines.append(f"  {m.name + ' ' + part:<28}" + "".join(f"{c:>10}" for c in cells))
    return lines + [""]


def report(summary: dict) -> int:
    """Print the summary as a readable table (stdout; notes on stderr). Returns 0."""
    rows = summary["rows"]
    lines = [f"stats: {rows:,} rows in {summary['files']} parquet files ({summary.get('ledger', '')})",
             f"  {'kept':<28} {summary['kept']:>13,} {_pct(summary['kept'], rows)}",
             f"  {'dropped':<28} {summary['dropped']:>13,} {_pct(summary['dropped'], rows)}", "",
             f"{'dropped, by reason':<30} {'rows':>13} {'% of input':>10}"]
    lines += [f"  {r['reason']:<28} {r['rows']:>13,} {_pct(r['rows'], rows)}" for r in summary["by_reason"]]
    lines.append("")
    if summary["by_error_class"]["top"]:
        lines += _table_top("crawl error_class", summary["by_error_class"], rows)
    if summary["by_language"]["top"]:
        lines += _table_top(f"language (top {len(summary['by_language']['top'])})", summary["by_language"], rows)
    lines += _table_quantiles(summary)
    terms = summary.get("terms")
    if terms:
        lines.append(f"{'metadata terms':<30} {'matched':>13} {'kept':>13}   ({terms['terms']:,} terms)")
        lines += [f"  {t['term']:<28} {t['matches_before']:>13,} {t['kept_after']:>13,}" for t in terms["top"]]
        lines.append("")
    if summary.get("plots") is not None:
        lines.append(f"plots: {', '.join(summary['plots']) or 'none'} + {STATS_JSON}")
    print("\n".join(lines).rstrip(), flush=True)
    for note in summary["notes"]:
        print(f"stats: note: {note}", file=sys.stderr, flush=True)
    return 0


def main(argv=None) -> int:
    cli = CLI(StatsConfig, prog="clipforge stats", description=__doc__.split("\n")[0])
    return run_main(cli, argv, lambda cfg: report(run(cfg)), (StatsError,), prefix="stats")


if __name__ == "__main__":
    raise SystemExit(main())
