"""Deduplication at crawl scale: the filter stage's global duplicate steps, all work in DuckDB or streamed per part.

Reads  a DuckDB relation of the current survivors (a view name; columns key, shard, part_row, sha256, pair_sha256,
       phash, ...) and, for the semantic step, the image embeddings of each part through a loader
       `embeddings(shard_id) -> [rows of part, D]` (row i = part_row i; FILTER_DIR/emb/img-NNNNN.npy, mmap).
Writes one parquet of drops per step: exactly the columns key, shard, reason, detail, duplicate_of (strings),
       sorted by shard then key; the semantic step also writes (key, shard, part_row, cluster) for every survivor.
       Every file is written atomically (trainer.clip.formats.atomic): a rerun replaces it, a crash leaves the old.

The kept representative of a group is its smallest key, and every dropped row names it in `duplicate_of`:

- exact (`exact_duplicates`): rows with the same value of one column (sha256 of the image bytes, or of the pair);
- near (`near_duplicates`): rows whose 64-bit pHashes are within `near_hamming` (h) bits. Identical hashes are
  collapsed first (a blank image's million copies are one node, linked to its min key without any pair). Candidate
  pairs of the N distinct hashes come from multi-index hashing (Norouzi, Punjani & Fleet, CVPR 2012): the 64 bits
  are split into m contiguous bands and each hash probes, per band, every band value within r bits of its own (the
  XOR with each of the band's sum_{i<=r} C(width, i) masks of weight <= r), joined against the exact band values.
  Generalised pigeonhole: a pair within h bits differs by <= r bits on some band when m * (r + 1) > h, so then
  nothing within the threshold is missed. Each candidate is verified with bit_count(xor(a, b)) <= h.
  The scheme (`choose_scheme`, when near_bands = 0 and near_probe_radius = -1) is picked from h and N (counted
  first): among the radii r with the fewest covering bands m = h // (r + 1) + 1 and at most MAX_AUTO_PROBES probes
  per hash, the least expected work per hash, probes + expected candidates (sum over bands of probes * (N - 1) /
  2^width, uniform hashes). Small N gives the exact h + 1 bands (r = 0: 5 probes at h = 4); larger N wider bands
  with r >= 1, whose buckets stay nearly empty (h = 4: 3 bands of ~21 bits, r = 1, 67 probes from N ~ 90k; 2 bands
  of 32 bits, r = 2, 1,058 probes from N ~ 38M, ~0.1 hash a bucket at N = 400M). Explicit bands with radius -1
  take the smallest covering radius (lowered, with a warning, to keep MAX_AUTO_PROBES); an explicit radius with
  bands 0 takes the fewest covering bands; an explicit pair with m * (r + 1) <= h warns (recall not guaranteed).
  A band bucket holding more than `near_max_bucket` distinct hashes takes no part in that band (it would be
  quadratic): its hashes are compared only through their exact-hash members and through their other bands, so a
  pair within the threshold that meets only in an oversized bucket is missed; `stats` counts those buckets and
  their hashes. Verified pairs are an edge table; connected components come from min-label hooking with pointer
  jumping in DuckDB (chains a~b~c are one group even where a and c are further apart than the threshold), and the
  rep is the component's min key;
- semantic (`semantic_duplicates`, SemDeDup, Abbas et al. 2023): seeded spherical faiss k-means on a seeded sample
  of the embeddings, every survivor assigned to its nearest centroid part by part, then per cluster (streamed in
  cluster, key order) members are visited by key: a member whose cosine with an earlier *kept* member exceeds the
  threshold is dropped naming the most similar such member, so the smallest key of a set of near-copies is kept.
  Similarities are computed in blocks (never a full N x N); one cluster's embeddings are held at a time.

Rerunning a step with the same survivors, config and seed gives the same files.
"""
from __future__ import annotations

import io
import math
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.common import sql_str
from trainer.clip.flags import opt, require
from trainer.clip.formats.atomic import atomic_write
from trainer.clip.formats.ledger import REASONS

DROP_SCHEMA = pa.schema([(c, pa.string()) for c in ("key", "shard", "reason", "detail", "duplicate_of")])
CLUSTER_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("part_row", pa.int32()),
                            ("cluster", pa.int32())])
MAX_CC_ITERATIONS = 100    # component rounds before giving up (hooking + pointer jumping: ~log of a chain)
SIM_BLOCK = 2048           # members per similarity block (a block x block float32 matrix at a time)
GROUP_ROWS = 65_536        # survivors per group of consecutive clusters whose embeddings are loaded together
KMEANS_ITERATIONS = 20
MAX_AUTO_PROBES = 2048     # probes per hash (all bands) an automatic scheme stays within
MAX_PROBES = 1 << 16       # probes per hash an explicit (bands, radius) may ask for
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


