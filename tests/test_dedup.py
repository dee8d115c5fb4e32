"""pipeline.dedup: exact, near (pHash LSH + components in DuckDB) and semantic (SemDeDup) duplicates."""
import functools
import hashlib
import itertools
import io
import random
import warnings

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from pipeline import dedup
from pipeline.dedup import (DROP_SCHEMA, MAX_AUTO_PROBES, MAX_CC_ITERATIONS, DedupConfig, _cluster_groups, _components,
                            band_layout, band_probes, candidate_pairs, choose_scheme, exact_duplicates,
                            near_duplicates, phash64, probes_per_row, semantic_duplicates, semdedup)

SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("part_row", pa.int32()),
                    ("sha256", pa.string()), ("pair_sha256", pa.string()), ("phash", pa.int64())])


def survivors(con, tmp_path, rows: list[dict], name="survivors"):
    """A view over a parquet of rows (missing columns null)."""
    path = tmp_path / f"{name}.parquet"
    pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in SCHEMA.names} for r in rows], schema=SCHEMA), path)
    con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet('{path}')")
    return name


def drops(path) -> dict[str, dict]:
    table = pq.read_table(path)
    assert table.schema == DROP_SCHEMA
    rows = table.to_pylist()
    assert [(r["shard"], r["key"]) for r in rows] == sorted((r["shard"], r["key"]) for r in rows)
    return {r["key"]: r for r in rows}


def u64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


