"""Indexes that outgrow one pass: on-disk IVF builds, incremental adds, and the metadata they append.

On disk (`--on-disk`, or automatic when the chosen IVF index's estimate exceeds the budget):
    the IVF index (coarse quantizer, PQ / OPQ) is trained once and written empty as builds/<id>/trained.index;
    the collection is added in slices, each a separate IVF index sharing that quantizer (vectors streamed, ids
    given explicitly, each slice written to builds/<id>/.slices/), then faiss.contrib.ondisk.merge_ondisk merges
    their inverted lists into builds/<id>/image.ivfdata, written at its final path (a build folder never moves,
    so the absolute path image.index records stays right). Searchers open image.index with indexing.faissio.read_index:
    IO_FLAG_READ_ONLY | IO_FLAG_ONDISK_SAME_DIR (the lists stay on disk, memory-mapped and paged in on demand;
    image.ivfdata is looked up next to image.index, so a copied or moved INDEX_DIR still opens). Not
    IO_FLAG_MMAP: with faiss 1.15 it leaves merged on-disk lists unmapped and the first search segfaults.

Incremental add (`--add`, add(cfg)):
    opens the current build (open_index_set), refuses another model's embeddings (weights_sha256) or another
    dim, finds the embed parts index.json's "parts" does not list (by embed dir + part id; a listed part whose
    rows or fingerprint changed is refused: rebuild instead), adds their embedded rows with ids continuing from
    num_vectors, appends their metadata rows after the old ones, re-tunes on the whole collection and commits a
    new build. The old build is only read: it stays openable until the next commit prunes it. In RAM the old
    index file is read and extended; on disk the new slice is merged with the old inverted lists into a new
    image.ivfdata. Nothing new to add: no new build, the current one is returned.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import time
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from indexing.builder import BuildError, Gpu, IndexConfig, add_vectors, finish, log, new_build_folder, new_index, \
    query_sample, read_manifest, train_index
from indexing.choose import Choice
from indexing.faissio import c_stdout_to_stderr, read_index
from indexing.tune import Collection, Source, part_fingerprint
from trainer.clip.formats.atomic import atomic_write
from trainer.clip.formats.embeddings import EmbedFormatError, embed_parts
from trainer.clip.formats.index import INDEX_FILE, IVFDATA_FILE, META_FILE, META_ROW_GROUP, METADATA_COLUMNS, \
    IndexFormatError, metadata_writer_schema, open_index_set, write_metadata_files

TRAINED_FILE, SLICES_DIR = "trained.index", ".slices"


# ------------------------------------------------------------------------------------------------ metadata
def _schema(sources: list[Source], old: pa.Schema | None) -> pa.Schema:
    """One schema for every part's rows: METADATA_COLUMNS first, then the other columns (the old metadata's
    order first); a column some parts lack is null there."""
    schemas = ([old.remove_metadata()] if old is not None else []) + \
        [pq.read_schema(s.part.meta).remove_metadata() for s in sources]
    try:
        unified = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise BuildError(f"the meta parts' columns do not agree: {e}") from e
    missing = [c for c in METADATA_COLUMNS if c not in unified.names]
    if missing:
        raise BuildError(f"meta parquet without the columns {missing} (not an EMBED_DIR meta part?)")
    rest = [f for f in unified if f.name not in METADATA_COLUMNS]
    return pa.schema([unified.field(c) for c in METADATA_COLUMNS] + rest)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
            for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def _shard_prefix(src: Source, shards_dir: str | None) -> str:
    """'' or the path from the build's shards_dir to this part's shards_dir (metadata `shard` stays relative to
    the build's one when an --add brings parts embedded from another shard dir)."""
    if not src.shards_dir or not shards_dir or os.path.abspath(src.shards_dir) == os.path.abspath(shards_dir):
        return ""
    return os.path.relpath(os.path.abspath(src.shards_dir), os.path.abspath(shards_dir)).replace(os.sep, "/")


def _part_rows(src: Source, schema: pa.Schema, shards_dir: str | None) -> pa.Table:
    t = pq.read_table(src.part.meta)
    t = t.filter(pc.fill_null(t.column("embedded"), False))
    if len(t) != src.count:
        raise EmbedFormatError(f"{src.part.meta}: {len(t)} embedded rows, the manifest says {src.count}")
    prefix = _shard_prefix(src, shards_dir)
    if prefix:
        shard = [posixpath.normpath(f"{prefix}/{s}") for s in t.column("shard").to_pylist()]
        t = t.set_column(t.column_names.index("shard"), "shard", pa.array(shard, pa.string()))
    return _conform(t, schema)


def _rows(sources: list[Source], schema: pa.Schema, shards_dir: str | None,
          old: Path | None) -> Iterator[pa.Table]:
    if old is not None:
        for batch in pq.ParquetFile(old).iter_batches(META_ROW_GROUP):
            yield _conform(pa.Table.from_batches([batch]), schema)
    for src in sources:
        yield _part_rows(src, schema, shards_dir)


def write_metadata(path: Path, sources: list[Source], build_id: str, weights_sha256: str, shards_dir: str | None,
                   old: Path | None = None) -> int:
    """metadata.parquet of a build, streamed: the old build's rows (when appending), then the embedded rows of
    each part in order. -> rows written."""
    schema = _schema(sources, pq.read_schema(old) if old is not None else None)
    tagged = metadata_writer_schema(schema, build_id, weights_sha256)
    return write_metadata_files(path, tagged, _rows(sources, schema, shards_dir, old))


# ------------------------------------------------------------------------------------------------ on disk
def _slice_size(cfg: IndexConfig, index) -> int:
    if cfg.slice_vectors:
        return cfg.slice_vectors
    per = int(faiss.extract_index_ivf(index).code_size) + 8
    return max(cfg.add_batch, cfg.budget_bytes // (2 * per))


def write_slices(trained: Path, coll: Collection, out: Path, per_slice: int, batch: int) -> list[str]:
    """The collection as IVF slices of up to per_slice vectors, each a copy of the trained empty index with
    explicit ids; -> their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    cur = faiss.read_index(str(trained))

    def flush():
        nonlocal cur
        path = out / f"slice-{len(paths):05d}.index"
        faiss.write_index(cur, str(path))
        paths.append(str(path))
        cur = faiss.read_index(str(trained))

    for first, x in coll.iter_batches(min(batch, per_slice)):
        if cur.ntotal and cur.ntotal + len(x) > per_slice:
            flush()
        cur.add_with_ids(x, np.arange(first, first + len(x), dtype=np.int64))
    if cur.ntotal or not paths:
        flush()
    return paths


def merge(trained: Path, inputs: list[str], root: Path):
    """The inputs' inverted lists merged into root/image.ivfdata (ids kept); -> the merged index (in RAM: the
    quantizer; on disk: the lists). Slices (in-RAM IVF files) go through faiss.contrib.ondisk.merge_ondisk; an
    input that is itself merged on disk (--add) cannot (merge_ondisk opens its inputs with IO_FLAG_MMAP, which
    crashes on on-disk lists), so then the same merge runs with the inputs opened by read_index()."""
    with c_stdout_to_stderr():
        return _merge(trained, inputs, root)


def _merge(trained: Path, inputs: list[str], root: Path):
    from faiss.contrib.ondisk import merge_ondisk

    index = faiss.read_index(str(trained))
    ivfdata = (root / IVFDATA_FILE).resolve()
    if ivfdata.exists():
        ivfdata.unlink()
    if not any((Path(p).parent / IVFDATA_FILE).is_file() for p in inputs):
        merge_ondisk(index, inputs, str(ivfdata))
        return index
    opened = [read_index(p) for p in inputs]  # referenced until the merge is done: they own their lists
    ivf = faiss.extract_index_ivf(index)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata))
    sources = faiss.InvertedListsPtrVector()
    for other in opened:
        sources.push_back(faiss.extract_index_ivf(other).invlists)
    ntotal = lists.merge_from_multiple(sources.data(), sources.size(), False)
    index.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns the lists now
    del opened
    return index


def build_on_disk(cfg: IndexConfig, coll: Collection, choice: Choice, root: Path, gpu: Gpu):
    """Train once, write the trained empty index, add the collection slice by slice, merge on disk."""
    index = new_index(choice.factory, coll.d)
    if faiss.extract_index_ivf(index) is None:
        raise BuildError(f"--on-disk needs an IVF index, not {choice.factory!r}")
    index = train_index(index, coll, choice, cfg, gpu)
    trained = root / TRAINED_FILE
    atomic_write(trained, lambda tmp: faiss.write_index(index, tmp))
    per_slice = _slice_size(cfg, index)
    slices = write_slices(trained, coll, root / SLICES_DIR, per_slice, cfg.add_batch)
    log(f"merging {len(slices)} slice(s) of <= {per_slice:,} vectors into {root / IVFDATA_FILE}")
    try:
        return merge(trained, slices, root)
    finally:
        shutil.rmtree(root / SLICES_DIR, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ incremental add
def _new_parts(info: dict, embed_dir: Path, manifest: dict) -> Collection:
    """The parts of EMBED_DIR the current build does not hold, ids from num_vectors. BuildError for a part
    that changed since it was indexed (rows, embedded count or meta fingerprint)."""
    have = {(r["embeddings"], int(r["id"])): r for r in info["parts"]}
    known = set()
    for part in embed_parts(embed_dir, manifest):
        rec = have.get((str(embed_dir), part.id))
        if rec is None:
            continue
        now = (part.rows, part.embedded, part_fingerprint(part))
        if (int(rec["rows"]), int(rec["embedded"]), rec["fingerprint"]) != now:
            raise BuildError(f"part {part.id} of {embed_dir} changed since it was indexed ({rec['rows']} rows, "
                             f"fingerprint {rec['fingerprint']}; now {now[0]} rows, {now[2]}): rebuild without "
                             f"--add")
        known.add(part.id)
    return Collection.from_embed_dir(embed_dir, manifest, base=int(info["num_vectors"]), skip=known)


def _check_same(info: dict, manifest: dict, embed_dir: Path) -> None:
    if str(manifest.get("weights_sha256", "")) != info.get("weights_sha256"):
        raise BuildError(f"{embed_dir} was embedded with other weights (weights_sha256 "
                         f"{str(manifest.get('weights_sha256'))[:12]}..., the index has "
                         f"{str(info.get('weights_sha256'))[:12]}...): vectors of two models cannot share an "
                         f"index; rebuild without --add")
    if int(manifest.get("dim", -1)) != int(info.get("dim", -2)):
        raise BuildError(f"{embed_dir}: dim {manifest.get('dim')}, the index has {info.get('dim')}")
    if not info.get("parts"):
        raise BuildError("the current build does not record its embed parts (index.json 'parts'): rebuild "
                         "without --add")


def add(cfg: IndexConfig) -> dict:
    """`--add`: a new build = the current one + EMBED_DIR's parts not yet in it (see the module docstring)."""
    t0 = time.time()
    out = Path(cfg.out).resolve()
    try:
        current = open_index_set(out)
    except IndexFormatError as e:
        raise BuildError(f"--add: {e}") from e
    info = current.info
    embed_dir, manifest = read_manifest(cfg.embeddings)
    _check_same(info, manifest, embed_dir)
    gpu = Gpu.open(cfg.device)
    try:
        old = Collection.from_records(info["parts"], int(info["dim"]))
        new = _new_parts(info, embed_dir, manifest)
    except EmbedFormatError as e:
        raise BuildError(str(e)) from e
    if old.n != int(info["num_vectors"]):
        raise BuildError(f"index.json lists parts with {old.n} vectors but num_vectors is {info['num_vectors']}")
    if not new.sources:
        log(f"nothing to add: every part of {embed_dir} is in build {info['build_id']}")
        return {**info, "report": current.report, "added": 0}
    query_sample(cfg, old.d)  # a bad --query-file fails now, not after the adding
    choice = Choice.from_dict(info["choice"])
    log(f"adding {new.n:,} vectors from {len(new.sources)} new part(s) to {info['num_vectors']:,}")
    with new_build_folder(out) as (build_id, root):
        index = _grown_index(cfg, current.root, root, new, choice)
        base = {k: info.get(k) for k in ("weights_sha256", "checkpoint", "embeddings", "shards_dir")}
        write_metadata(root / META_FILE, new.sources, build_id, base["weights_sha256"], base["shards_dir"],
                       old=current.meta_path)
        result = finish(cfg, index, old + new, choice, root, build_id, base, t0, gpu)
        return {**result, "added": new.n}


def _grown_index(cfg: IndexConfig, old_root: Path, root: Path, new: Collection, choice: Choice):
    """The old index + the new vectors: read and extended in RAM, or (on disk) a new slice merged with the old
    inverted lists into root/image.ivfdata."""
    if not choice.on_disk:
        index = faiss.read_index(str(old_root / INDEX_FILE))
        add_vectors(index, new, cfg.add_batch)
        return index
    trained = root / TRAINED_FILE
    shutil.copyfile(old_root / TRAINED_FILE, trained)
    per_slice = _slice_size(cfg, faiss.read_index(str(trained)))
    slices = write_slices(trained, new, root / SLICES_DIR, per_slice, cfg.add_batch)
    try:
        return merge(trained, [str(old_root / INDEX_FILE), *slices], root)
    finally:
        shutil.rmtree(root / SLICES_DIR, ignore_errors=True)