@dataclass
class DedupConfig:
    """Duplicate removal: exact (sha256), near (pHash within a Hamming distance), semantic (SemDeDup)."""
    exact_image: bool = opt(True, help="drop rows whose image bytes have the same sha256 (the smallest key stays)")
    exact_pair: bool = opt(True, help="drop rows with the same sha256 of (url, caption) (the smallest key stays)")
    near_dup: bool = opt(False, help="drop near-duplicate images: pHashes within --near-hamming bits")
    near_hamming: int = opt(4, help="max Hamming distance (inclusive) between two near-duplicate pHashes")
    near_bands: int = opt(0, help="bands the 64 pHash bits are split into for the candidate search (0: chosen "
                                  "with --near-probe-radius from --near-hamming and the number of distinct hashes)")
    near_probe_radius: int = opt(-1, help="per band, probe every band value within this many bits (-1: with "
                                          "--near-bands 0 chosen with the bands, else the smallest radius that "
                                          "finds every pair within --near-hamming)")
    near_max_bucket: int = opt(1000, help="a band bucket with more distinct pHashes than this adds no candidate "
                                          "pairs (only identical hashes and other bands link its members)")
    semantic_dup: bool = opt(False, help="drop semantic duplicates (SemDeDup over the CLIP image embeddings)")
    semantic_clusters: int = opt(0, help="k-means clusters for semantic dedup (0: about sqrt(survivors))")
    semantic_threshold: float = opt(0.95, help="cosine above which two images of one cluster are duplicates")
    semantic_sample: int = opt(200_000, help="embeddings sampled (seeded) to train the k-means")
    dedup_seed: int = opt(0, help="seed of the k-means sample and training")

    def __post_init__(self):
        require(self, "near_hamming", 0 <= self.near_hamming < 64, "must be in [0, 63]")
        require(self, "near_bands", 0 <= self.near_bands <= 64, "must be in [0, 64] (0: automatic)")
        require(self, "near_probe_radius", -1 <= self.near_probe_radius <= 64, "must be in [-1, 64] (-1: automatic)")
        require(self, "near_max_bucket", self.near_max_bucket >= 2, "must be >= 2")
        require(self, "semantic_clusters", self.semantic_clusters >= 0, "must be >= 0 (0: about sqrt(rows))")
        require(self, "semantic_threshold", 0 < self.semantic_threshold <= 1, "must be in (0, 1]")
        require(self, "semantic_sample", self.semantic_sample >= 1, "must be >= 1")
        require(self, "dedup_seed", self.dedup_seed >= 0, "must be >= 0")
        if self.near_bands or self.near_probe_radius >= 0:  # an explicit scheme: known without the hash count
            bands, radius = self.scheme(0)
            probes = probes_per_row(bands, radius)
            require(self, "near_probe_radius", probes <= MAX_PROBES,
                    f"{radius} with {bands} bands probes {probes:,} values per hash, more than {MAX_PROBES:,}")
            if self.near_dup and bands * (radius + 1) <= self.near_hamming:
                warnings.warn(f"--near-bands {bands} with --near-probe-radius {radius} does not cover "
                              f"--near-hamming {self.near_hamming} (bands * (radius + 1) <= hamming): pairs within "
                              f"the threshold that differ by more than {radius} bits on every band are missed",
                              stacklevel=2)

    def scheme(self, n: int) -> tuple[int, int]:
        """(bands, probe radius) of the candidate search over n distinct hashes (see the module docstring)."""
        h, bands, radius = self.near_hamming, self.near_bands, self.near_probe_radius
        if bands and radius < 0:
            radius = h // bands
            while radius and probes_per_row(bands, radius) > MAX_AUTO_PROBES:
                radius -= 1
        elif radius >= 0 and not bands:
            bands = h // (radius + 1) + 1
        return (bands, radius) if bands else choose_scheme(h, n)


# ------------------------------------------------------------------------------------------------ helpers
def _relation(con, survivors: str, columns: tuple[str, ...]) -> None:
    """ValueError unless `survivors` is a plain relation name holding `columns`."""
    if not _NAME.fullmatch(survivors):
        raise ValueError(f"survivors must be a table or view name, got {survivors!r}")
    have = set(con.sql(f"SELECT * FROM {survivors} LIMIT 0").columns)
    missing = [c for c in columns if c not in have]
    if missing:
        raise ValueError(f"survivors relation {survivors!r} lacks columns {missing} (has {sorted(have)})")