# ------------------------------------------------------------------------------------------------ config
def test_config_validates_and_defaults():
    assert DedupConfig().scheme(1000) == (5, 0) and DedupConfig(near_hamming=10).scheme(100) == (11, 0)
    assert DedupConfig(near_bands=8).scheme(10 ** 9) == (8, 0)  # explicit bands: the smallest covering radius
    assert DedupConfig(near_bands=2).scheme(10) == (2, 2) and DedupConfig(near_bands=3).scheme(10) == (3, 1)
    assert DedupConfig(near_probe_radius=1).scheme(10) == (3, 1)  # explicit radius: the fewest covering bands
    assert DedupConfig(near_hamming=6, near_probe_radius=2).scheme(10) == (3, 2)
    assert DedupConfig(near_bands=3, near_probe_radius=0).scheme(10 ** 9) == (3, 0)
    for bad in ({"near_hamming": 64}, {"near_bands": 65}, {"near_max_bucket": 1}, {"semantic_threshold": 0},
                {"semantic_sample": 0}, {"semantic_clusters": -1}, {"near_probe_radius": -2},
                {"near_probe_radius": 65}, {"near_bands": 1, "near_probe_radius": 6}):
        with pytest.raises(ValueError, match="--" + next(reversed(bad)).replace("_", "-")):
            DedupConfig(**bad)
    with pytest.raises(ValueError, match="probes 83,278,001 values"):  # C(64, <= 6)
        DedupConfig(near_bands=1, near_probe_radius=6)
    with pytest.warns(UserWarning, match="missed"):
        DedupConfig(near_dup=True, near_hamming=6, near_bands=4, near_probe_radius=0)
    with pytest.warns(UserWarning, match="does not cover --near-hamming 10"):  # radius 10 capped to 1 (65 probes)
        assert DedupConfig(near_dup=True, near_hamming=10, near_bands=1).scheme(10) == (1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DedupConfig(near_dup=True, near_hamming=6, near_bands=7)
        DedupConfig(near_dup=True, near_hamming=6, near_bands=4)  # radius 1: 4 * 2 > 6
        DedupConfig(near_dup=True, near_hamming=4, near_bands=2, near_probe_radius=2)
        DedupConfig(near_dup=False, near_hamming=6, near_bands=4, near_probe_radius=0)  # off: no warning


def test_choose_scheme_by_hamming_and_size():
    """Exact bands (radius 0) for few hashes; at LAION scale wider bands with probing, buckets nearly empty."""
    for hamming in range(9):
        for n in (0, 1, 500):
            assert choose_scheme(hamming, n) == (hamming + 1, 0)
    bands, radius = choose_scheme(4, 400_000_000)
    assert radius >= 1 and bands * (radius + 1) > 4 and probes_per_row(bands, radius) <= MAX_AUTO_PROBES
    assert 400_000_000 / 2 ** min(w for _, w in band_layout(bands)) <= 8  # expected hashes per probed bucket
    for hamming in range(1, 12):
        radii = []
        for n in (10 ** 3, 10 ** 5, 10 ** 7, 4 * 10 ** 8, 10 ** 10):
            bands, radius = choose_scheme(hamming, n)
            assert bands * (radius + 1) > hamming and probes_per_row(bands, radius) <= MAX_AUTO_PROBES
            radii.append(radius)
        assert radii == sorted(radii) and radii[-1] >= (hamming > 1), (hamming, radii)  # h = 1: 2 x 32 bits suffice
    assert choose_scheme(2, 400_000_000) == (2, 1)  # the DataComp preset's threshold: 66 probes a hash
    with pytest.raises(ValueError):
        choose_scheme(64, 10)


@pytest.mark.parametrize("width, radius", [(13, 0), (21, 1), (32, 2), (64, 2), (5, 7)])
def test_probe_masks(width, radius):
    con = duckdb.connect()
    got = [m for (m,) in con.execute(f"SELECT mask FROM {dedup._masks(width, radius)}").fetchall()]
    expect = {u64(sum(1 << b for b in bits)) for k in range(min(radius, width) + 1)
              for bits in itertools.combinations(range(width), k)}
    assert len(got) == len(expect) == band_probes(width, radius) and set(got) == expect


def test_band_layout_covers_64_bits():
    for bands in (1, 5, 7, 11, 64):
        layout = band_layout(bands)
        assert len(layout) == bands and layout[0][0] == 0
        assert all(s + w == layout[i + 1][0] for i, (s, w) in enumerate(layout[:-1]))
        assert sum(w for _, w in layout) == 64 and max(w for _, w in layout) - min(w for _, w in layout) <= 1


# ------------------------------------------------------------------------------------------------ exact
def test_exact_duplicates(tmp_path):
    con = duckdb.connect()
    rows = [{"key": "k05", "shard": "00001.tar", "sha256": "A"}, {"key": "k02", "shard": "00000.tar", "sha256": "A"},
            {"key": "k09", "shard": "00000.tar", "sha256": "A"},  # a chain of 3: both name k02
            {"key": "k01", "shard": "00002.tar", "sha256": "B"}, {"key": "k07", "shard": "00000.tar", "sha256": "B"},
            {"key": "k03", "shard": "00000.tar", "sha256": "C"},
            {"key": "k04", "shard": "00000.tar", "sha256": None}, {"key": "k06", "shard": "00001.tar"}]
    for r in rows:
        r["pair_sha256"] = "P" if r["key"] in ("k03", "k06") else r["key"]
    view = survivors(con, tmp_path, rows)
    n = exact_duplicates(con, view, "sha256", "duplicate_image", tmp_path / "img.parquet")
    got = drops(tmp_path / "img.parquet")
    assert n == 3 and {k: r["duplicate_of"] for k, r in got.items()} == {"k05": "k02", "k09": "k02", "k07": "k01"}
    assert got["k05"] == {"key": "k05", "shard": "00001.tar", "reason": "duplicate_image",
                          "detail": "same sha256 as k02", "duplicate_of": "k02"}
    assert exact_duplicates(con, view, "pair_sha256", "duplicate_pair", tmp_path / "pair.parquet") == 1
    assert drops(tmp_path / "pair.parquet")["k06"]["duplicate_of"] == "k03"


def test_exact_duplicates_rejects_bad_input(tmp_path):
    con = duckdb.connect()
    view = survivors(con, tmp_path, [{"key": "a", "shard": "00000.tar"}])
    with pytest.raises(ValueError, match="REASONS"):
        exact_duplicates(con, view, "sha256", "duplicate", tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="lacks columns"):
        exact_duplicates(con, view, "url", "duplicate_pair", tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="column name"):
        exact_duplicates(con, view, "sha256; DROP VIEW survivors", "duplicate_image", tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="table or view name"):
        exact_duplicates(con, "(SELECT 1)", "sha256", "duplicate_image", tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


# ------------------------------------------------------------------------------------------------ pHash on images
@functools.lru_cache(maxsize=None)
def glyphs() -> tuple[str, list[str]]:
    from pipeline.sampleweb import emoji_names, font_path

    return str(font_path()), [c for c, _ in emoji_names(400)]


def picture(i: int) -> Image.Image:
    """A distinct picture: random background, shapes and an OpenMoji glyph, softened like a photo."""
    font_file, chars = glyphs()
    rng = random.Random(i)
    img = Image.new("RGB", (256, 256), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = rng.randrange(256), rng.randrange(256)
        box = (x, y, x + rng.randrange(40, 200), y + rng.randrange(40, 200))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(rng.randrange(256) for _ in "rgb"))
    font = ImageFont.truetype(font_file, rng.randrange(100, 180))
    draw.text((rng.randrange(80), rng.randrange(80)), chars[i % len(chars)], font=font, embedded_color=True)
    return img.filter(ImageFilter.GaussianBlur(4))


def encode(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


VARIANTS = {
    "jpeg": lambda im: encode(im, "JPEG", quality=50),
    "small": lambda im: encode(im.resize((154, 154), Image.BILINEAR)),   # 0.6x
    "crop": lambda im: encode(im.crop((3, 3, 253, 253))),                 # ~1% off each side
}


@pytest.fixture(scope="module")
def pictures():
    """150 distinct pictures (key d-NNN) and near-duplicates of the first 40 (key d-NNN-VARIANT), as pHashes."""
    out = {}
    for i in range(150):
        img = picture(i)
        out[f"d-{i:03d}"] = phash64(encode(img))
        if i < 40:
            for name, make in VARIANTS.items():
                out[f"d-{i:03d}-{name}"] = phash64(make(img))
    return out


def test_phash64():
    img = picture(0)
    h = phash64(encode(img))
    assert isinstance(h, int) and -(1 << 63) <= h < (1 << 63)
    assert h == phash64(encode(img)) and h != phash64(encode(picture(1)))
    assert phash64(b"not an image") is None
    assert phash64(encode(img, "JPEG")[:200]) is None  # truncated
    big = Image.new("RGB", (3000, 2000), (10, 200, 30))
    ImageDraw.Draw(big).ellipse((500, 400, 2500, 1800), fill=(200, 20, 20))
    assert phash64(encode(big, "JPEG", quality=90)) is not None  # decoded through draft()


def _near_run(con, tmp_path, hashes: dict, cfg: DedupConfig):
    rows = [{"key": k, "shard": f"{i % 3:05d}.tar", "phash": h} for i, (k, h) in enumerate(sorted(hashes.items()))]
    view = survivors(con, tmp_path, rows)
    stats = {}
    n = near_duplicates(con, view, cfg, tmp_path / "near.parquet", stats=stats)
    got = drops(tmp_path / "near.parquet")
    assert n == len(got)
    return got, stats


@pytest.mark.parametrize("hamming, variants", [(4, ("jpeg", "small")), (8, ("jpeg", "small", "crop"))])
def test_near_duplicate_pictures(tmp_path, pictures, hamming, variants):
    """Re-encoded and resized copies are within the default 4 bits; pHash moves more under a crop (up to ~6 bits
    for 1% a side on these pictures), so crops are tested at 8 bits. No distinct picture is flagged at either."""
    con = duckdb.connect()
    hashes = {k: h for k, h in pictures.items() if k.count("-") == 1 or k.split("-")[2] in variants}
    got, stats = _near_run(con, tmp_path, hashes, DedupConfig(near_dup=True, near_hamming=hamming))
    planted = {k for k in hashes if k.count("-") == 2}
    assert set(got) == planted  # all found, and no distinct picture flagged
    for key, row in got.items():
        assert row["duplicate_of"] == key[:5] and row["reason"] == "near_duplicate"
        assert row["detail"].startswith("phash distance ") and row["detail"].endswith(f" to {key[:5]}")
    assert stats["nodes"] == len(set(hashes.values())) and stats["oversized_buckets"] == 0


def test_near_chain_is_one_component(tmp_path):
    con = duckdb.connect()
    a = 0x0F0F_0000_1234_5678
    b, c = a ^ 0b111, a ^ 0b111 ^ (0b111 << 40)  # a~b (3 bits), b~c (3 bits), a..c 6 bits apart
    far = a ^ ((1 << 64) - 1)
    got, _ = _near_run(con, tmp_path, {"m-b": u64(b), "m-c": u64(c), "m-d": u64(a), "x": u64(far)}, DedupConfig())
    assert set(got) == {"m-c", "m-d"} and {r["duplicate_of"] for r in got.values()} == {"m-b"}
    assert got["m-d"]["detail"] == "phash distance 3 to m-b"
    # a 41-hash chain (1 bit per link: each hash differs from the first by a growing run of bits) with the min
    # key in the middle: one component, everyone names it
    chain = {f"c{((i - 20) * 7) % 41:02d}": u64(a ^ ((1 << i) - 1)) for i in range(41)}  # c00 is link 20
    got, stats = _near_run(con, tmp_path, chain, DedupConfig(near_hamming=1))
    assert set(got) == set(chain) - {"c00"} and {r["duplicate_of"] for r in got.values()} == {"c00"}
    end = f"c{(-20 * 7) % 41:02d}"  # link 0, 20 bits from c00
    assert got[end]["detail"] == "phash distance 20 to c00 (linked through near-duplicates within 1)"
    assert stats["rounds"] <= 10, stats  # pointer jumping: far fewer rounds than the 20 links to the ends
    with pytest.raises(RuntimeError, match="did not converge in 1 rounds"):
        near_duplicates(con, "survivors", DedupConfig(near_hamming=1), tmp_path / "x.parquet", max_iterations=1)
    assert not (tmp_path / "x.parquet").exists()
    assert con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name LIKE '__clipforge%'").fetchone()[0] == 0


def _union_find(edges) -> dict[int, int]:
    parent: dict[int, int] = {}

    def root(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = root(a), root(b)
        parent[max(ra, rb)] = min(ra, rb)
    return {x: root(x) for x in parent}


@pytest.mark.parametrize("kind", ["chain", "tree", "random"])
def test_components_match_union_find(kind):
    """The DuckDB components (hooking + pointer jumping) equal a union-find's, in few rounds, on a 3,000-node
    chain / random tree / sparse random graph whose ids are shuffled along the paths."""
    n, rng = 3000, np.random.default_rng(len(kind))
    perm = [int(x) for x in rng.permutation(n)]
    edges = {"chain": [(perm[i], perm[i + 1]) for i in range(n - 1)],
             "tree": [(perm[i], perm[int(rng.integers(0, i))]) for i in range(1, n)],
             "random": [(int(a), int(b)) for a, b in rng.integers(0, n, (n // 2, 2)) if a != b]}[kind]
    con, t = duckdb.connect(), "__test_cc_"
    con.execute(f"CREATE TEMP TABLE {t}nodes AS SELECT i AS h, lpad(CAST(i AS VARCHAR), 6, '0') AS k, 1 AS n "
                f"FROM range({n}) r(i)")  # the key order is the hash order: component label = min hash
    con.execute(f"CREATE TEMP TABLE {t}edges AS SELECT unnest(?::BIGINT[]) AS a, unnest(?::BIGINT[]) AS b",
                [[min(e) for e in edges], [max(e) for e in edges]])
    rounds = _components(con, t, MAX_CC_ITERATIONS)
    got = dict(con.execute(f"SELECT i.h, r.h FROM {t}ids i JOIN {t}lab l ON l.id = i.id "
                           f"JOIN {t}ids r ON r.id = l.label").fetchall())
    assert got == _union_find(edges) and rounds <= 20


def test_near_identical_hashes_and_oversized_buckets(tmp_path):
    """Identical hashes (a blank image) link without any pair; a band bucket over near_max_bucket adds no pairs
    (counted: the trade-off is that its pairs are missed unless they share another band)."""
    con = duckdb.connect()
    hashes = {f"blank{i}": 0 for i in range(6)}
    base = 0x5555 << 48  # bands = 2 (hamming 1): bits 0-31 and 32-63
    hashes.update({f"z{i}": base | (i << 20) for i in range(1, 8)})  # one high-band bucket of 7 distinct hashes
    hashes["z9"] = u64(base | (1 << 20) | (1 << 63))  # 1 bit from z1: differs on the high band, shares the low
    got, stats = _near_run(con, tmp_path, hashes, DedupConfig(near_hamming=1, near_max_bucket=4))
    assert {k: r["duplicate_of"] for k, r in got.items()} == {**{f"blank{i}": "blank0" for i in range(1, 6)},
                                                             "z9": "z1"}
    assert got["blank3"]["detail"] == "phash distance 0 to blank0" and got["z9"]["detail"] == "phash distance 1 to z1"
    assert stats["oversized_buckets"] == 1 and stats["oversized_hashes"] == 7  # z1~z3, z2~z3, ... are not compared
    got, stats = _near_run(con, tmp_path, hashes, DedupConfig(near_hamming=1, near_max_bucket=7))
    assert {"z3", "z5", "z7", "z9"} <= set(got) and stats["oversized_buckets"] == 0


def test_banding_is_used_and_finds_every_pair(tmp_path):
    """2,000 random hashes + 60 planted neighbours: candidates are a tiny fraction of the pairs, and the verified
    pairs are exactly the brute-force ones within the threshold (pigeonhole: bands = hamming + 1)."""
    con = duckdb.connect()
    rng = np.random.default_rng(3)
    h = rng.integers(-(1 << 63), (1 << 63) - 1, 2000, dtype=np.int64)
    flips = [sum(1 << int(b) for b in rng.choice(64, rng.integers(1, 5), replace=False)) for _ in range(60)]
    planted = np.array([u64((int(h[i]) & ((1 << 64) - 1)) ^ f) for i, f in enumerate(flips)], dtype=np.int64)
    allh = np.unique(np.concatenate([h, planted]))
    con.execute("CREATE TABLE hashes AS SELECT * FROM (SELECT unnest(?::BIGINT[]) AS h)", [allh.tolist()])
    cfg = DedupConfig(near_dup=True)
    n = len(allh)
    assert con.execute(f"SELECT count(*) FROM ({candidate_pairs(con, 'hashes', cfg).sql_query()})").fetchone()[0] \
        < n * (n - 1) / 2 / 100
    u = allh.view(np.uint64)
    x = u[:, None] ^ u[None, :]
    dist = np.unpackbits(x.view(np.uint8), axis=-1).reshape(n, n, 64).sum(-1)
    close = {(int(allh[i]), int(allh[j])) for i, j in zip(*np.nonzero(np.triu(dist <= 4, 1)))}
    assert len(close) >= 60
    keys = {int(v): f"k{i:05d}" for i, v in enumerate(allh)}
    got, stats = _near_run(con, tmp_path, {k: v for v, k in keys.items()}, cfg)
    assert stats["verified_pairs"] == len(close) and stats["candidate_pairs"] < n * (n - 1) / 2 / 100
    # every hash of a close pair but the smaller key is dropped
    expect = {max(keys[a], keys[b]) for a, b in close}
    assert set(got) == expect


POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _planted(rng, n: int, hamming: int, planted: int) -> np.ndarray:
    """n random hashes and `planted` neighbours at distances 1..hamming (in turn) of earlier ones, some of
    them neighbours of neighbours; sorted, distinct."""
    out = [int(x) for x in rng.integers(-(1 << 63), (1 << 63) - 1, n, dtype=np.int64)]
    for i in range(planted):
        flips = rng.choice(64, 1 + i % hamming, replace=False)
        out.append(u64((out[int(rng.integers(len(out)))] & ((1 << 64) - 1)) ^ sum(1 << int(b) for b in flips)))
    return np.unique(np.array(out, dtype=np.int64))


def _close_pairs(h: np.ndarray, hamming: int) -> set[tuple[int, int]]:
    """Brute force: every pair (a, b), a < b, of the sorted distinct hashes within `hamming` bits."""
    u = h.view(np.uint64)
    dist = POPCOUNT[(u[:, None] ^ u[None, :]).view(np.uint8)].reshape(len(h), len(h), 8).sum(-1)
    return {(int(h[i]), int(h[j])) for i, j in zip(*np.nonzero(np.triu(dist <= hamming, 1)))}


@pytest.mark.parametrize("hamming, scheme", [(3, (4, 0)), (3, (2, 1)), (3, (3, 1)), (3, (2, 2)), (4, (5, 0)),
                                             (4, (3, 1)), (4, (2, 2)), (5, (6, 0)), (5, (3, 1)), (5, (2, 2)),
                                             (2, (1, 2))])  # one 64-bit band: masks over the sign bit
def test_probing_finds_exactly_the_brute_force_pairs(tmp_path, hamming, scheme):
    """Every covering (bands, radius) finds exactly the pairs within the threshold, its counted candidates are
    the candidate relation's rows, and the drops are the union-find components less their min key."""
    bands, radius = scheme
    rng = np.random.default_rng(100 * hamming + 10 * bands + radius)
    allh = _planted(rng, 1500, hamming, 150)
    close = _close_pairs(allh, hamming)
    assert len(close) >= 120
    con = duckdb.connect()
    con.execute("CREATE TABLE hashes AS SELECT unnest(?::BIGINT[]) AS h", [allh.tolist()])
    cfg = DedupConfig(near_dup=True, near_hamming=hamming, near_bands=bands, near_probe_radius=radius)
    cand = con.execute(f"SELECT a, b FROM ({candidate_pairs(con, 'hashes', cfg).sql_query()})").fetchall()
    assert all(a < b for a, b in cand)
    assert {(a, b) for a, b in cand if bin((a ^ b) & ((1 << 64) - 1)).count("1") <= hamming} == close
    keys = {int(v): f"k{i:05d}" for i, v in enumerate(allh)}  # key order = hash order
    got, stats = _near_run(con, tmp_path, {k: v for v, k in keys.items()}, cfg)
    assert (stats["bands"], stats["radius"], stats["probes_per_row"]) == (bands, radius, probes_per_row(*scheme))
    assert stats["verified_pairs"] == len(close) and stats["candidate_pairs"] == len(cand)
    assert stats["candidate_pairs"] < len(allh) ** 2 / 2 / 50
    index = {int(v): i for i, v in enumerate(allh)}
    roots = _union_find((index[a], index[b]) for a, b in close)
    assert set(got) == {f"k{i:05d}" for i, r in roots.items() if i != r}
    assert all(got[f"k{i:05d}"]["duplicate_of"] == f"k{r:05d}" for i, r in roots.items() if i != r)


def test_uncovered_scheme_warns_and_misses(tmp_path):
    """2 bands at radius 1 cover 3 bits, not 4: two bits flipped on each 32-bit half are missed (and warned of);
    radius 2, or 3 bands at radius 1 (one band untouched), find them."""
    con = duckdb.connect()
    a = 0x1234_5678_9ABC_DEF0
    hashes = {"p-a": u64(a), "p-b": u64(a ^ (0b11 << 5) ^ (0b11 << 40)), "p-c": u64(a ^ (1 << 63) ^ 1)}
    with pytest.warns(UserWarning, match="missed"):
        cfg = DedupConfig(near_dup=True, near_bands=2, near_probe_radius=1)
    got, stats = _near_run(con, tmp_path, hashes, cfg)
    assert set(got) == {"p-c"} and stats["verified_pairs"] == 1
    for bands, radius in ((2, 2), (3, 1)):
        got, _ = _near_run(con, tmp_path, hashes, DedupConfig(near_dup=True, near_bands=bands,
                                                               near_probe_radius=radius))
        assert {k: r["duplicate_of"] for k, r in got.items()} == {"p-b": "p-a", "p-c": "p-a"}
        assert got["p-b"]["detail"] == "phash distance 4 to p-a"


# ------------------------------------------------------------------------------------------------ semantic
def _semantic_data(tmp_path, parts=4, rows=100, dim=64, seed=0):
    """Parts of L2-normalised float16 embeddings: 8 loose clusters (members ~0.5 cosine apart), plus planted
    near-copies (cosine > 0.97) of earlier rows. Every 17th row is not a survivor."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(8, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    emb = centers[rng.integers(0, 8, parts * rows)] + rng.normal(scale=1 / np.sqrt(dim), size=(parts * rows, dim))
    gone = {i for i in range(parts * rows) if i % 17 == 5}
    targets = {int(t) for t in rng.choice(np.arange(rows // 2, parts * rows), parts * 10, replace=False)}
    copies = {}
    for target in sorted(targets):
        source = int(rng.integers(0, target))
        while source in gone or source in targets:
            source = int(rng.integers(0, target))
        copies[target] = source
    for target in sorted(copies):
        emb[target] = emb[copies[target]] + rng.normal(scale=0.1 / np.sqrt(dim), size=dim)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    key = [f"k{p}-{r:04d}" for p in range(parts) for r in range(rows)]
    for p in range(parts):
        np.save(tmp_path / f"img-{p:05d}.npy", emb[p * rows:(p + 1) * rows].astype(np.float16))
    survivors_rows = [{"key": key[i], "shard": f"{i // rows:05d}.tar", "part_row": i % rows}
                      for i in range(parts * rows) if i not in gone]
    expected = {key[t]: key[s] for t, s in copies.items() if t not in gone}
    return survivors_rows, expected, (lambda sid: np.load(tmp_path / f"img-{sid:05d}.npy", mmap_mode="r"))


def test_semantic_duplicates(tmp_path, monkeypatch):
    con = duckdb.connect()
    rows, expected, load = _semantic_data(tmp_path)
    view = survivors(con, tmp_path, rows)
    cfg = DedupConfig(semantic_dup=True, semantic_clusters=6, semantic_sample=150)
    stats = {}
    n = semantic_duplicates(con, view, cfg, load, tmp_path / "sem.parquet", tmp_path / "clusters.parquet", stats)
    got = drops(tmp_path / "sem.parquet")
    assert n == len(got) and {k: r["duplicate_of"] for k, r in got.items()} == expected
    assert all(r["reason"] == "semantic_duplicate" and r["detail"].startswith("cosine 0.9") for r in got.values())
    clusters = pq.read_table(tmp_path / "clusters.parquet").to_pylist()
    assert sorted((r["key"], r["shard"], r["part_row"]) for r in clusters) == \
        sorted((r["key"], r["shard"], r["part_row"]) for r in rows)
    assert {r["cluster"] for r in clusters} <= set(range(6)) and stats["clusters"] == 6 and stats["sample"] == 150
    # deterministic for the seed
    semantic_duplicates(con, view, cfg, load, tmp_path / "sem2.parquet", tmp_path / "clusters2.parquet")
    assert pq.read_table(tmp_path / "sem2.parquet").equals(pq.read_table(tmp_path / "sem.parquet"))
    assert pq.read_table(tmp_path / "clusters2.parquet").equals(pq.read_table(tmp_path / "clusters.parquet"))
    # default K (about sqrt(N)), a tiny similarity block and small cluster groups / batches give the same drops
    monkeypatch.setattr(dedup, "GROUP_ROWS", 32)
    auto = DedupConfig(semantic_dup=True, semantic_sample=10_000)
    semantic_duplicates(con, view, auto, load, tmp_path / "s3.parquet", tmp_path / "c3.parquet", stats, block=5)
    assert {k: r["duplicate_of"] for k, r in drops(tmp_path / "s3.parquet").items()} == expected
    assert stats["clusters"] == round(len(rows) ** 0.5) and stats["largest_cluster"] > 5  # blocks were used


def test_semantic_bad_input(tmp_path):
    con = duckdb.connect()
    rows, _, load = _semantic_data(tmp_path, parts=1, rows=40)
    cfg = DedupConfig(semantic_dup=True, semantic_clusters=2)
    view = survivors(con, tmp_path, [*rows, {"key": "zz", "shard": "00000.tar", "part_row": 40}])
    with pytest.raises(ValueError, match="40 embedding rows"):
        semantic_duplicates(con, view, cfg, load, tmp_path / "s.parquet", tmp_path / "c.parquet")
    view = survivors(con, tmp_path, [*rows, {"key": "zz", "shard": "odd-name", "part_row": 0}])
    with pytest.raises(ValueError, match="NNNNN.tar"):
        semantic_duplicates(con, view, cfg, load, tmp_path / "s.parquet", tmp_path / "c.parquet")
    view = survivors(con, tmp_path, [])
    assert semantic_duplicates(con, view, cfg, load, tmp_path / "s.parquet", tmp_path / "c.parquet") == 0
    assert pq.read_table(tmp_path / "s.parquet").num_rows == 0 and pq.read_table(tmp_path / "c.parquet").num_rows == 0


def test_semdedup_keeps_earliest_and_blocks_agree():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 32)).astype(np.float32)
    x[[10, 30, 55]] = x[3] + 0.01 * rng.normal(size=(3, 32))  # copies of 3
    x[41] = x[30] + 0.01 * rng.normal(size=32)                  # copy of a copy: names 3, the kept one
    x[20] = -x[3]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    full = semdedup(x, 0.95)
    assert [(i, j) for i, j, _ in full] == [(10, 3), (30, 3), (41, 3), (55, 3)]
    assert all(s > 0.95 for *_, s in full)
    for block in (1, 4, 7, 59):
        assert [(i, j) for i, j, _ in semdedup(x, 0.95, block)] == [(i, j) for i, j, _ in full]


def test_cluster_groups_never_split_a_cluster():
    rng = np.random.default_rng(5)
    sizes = [int(x) for x in rng.integers(1, 30, 60)]
    sizes[20] = 400  # bigger than a group: comes alone
    cluster = np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
    table = pa.table({"key": [f"k{i:05d}" for i in range(len(cluster))], "cluster": cluster})
    batches = table.to_batches(max_chunksize=37)
    groups = list(_cluster_groups(iter(batches), 100))
    assert pa.concat_tables(groups).equals(table)
    seen = [set(g.column("cluster").to_pylist()) for g in groups]
    assert all(not a & b for a, b in itertools.combinations(seen, 2))  # each cluster in exactly one group
    assert {20} in seen and all(len(g) >= 100 for g, c in zip(groups[:-1], seen) if 19 not in c)


# ------------------------------------------------------------------------------------------------ scale
@pytest.mark.slow
def test_million_rows_exact_and_near_under_memory_limit(tmp_path):
    rng = np.random.default_rng(7)
    n, parts = 1_000_000, 10
    phash = rng.integers(-(1 << 63), (1 << 63) - 1, n, dtype=np.int64)
    sha = np.array([hashlib.sha256(int(i).to_bytes(8, "little")).hexdigest() for i in range(n)], dtype=object)
    pair = sha.copy()
    picks = 2 * rng.choice(n // 2, 900, replace=False).reshape(3, 300)  # even rows copy the odd row after them
    img_dup, pair_dup, near_dup = picks
    sources = picks + 1
    sha[img_dup] = sha[sources[0]]
    pair[pair_dup] = pair[sources[1]]
    for t, s in zip(near_dup, sources[2]):
        phash[t] = u64((int(phash[s]) & ((1 << 64) - 1)) ^ (1 << int(rng.integers(64))) ^ (1 << 3))
    keys = np.array([f"{i:09d}" for i in range(n)], dtype=object)
    for p in range(parts):
        sl = slice(p * n // parts, (p + 1) * n // parts)
        pq.write_table(pa.table({"key": keys[sl], "shard": [f"{p:05d}.tar"] * (sl.stop - sl.start),
                                 "part_row": np.arange(sl.stop - sl.start, dtype=np.int32), "sha256": sha[sl],
                                 "pair_sha256": pair[sl], "phash": phash[sl]}), tmp_path / f"part-{p:05d}.parquet")
    con = duckdb.connect()
    (tmp_path / "spill").mkdir()
    con.execute(f"SET memory_limit = '500MB'; SET temp_directory = '{tmp_path / 'spill'}'; SET threads = 2")
    con.execute(f"CREATE VIEW survivors AS SELECT * FROM read_parquet('{tmp_path}/part-*.parquet')")

    def pairs(targets, srcs):
        return {max(keys[t], keys[s]): min(keys[t], keys[s]) for t, s in zip(targets, srcs)}

    exact_duplicates(con, "survivors", "sha256", "duplicate_image", tmp_path / "img.parquet")
    assert {k: r["duplicate_of"] for k, r in drops(tmp_path / "img.parquet").items()} == pairs(img_dup, sources[0])
    exact_duplicates(con, "survivors", "pair_sha256", "duplicate_pair", tmp_path / "pair.parquet")
    assert {k: r["duplicate_of"] for k, r in drops(tmp_path / "pair.parquet").items()} == pairs(pair_dup, sources[1])
    stats = {}
    near_duplicates(con, "survivors", DedupConfig(near_dup=True), tmp_path / "near.parquet", stats=stats)
    assert {k: r["duplicate_of"] for k, r in drops(tmp_path / "near.parquet").items()} == pairs(near_dup, sources[2])
    assert stats["candidate_pairs"] < n * 1000


@pytest.mark.slow
def test_two_million_hashes_probe_far_fewer_candidates(tmp_path):
    """2M random pHashes + 400 planted neighbours at 1..4 bits, under a 500MB DuckDB memory limit: the automatic
    scheme probes (radius >= 1), finds every planted pair and verifies < 5 % of the candidates that the exact
    5 bands of ~13 bits would (each a bucket of ~250-500 hashes there)."""
    rng = np.random.default_rng(11)
    n, parts = 2_000_000, 8
    phash = rng.integers(-(1 << 63), (1 << 63) - 1, n, dtype=np.int64)
    targets = 2 * rng.choice(n // 2, 400, replace=False)  # even rows copy the odd row after them
    for i, t in enumerate(targets):
        flips = rng.choice(64, 1 + i % 4, replace=False)
        phash[t] = u64((int(phash[t + 1]) & ((1 << 64) - 1)) ^ sum(1 << int(b) for b in flips))
    keys = np.array([f"{i:09d}" for i in range(n)], dtype=object)
    for p in range(parts):
        sl = slice(p * n // parts, (p + 1) * n // parts)
        pq.write_table(pa.table({"key": keys[sl], "shard": [f"{p:05d}.tar"] * (sl.stop - sl.start),
                                 "phash": phash[sl]}), tmp_path / f"part-{p:05d}.parquet")
    con = duckdb.connect()
    (tmp_path / "spill").mkdir()
    con.execute(f"SET memory_limit = '500MB'; SET temp_directory = '{tmp_path / 'spill'}'; SET threads = 2")
    con.execute(f"CREATE VIEW survivors AS SELECT * FROM read_parquet('{tmp_path}/part-*.parquet')")
    stats = {}
    near_duplicates(con, "survivors", DedupConfig(near_dup=True), tmp_path / "near.parquet", stats=stats)
    assert {k: r["duplicate_of"] for k, r in drops(tmp_path / "near.parquet").items()} == \
        {keys[t + 1]: keys[t] for t in targets}  # the odd row's key is the larger one
    assert stats["radius"] >= 1 and stats["verified_pairs"] == 400 and stats["oversized_buckets"] == 0
    distinct = np.unique(phash).view(np.uint64)
    old = 0
    for shift, width in band_layout(5):
        sizes = np.bincount(((distinct >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64))
        sizes = sizes[(sizes >= 2) & (sizes <= DedupConfig().near_max_bucket)]
        old += int((sizes * (sizes - 1) // 2).sum())
    assert old > 10 ** 9 and stats["candidate_pairs"] < 0.05 * old, (stats, old)