def _copy(con, query: str, out: str | Path) -> int:
    """The rows of `query` ordered by shard, key, streamed to parquet `out` (DROP_SCHEMA: nullable strings, whatever
    the data) atomically; the number of rows written."""
    written = [0]

    def write(tmp: str) -> None:
        reader = con.sql(f"SELECT * FROM ({query}) ORDER BY shard, key").to_arrow_reader(GROUP_ROWS)
        with pq.ParquetWriter(tmp, DROP_SCHEMA) as writer:
            for batch in reader:
                writer.write_table(pa.Table.from_batches([batch]).cast(DROP_SCHEMA))
                written[0] += batch.num_rows

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, write)
    return written[0]


def _drop_select(rows: str, reason: str, detail: str, rep: str) -> str:
    return (f"SELECT CAST(key AS VARCHAR) AS key, CAST(shard AS VARCHAR) AS shard, '{reason}' AS reason, "
            f"CAST({detail} AS VARCHAR) AS detail, CAST({rep} AS VARCHAR) AS duplicate_of FROM {rows}")


def phash64(image_bytes: bytes) -> int | None:
    """imagehash.phash (8x8 DCT bits) of the decoded image as a signed int64; None if it does not decode."""
    import imagehash
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image_bytes)) as img:
            img.draft("L", (128, 128))  # JPEG: decode grey at a reduced scale (still >= 128 px; phash uses 32 px)
            bits = imagehash.phash(img).hash.ravel()
    except Exception:  # truncated, corrupt, unsupported, decompression bomb: no hash, the row is kept unhashed
        return None
    return int.from_bytes(np.packbits(bits).tobytes(), "big", signed=True)


# ------------------------------------------------------------------------------------------------ exact
def exact_duplicates(con, survivors: str, column: str, reason: str, out: Path) -> int:
    """Rows sharing a non-null `column` value: the smallest key stays, the others are dropped naming it."""
    require_reason(reason)
    if not _NAME.fullmatch(column) or "." in column:
        raise ValueError(f"column must be a plain column name, got {column!r}")
    _relation(con, survivors, ("key", "shard", column))
    rows = (f"(SELECT s.key, s.shard, r.rep FROM {survivors} s JOIN "
            f"(SELECT \"{column}\" AS v, min(key) AS rep FROM {survivors} WHERE \"{column}\" IS NOT NULL "
            f"GROUP BY 1 HAVING count(*) > 1) r ON s.\"{column}\" = r.v WHERE s.key <> r.rep)")
    return _copy(con, _drop_select(rows, reason, f"'same {column} as ' || rep", "rep"), out)


def require_reason(reason: str) -> None:
    if reason not in REASONS:
        raise ValueError(f"reason {reason!r} is not one of trainer.clip.formats.ledger.REASONS")


# ------------------------------------------------------------------------------------------------ near
def band_layout(bands: int) -> list[tuple[int, int]]:
    """(shift, width) of each band: `bands` contiguous bit ranges covering the 64 bits, widths differing by <= 1."""
    if not 1 <= bands <= 64:
        raise ValueError(f"bands must be in [1, 64], got {bands}")
    widths = [64 // bands + (i < 64 % bands) for i in range(bands)]
    return [(sum(widths[:i]), w) for i, w in enumerate(widths)]


def _band_value(col: str, shift: int, width: int) -> str:
    if width == 64:
        return col
    return f"(({col} >> {shift}) & {(1 << width) - 1})"  # arithmetic shift: the mask drops the sign fill


def band_probes(width: int, radius: int) -> int:
    """Band values within `radius` bits of one value of a `width`-bit band: sum_{i <= radius} C(width, i)."""
    return sum(math.comb(width, i) for i in range(min(radius, width) + 1))


def probes_per_row(bands: int, radius: int) -> int:
    """Probes one hash makes over all bands of band_layout(bands) at `radius`."""
    return sum(band_probes(w, radius) for _, w in band_layout(bands))


def choose_scheme(hamming: int, n: int, max_probes: int = MAX_AUTO_PROBES) -> tuple[int, int]:
    """The automatic (bands, radius) for n distinct hashes and a threshold of `hamming` bits: for each radius r,
    the fewest bands that cover it (m = hamming // (r + 1) + 1, so m * (r + 1) > hamming); of those within
    max_probes probes per hash (r = 0 always is), the least expected work per hash, probes + expected candidates
    (sum over bands of probes * (n - 1) / 2^width for uniform hashes); a tie goes to the smaller radius."""
    if not 0 <= hamming < 64 or n < 0:
        raise ValueError(f"need hamming in [0, 63] and n >= 0, got {hamming}, {n}")
    best: tuple[float, int, int] | None = None
    for radius in range(hamming + 1):
        bands = hamming // (radius + 1) + 1
        layout = band_layout(bands)
        probes = sum(band_probes(w, radius) for _, w in layout)
        if radius and probes > max_probes:
            continue
        work = probes + sum(band_probes(w, radius) * max(n - 1, 0) / 2.0 ** w for _, w in layout)
        if best is None or work < best[0]:
            best = (work, bands, radius)
    return best[1], best[2]


def _masks(width: int, radius: int) -> str:
    """The relation (mask) of every BIGINT with at most `radius` of bits 0..width-1 set (bit 63 is the sign)."""
    bit = "CASE WHEN b = 63 THEN (-9223372036854775807 - 1) ELSE (1::BIGINT << b) END"
    return (f"(WITH RECURSIVE m(mask, top, k) AS (SELECT 0::BIGINT, -1, 0 UNION ALL SELECT m.mask | {bit}, b, "
            f"m.k + 1 FROM m, range(0, {width}) r(b) WHERE b > m.top AND m.k < {radius}) SELECT mask FROM m)")


def _buckets(hashes: str, shift: int, width: int) -> str:
    """The relation (v, n): each band value of the hashes (column h of `hashes`) and how many hold it."""
    return f"(SELECT {_band_value('h', shift, width)} AS v, count(*) AS n FROM {hashes} GROUP BY 1)"


def _members(hashes: str, buckets: str, shift: int, width: int, lo: int, max_bucket: int) -> str:
    """The relation (h, v) of the hashes whose band value's bucket holds lo..max_bucket hashes."""
    return (f"(SELECT x.h, x.v FROM (SELECT h, {_band_value('h', shift, width)} AS v FROM {hashes}) x "
            f"SEMI JOIN {buckets} k ON x.v = k.v AND k.n BETWEEN {lo} AND {max_bucket})")


def _probe_pairs(members: str, masks: str, band: int) -> str:
    """Candidate pairs (band, a, b), a < b: b's band value is a's XOR one of the masks (each pair once a band)."""
    return (f"(SELECT {band} AS band, q.h AS a, y.h AS b FROM (SELECT x.h, xor(x.v, p.mask) AS pv FROM {members} x "
            f"CROSS JOIN {masks} p) q JOIN {members} y ON y.v = q.pv AND q.h < y.h)")


def candidate_pairs(con, hashes: str, cfg: DedupConfig, scheme: tuple[int, int] | None = None):
    """The relation of candidate pairs (band, a, b) over the distinct hashes in column h of `hashes` (lazy: what
    near_duplicates verifies; a pair within the radius on k bands appears k times). `scheme`: (bands, radius),
    by default cfg.scheme(number of hashes)."""
    if scheme is None:
        scheme = cfg.scheme(con.execute(f"SELECT count(*) FROM {hashes}").fetchall()[0][0])
    bands, radius = scheme
    lo = 2 if radius == 0 else 1  # exact bands: a lone hash in its bucket has no candidate
    parts = [f"(WITH bk AS {_buckets(hashes, s, w)}, mem AS {_members(hashes, 'bk', s, w, lo, cfg.near_max_bucket)}, "
             f"pm AS {_masks(w, radius)} SELECT * FROM {_probe_pairs('mem', 'pm', i)})"
             for i, (s, w) in enumerate(band_layout(bands))]
    return con.sql(" UNION ALL ".join(f"SELECT * FROM {p}" for p in parts))


def _band_edges(con, t: str, band: int, layout: tuple[int, int], radius: int, cfg: DedupConfig,
                stats: dict) -> None:
    """Append the verified pairs of one band to {t}raw; count its candidates and oversized buckets in stats."""
    (shift, width), cap = layout, cfg.near_max_bucket
    lo = 2 if radius == 0 else 1
    con.execute(f"CREATE OR REPLACE TEMP TABLE {t}bk AS SELECT * FROM {_buckets(f'{t}nodes', shift, width)}")
    con.execute(f"CREATE OR REPLACE TEMP TABLE {t}pm AS SELECT * FROM {_masks(width, radius)}")
    con.execute(f"CREATE OR REPLACE TEMP TABLE {t}bv AS SELECT * FROM "
                f"{_members(f'{t}nodes', f'{t}bk', shift, width, lo, cap)}")
    over, over_hashes = con.execute(f"SELECT count(*), coalesce(sum(n), 0) FROM {t}bk WHERE n > {cap}").fetchall()[0]
    # candidates from the bucket sizes: ordered (x, y) pairs over the probed buckets, less each hash with itself
    ok = f"(SELECT v, n FROM {t}bk WHERE n BETWEEN {lo} AND {cap})"
    ordered, self_pairs = con.execute(
        f"SELECT coalesce(sum(x.n * y.n), 0), (SELECT coalesce(sum(n), 0) FROM {ok}) FROM (SELECT k.n, "
        f"xor(k.v, p.mask) AS pv FROM {ok} k CROSS JOIN {t}pm p) x JOIN {ok} y ON y.v = x.pv").fetchall()[0]
    stats["oversized_buckets"] += int(over)
    stats["oversized_hashes"] += int(over_hashes)
    stats["candidate_pairs"] += (int(ordered) - int(self_pairs)) // 2
    con.execute(f"INSERT INTO {t}raw SELECT a, b FROM {_probe_pairs(f'{t}bv', f'{t}pm', band)} "
                f"WHERE bit_count(xor(a, b)) <= {cfg.near_hamming}")


def _near_edges(con, t: str, cfg: DedupConfig, stats: dict) -> None:
    """{t}edges(a, b): distinct verified pairs of distinct hashes within near_hamming bits, found with the
    scheme cfg.scheme(nodes) (recorded in stats with its probes, candidates and oversized buckets)."""
    bands, radius = cfg.scheme(stats["nodes"])
    stats.update(bands=bands, radius=radius, probes_per_row=probes_per_row(bands, radius), candidate_pairs=0,
                 oversized_buckets=0, oversized_hashes=0)
    con.execute(f"CREATE OR REPLACE TEMP TABLE {t}raw (a BIGINT, b BIGINT)")
    for band, layout in enumerate(band_layout(bands)):
        _band_edges(con, t, band, layout, radius, cfg, stats)
    con.execute(f"CREATE OR REPLACE TEMP TABLE {t}edges AS SELECT DISTINCT a, b FROM {t}raw")
    for name in ("raw", "bk", "pm", "bv"):
        con.execute(f"DROP TABLE IF EXISTS {t}{name}")
    stats["verified_pairs"] = con.execute(f"SELECT count(*) FROM {t}edges").fetchall()[0][0]


def _components(con, t: str, max_iterations: int) -> int:
    """{t}ids(h, k, id): hashes with an edge, id = rank of their min key; {t}lab(id, label): the smallest id of
    the node's component. Labels are parent pointers (label <= id, in the same component), lowered each round by
    hooking (for an edge u-v, both u and u's parent take v's parent if smaller) and one pointer jump (a node takes
    its parent's parent), until no label changes. Returns the rounds it took."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE {t}ids AS SELECT h, k, (row_number() OVER (ORDER BY k, h) - 1) "
                f"AS id FROM {t}nodes WHERE h IN (SELECT a FROM {t}edges UNION SELECT b FROM {t}edges)")
    con.execute(f"CREATE OR REPLACE TEMP TABLE {t}e AS WITH d AS (SELECT x.id AS a, y.id AS b FROM {t}edges "
                f"JOIN {t}ids x ON {t}edges.a = x.h JOIN {t}ids y ON {t}edges.b = y.h) "
                f"SELECT a, b FROM d UNION ALL SELECT b, a FROM d")
    con.execute(f"CREATE OR REPLACE TEMP TABLE {t}lab AS SELECT id, id AS label FROM {t}ids")
    for rounds in range(1, max_iterations + 1):
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {t}new AS "
            f"WITH ev AS (SELECT e.a, pu.label AS pa, pv.label AS pb FROM {t}e e JOIN {t}lab pu ON e.a = pu.id "
            f"JOIN {t}lab pv ON e.b = pv.id), "
            f"prop AS (SELECT id, min(q) AS q FROM (SELECT pa AS id, pb AS q FROM ev UNION ALL "
            f"SELECT a, pb FROM ev) GROUP BY id), "
            f"hooked AS (SELECT l.id, least(l.label, coalesce(prop.q, l.label)) AS label FROM {t}lab l "
            f"LEFT JOIN prop ON prop.id = l.id) "
            f"SELECT x.id, y.label FROM hooked x JOIN hooked y ON x.label = y.id")
        changed = con.execute(f"SELECT count(*) FROM {t}new n JOIN {t}lab o USING (id) "
                              f"WHERE n.label <> o.label").fetchall()[0][0]
        con.execute(f"CREATE OR REPLACE TEMP TABLE {t}lab AS SELECT * FROM {t}new")
        if not changed:
            return rounds
    raise RuntimeError(f"near-duplicate components did not converge in {max_iterations} rounds of label "
                       f"propagation ({changed} labels still changing)")


def near_duplicates(con, survivors: str, cfg: DedupConfig, out: Path, stats: dict | None = None,
                    max_iterations: int = MAX_CC_ITERATIONS) -> int:
    """Rows whose pHashes link within near_hamming bits (transitively): the component's smallest key stays.
    `stats` (optional) receives nodes, bands, radius, probes_per_row, candidate_pairs, verified_pairs,
    oversized_buckets, oversized_hashes, rounds."""
    _relation(con, survivors, ("key", "shard", "phash"))
    stats = stats if stats is not None else {}
    t = "__clipforge_near_"
    try:
        con.execute(f"CREATE OR REPLACE TEMP TABLE {t}nodes AS SELECT phash AS h, min(key) AS k, count(*) AS n "
                    f"FROM {survivors} WHERE phash IS NOT NULL GROUP BY phash")
        stats["nodes"] = con.execute(f"SELECT count(*) FROM {t}nodes").fetchall()[0][0]
        _near_edges(con, t, cfg, stats)
        stats["rounds"] = _components(con, t, max_iterations)
        # every hash that drops something: its component's rep (min key, and that key's hash)
        con.execute(f"CREATE OR REPLACE TEMP TABLE {t}aff AS SELECT n.h, coalesce(r.k, n.k) AS rk, "
                    f"coalesce(r.h, n.h) AS rh FROM {t}nodes n LEFT JOIN {t}ids i ON i.h = n.h "
                    f"LEFT JOIN {t}lab l ON l.id = i.id LEFT JOIN {t}ids r ON r.id = l.label "
                    f"WHERE n.n > 1 OR i.h IS NOT NULL")
        rows = (f"(SELECT s.key, s.shard, a.rk, bit_count(xor(s.phash, a.rh)) AS d FROM {survivors} s "
                f"JOIN {t}aff a ON s.phash = a.h WHERE s.key <> a.rk)")
        detail = (f"'phash distance ' || CAST(d AS VARCHAR) || ' to ' || rk || CASE WHEN d > {cfg.near_hamming} "
                  f"THEN ' (linked through near-duplicates within {cfg.near_hamming})' ELSE '' END")
        return _copy(con, _drop_select(rows, "near_duplicate", detail, "rk"), out)
    finally:
        for name in ("nodes", "raw", "bk", "pm", "bv", "edges", "ids", "e", "lab", "new", "aff"):
            con.execute(f"DROP TABLE IF EXISTS {t}{name}")


# ------------------------------------------------------------------------------------------------ semantic
def shard_id(shard: str) -> int:
    """The part number of a crawl tar name: "00012.tar" -> 12."""
    m = re.fullmatch(r"(\d+)\.tar", shard or "")
    if not m:
        raise ValueError(f"shard {shard!r} is not a crawl tar name NNNNN.tar: cannot find its embeddings")
    return int(m.group(1))


class _Embeddings:
    """Rows of the parts' embeddings as float32, L2-normalised again (float16 rounding), checked against the part;
    the last `keep` loaded parts are cached (mmaps are cheap to hold)."""

    def __init__(self, load: Callable[[int], np.ndarray], keep: int = 64):
        self.load, self.keep, self.parts, self.dim = load, keep, OrderedDict(), None

    def rows(self, shard: str, part_rows: np.ndarray) -> np.ndarray:
        sid = shard_id(shard)
        emb = self.parts.get(sid)
        if emb is None:
            emb = self.parts[sid] = self.load(sid)
            if len(self.parts) > self.keep:
                self.parts.popitem(last=False)
            if getattr(emb, "ndim", 0) != 2 or (self.dim is not None and emb.shape[1] != self.dim):
                raise ValueError(f"embeddings of part {sid}: shape {getattr(emb, 'shape', None)}, expected "
                                 f"[rows, {self.dim or 'D'}]")
            self.dim = emb.shape[1]
        self.parts.move_to_end(sid)
        if len(part_rows) and (part_rows.min() < 0 or part_rows.max() >= len(emb)):
            raise ValueError(f"part {sid} has {len(emb)} embedding rows, survivors reference part_row "
                             f"{int(part_rows.max())}")
        x = np.asarray(emb[part_rows], dtype=np.float32)
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)

    def table_rows(self, table: pa.Table) -> np.ndarray:
        """Embeddings of a table's (shard, part_row) rows, in the table's order, loading each part once."""
        shards = np.asarray(table.column("shard").to_pylist(), dtype=object)
        part_rows = table.column("part_row").to_numpy().astype(np.int64)
        order = np.lexsort((part_rows, shards.astype(str)))
        out = None
        bounds = np.flatnonzero(shards[order][1:] != shards[order][:-1]) + 1
        for run in np.split(order, bounds):
            x = self.rows(shards[run[0]], part_rows[run])
            if out is None:
                out = np.zeros((len(table), x.shape[1]), np.float32)
            out[run] = x
        return out if out is not None else np.zeros((0, self.dim or 1), np.float32)


def _train_centroids(sample: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Spherical k-means centroids [k, D] (faiss, seeded)."""
    if k == 1:
        c = sample.mean(axis=0, keepdims=True)
        return c / max(float(np.linalg.norm(c)), 1e-12)
    import faiss

    km = faiss.Kmeans(sample.shape[1], k, niter=KMEANS_ITERATIONS, seed=seed, spherical=True, verbose=False,
                      min_points_per_centroid=1)
    km.train(np.ascontiguousarray(sample, dtype=np.float32))
    return np.asarray(km.centroids, dtype=np.float32)


def _assign(con, survivors: str, centroids: np.ndarray, emb: _Embeddings, tmp: str) -> np.ndarray:
    """Write (key, shard, part_row, cluster) of every survivor to `tmp`, streamed in part order; cluster sizes."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids))
    sizes = np.zeros(len(centroids), np.int64)
    reader = con.sql(f"SELECT CAST(key AS VARCHAR) AS key, CAST(shard AS VARCHAR) AS shard, "
                     f"CAST(part_row AS INTEGER) AS part_row FROM {survivors} ORDER BY shard, part_row") \
        .to_arrow_reader(GROUP_ROWS)
    with pq.ParquetWriter(tmp, CLUSTER_SCHEMA) as writer:
        for batch in reader:
            table = pa.Table.from_batches([batch])
            if not len(table):
                continue
            _, ids = index.search(emb.table_rows(table), 1)
            cluster = ids[:, 0].astype(np.int32)
            sizes += np.bincount(cluster, minlength=len(sizes))
            writer.write_table(table.append_column("cluster", pa.array(cluster, pa.int32())).cast(CLUSTER_SCHEMA))
    return sizes


def _best_kept(x: np.ndarray, emb: np.ndarray, kept: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row of x: the highest cosine with a kept row of emb (kept mask), and which row; block by block."""
    best, who = np.full(len(x), -np.inf, np.float32), np.full(len(x), -1, np.int64)
    idx = np.flatnonzero(kept)
    for c in range(0, len(idx), block):
        ids = idx[c:c + block]
        sims = x @ emb[ids].T
        j = sims.argmax(axis=1)
        v = sims[np.arange(len(x)), j]
        better = v > best
        best[better], who[better] = v[better], ids[j[better]]
    return best, who


def semdedup(emb: np.ndarray, threshold: float, block: int = SIM_BLOCK) -> list[tuple[int, int, float]]:
    """SemDeDup within one cluster, members in the given order: a member whose cosine with an earlier kept member
    exceeds `threshold` is dropped. -> [(dropped index, index of the most similar earlier kept member, cosine)].
    Similarities are computed block x block; only members with some similar earlier member are visited one by one."""
    m = len(emb)
    kept, drops = np.zeros(m, bool), []
    earlier = np.tri(min(block, m), k=-1, dtype=bool)
    for s in range(0, m, block):
        x = emb[s:s + block]
        n = len(x)
        best, who = _best_kept(x, emb, kept[:s], block)
        sims = np.where(earlier[:n, :n], x @ x.T, -np.inf)
        local = np.ones(n, bool)
        for i in np.flatnonzero((best > threshold) | (sims > threshold).any(axis=1)):
            row = np.where(local[:i], sims[i, :i], -np.inf)
            b, w = float(best[i]), int(who[i])
            if i and row.max() > b:
                b, w = float(row.max()), s + int(row.argmax())
            if b > threshold:
                local[i] = False
                drops.append((s + int(i), w, b))
        kept[s:s + n] = local
    return drops


def _cluster_groups(reader, group_rows: int) -> Iterator[pa.Table]:
    """Tables of whole consecutive clusters from a stream sorted by cluster, each >= group_rows rows (but the
    last); a cluster bigger than group_rows comes alone."""
    pending: list[pa.Table] = []
    rows = start = 0  # start: where the last (maybe unfinished) cluster begins among the pending rows
    last = None
    for batch in reader:
        cluster = batch.column("cluster").to_numpy()
        if not len(cluster):
            continue
        j = int(np.searchsorted(cluster, cluster[-1], side="left"))
        if j or cluster[-1] != last:
            start = rows + j
        last = cluster[-1]
        pending.append(pa.Table.from_batches([batch]))
        rows += len(cluster)
        if start >= group_rows or (start and rows - start >= group_rows):
            table = pa.concat_tables(pending)
            yield table.slice(0, start)
            pending, rows, start = [table.slice(start)], rows - start, 0
    if rows:
        yield pa.concat_tables(pending)


def _dedup_clusters(con, clusters: Path, emb: _Embeddings, threshold: float, block: int, writer) -> None:
    reader = con.sql(f"SELECT key, shard, part_row, cluster FROM read_parquet({sql_str(clusters)}) "
                     f"ORDER BY cluster, key").to_arrow_reader(GROUP_ROWS)
    for group in _cluster_groups(reader, GROUP_ROWS):
        x = emb.table_rows(group)
        keys, shards = group.column("key").to_pylist(), group.column("shard").to_pylist()
        cluster = group.column("cluster").to_numpy()
        starts = np.flatnonzero(np.r_[True, cluster[1:] != cluster[:-1]])
        out: dict[str, list] = {name: [] for name in DROP_SCHEMA.names}
        for lo, hi in zip(starts, np.r_[starts[1:], len(cluster)]):
            for i, j, sim in semdedup(x[lo:hi], threshold, block):
                out["key"].append(keys[lo + i])
                out["shard"].append(shards[lo + i])
                out["detail"].append(f"cosine {sim:.4f} with {keys[lo + j]} (cluster {cluster[lo]})")
                out["duplicate_of"].append(keys[lo + j])
        out["reason"] = ["semantic_duplicate"] * len(out["key"])
        writer.write_table(pa.table(out, schema=DROP_SCHEMA))


def _sample(con, survivors: str, cfg: DedupConfig, emb: _Embeddings) -> np.ndarray:
    """The seeded training sample: the semantic_sample survivors with the smallest hash(key, seed)."""
    table = con.sql(f"SELECT CAST(shard AS VARCHAR) AS shard, part_row FROM {survivors} "
                    f"ORDER BY hash(key, {cfg.dedup_seed}), key LIMIT {cfg.semantic_sample}").to_arrow_table()
    return emb.table_rows(table)


def semantic_duplicates(con, survivors: str, cfg: DedupConfig, embeddings: Callable[[int], np.ndarray], out: Path,
                        clusters_out: Path, stats: dict | None = None, block: int = SIM_BLOCK) -> int:
    """SemDeDup over the survivors' image embeddings (see the module docstring). Writes the drops to `out` and
    every survivor's (key, shard, part_row, cluster) to `clusters_out`. `stats` (optional) receives rows,
    clusters, sample, largest_cluster."""
    _relation(con, survivors, ("key", "shard", "part_row"))
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    stats = stats if stats is not None else {}
    emb = _Embeddings(embeddings)
    n = con.execute(f"SELECT count(*) FROM {survivors}").fetchall()[0][0]
    stats.update(rows=n, clusters=0, sample=0, largest_cluster=0)
    if n == 0:
        atomic_write(clusters_out, lambda tmp: pq.write_table(CLUSTER_SCHEMA.empty_table(), tmp))
        atomic_write(out, lambda tmp: pq.write_table(DROP_SCHEMA.empty_table(), tmp))
        return 0
    sample = _sample(con, survivors, cfg, emb)
    k = min(cfg.semantic_clusters or max(1, round(math.sqrt(n))), len(sample))
    centroids = _train_centroids(sample, k, cfg.dedup_seed)
    stats.update(clusters=k, sample=len(sample))
    del sample
    sizes = []
    atomic_write(clusters_out, lambda tmp: sizes.append(_assign(con, survivors, centroids, emb, tmp)))
    stats["largest_cluster"] = int(sizes[0].max())
    scratch = Path(out).parent / f".{Path(out).name}.unsorted.parquet"
    scratch.parent.mkdir(parents=True, exist_ok=True)
    try:
        with pq.ParquetWriter(scratch, DROP_SCHEMA) as writer:
            _dedup_clusters(con, Path(clusters_out), emb, cfg.semantic_threshold, block, writer)
        return _copy(con, f"SELECT * FROM read_parquet({sql_str(scratch)})", out)
    finally:
        scratch.unlink(missing_ok=True)

