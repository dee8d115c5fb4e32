"""The shared on-disk contracts (trainer.clip.formats): atomic writes, the shard dir format and its member-name rule,
the crawl dir layout, the filter and index dirs."""
import json
import os
import stat
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from webdataset.tariterators import base_plus_ext

from trainer.clip.formats import atomic, crawl, index, ledger, shards


# ------------------------------------------------------------------------------------------------ atomic
def test_atomic_write_replaces_whole_files_and_cleans_up_after_a_failing_writer(tmp_path):
    target = tmp_path / "sub" / "file.json"
    atomic.atomic_write_json(target, {"a": 1})
    assert atomic.read_json(target) == {"a": 1} and target.read_text().endswith("\n")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError):
        atomic.atomic_write(target, broken)
    assert atomic.read_json(target) == {"a": 1}  # the old file, whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.json"]  # no temp file left

    with pytest.raises(ValueError):
        with atomic.atomic_open(target, "w") as f:
            f.write("partial")
            raise ValueError("stream failed")
    assert atomic.read_json(target) == {"a": 1}
    atomic.atomic_write_bytes(target, b"new", durable=False)
    assert target.read_bytes() == b"new" and len(list(target.parent.iterdir())) == 1


# ------------------------------------------------------------------------------------------------ members
NAMES = ["000000012.jpg", "dir/000000012.JPG", "a/b.c/d.seg.json", "x.tar.gz", "k.", "noext", ".hidden",
         "dir.d/key.txt", "a/b/c.d.e.f", "UPPER.Png", "key..txt", "sp ace.txt", "a.b/c"]


@pytest.mark.parametrize("name", NAMES)
def test_split_member_is_webdatasets_rule(name):
    key, ext = base_plus_ext(name)  # webdataset groups members by this key and lower-cases the extension
    expected = None if key is None else (key, ext.lower())
    assert shards.split_member(name) == expected


def test_hidden_files_in_folders_are_no_samples():
    # webdataset's pattern reads "dir/.hidden" as key "dir/" + extension "hidden" (a sample with no image, which
    # its loader then drops); the shared rule skips the member outright
    assert base_plus_ext("dir/.hidden") == ("dir/", "hidden") and shards.split_member("dir/.hidden") is None


def _sample(key, caption="a caption", ext="jpg"):
    return {"__key__": key, ext: b"\xff\xd8" + key.encode(), "txt": caption, "json": {"key": key}}


def test_write_tar_round_trip_and_same_bytes_on_rerun(tmp_path):
    path = tmp_path / "s.tar"
    assert shards.write_tar(path, [_sample("000000001"), _sample("000000002", ext="png")]) == 2
    first = path.read_bytes()
    shards.write_tar(path, [_sample("000000001"), _sample("000000002", ext="png")])
    assert path.read_bytes() == first  # mtime 0: a rerun writes the same bytes
    got = list(shards.iter_tar_samples(path, read=lambda ext: ext != "jpg"))
    assert [s.key for s in got] == ["000000001", "000000002"]
    assert got[0].members["jpg"].data is None and got[0].members["txt"].data == b"a caption"
    assert shards.image_ext(got[1].members) == "png" and json.loads(got[1].members["json"].data) == {"key": "000000002"}
    with open(path, "rb") as f:  # offsets point at the member's bytes
        m = got[0].members["jpg"]
        f.seek(m.offset)
        assert f.read(m.size) == b"\xff\xd8000000001"
    assert shards.count_tar_samples(path) == 2


def test_truncated_tar_raises_after_the_samples_before_the_damage(tmp_path):
    path = tmp_path / "s.tar"
    shards.write_tar(path, [_sample(f"{i:09d}", caption="x" * 600) for i in range(6)])
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) // 2 + 100, 512 * (len(data) // 1024)):  # mid-data, mid-header, boundary
        path.write_bytes(data[:cut])
        seen = []
        with pytest.raises((tarfile.TarError, EOFError, OSError)):
            for s in shards.iter_tar_samples(path):
                seen.append(s.key)
        assert 0 < len(seen) < 6 and seen == [f"{i:09d}" for i in range(len(seen))]


# ------------------------------------------------------------------------------------------------ shard dirs
def test_shard_dir_written_and_listed(tmp_path):
    root = tmp_path / "shards"
    m = shards.write_shard_dir(root, [[_sample("000000001"), _sample("000000002")], [_sample("000000003")]],
                               source={"from": "test"})
    assert m["format"] == shards.SHARDS_FORMAT and m["num_samples"] == 3 and m["source"] == {"from": "test"}
    assert shards.read_manifest(root) == m
    d = shards.list_shards(root)
    assert [d.relative(s) for s in d.shards] == ["shard-00000.tar", "shard-00001.tar"]
    assert [s.num_samples for s in d.shards] == [2, 1] and d.manifest == m and not d.missing
    (root / "shard-00001.tar").unlink()
    assert [d.relative(s) for s in shards.list_shards(root).missing] == ["shard-00001.tar"]
    assert shards.is_shard_dir(root) and not shards.is_shard_dir(tmp_path)


def test_img2dataset_and_plain_tar_dirs(tmp_path):
    shards.write_tar(tmp_path / "00000.tar", [_sample("000000000")])
    shards.write_tar(tmp_path / "00001.tar", [_sample("000010000"), _sample("000010001")])
    atomic.atomic_write_json(tmp_path / "00000_stats.json", {"successes": 1, "status_dict": {"success": 1}})
    d = shards.list_shards(tmp_path)
    assert d.manifest is None and [s.num_samples for s in d.shards] == [1, None]  # no stats: count it
    assert [s.id for s in crawl.complete_shards(tmp_path)] == [0]
    c = crawl.crawl_shard(tmp_path, 0)
    assert (c.tar.name, c.parquet.name, c.stats.name) == ("00000.tar", "00000.parquet", "00000_stats.json")
    assert crawl.stats_path(c.tar) == c.stats


def test_bad_manifests_are_clear_errors(tmp_path):
    with pytest.raises(shards.ShardFormatError, match="shard dir not found"):
        shards.list_shards(tmp_path / "nope")
    (tmp_path / shards.MANIFEST).write_text("{not json")
    with pytest.raises(shards.ShardFormatError, match="invalid manifest"):
        shards.list_shards(tmp_path)
    (tmp_path / shards.MANIFEST).write_text(json.dumps({"format": "clipforge.shards.v9", "shards": []}))
    with pytest.raises(shards.ShardFormatError, match="unknown format"):
        shards.read_manifest(tmp_path)
    (tmp_path / shards.MANIFEST).write_text(json.dumps({"shards": [{"num_samples": 3}]}))
    with pytest.raises(shards.ShardFormatError, match="tar"):
        shards.read_manifest(tmp_path)


# ------------------------------------------------------------------------------------------------ filter, index
def test_ledger_round_trip(tmp_path):
    rows = {c: [None, None] for c in ledger.LEDGER_COLUMNS}
    rows.update(key=["000000001", "000000002"], keep=[True, False], reason=[None, "duplicate_image"],
                duplicate_of=[None, "000000001"], terms=[["cat"], []], license=["cc", "x"])
    ledger.write_ledger_part(ledger.ledger_part(tmp_path, 3), pa.table(rows))
    with pytest.raises(ledger.LedgerError, match="run `clipforge filter` first"):
        ledger.read_filter_manifest(tmp_path)
    m = ledger.write_filter_manifest(tmp_path, {"parts": [{"part": "part-00003", "rows": 2, "kept": 1}]})
    assert ledger.read_filter_manifest(tmp_path) == m and m["format"] == ledger.FILTER_FORMAT
    import pyarrow.parquet as pq

    (path,) = ledger.ledger_files(tmp_path)
    t = pq.read_table(path)
    assert t.schema.names == [*ledger.LEDGER_COLUMNS, "license"]  # the carried column rides after ours
    assert t.schema.field("terms").type == pa.list_(pa.string()) and t.column("duplicate_of")[1].as_py() == "000000001"
    assert set(ledger.REASONS) >= {"crawl_failed", "caption_too_long", "near_duplicate", "balanced_out"}
    ledger.write_filter_manifest(tmp_path, {"parts": []})
    (tmp_path / ledger.FILTER_MANIFEST).write_text('{"format": "clipforge.filter.v1"}')
    with pytest.raises(ledger.LedgerError, match="re-run the filter"):
        ledger.read_filter_manifest(tmp_path)


def test_index_dir_contract(tmp_path):
    """A build is committed by index.json (the swap), opened only when every file matches it, pruned to two."""
    with pytest.raises(index.IndexFormatError, match="index not found"):
        index.read_index_info(tmp_path)
    meta = pa.table({"key": ["k"], "caption": ["c"], "url": ["u"], "shard": ["s.tar"], "member": ["k.jpg"],
                     "offset": [512], "size": [10], "width": [64]})
    ids = []
    for _ in range(3):
        bid = index.new_build_id()
        root = index.build_dir(tmp_path, bid)
        root.mkdir(parents=True)
        (root / index.INDEX_FILE).write_bytes(b"faiss bytes")
        index.write_metadata(root / index.META_FILE, meta, bid, "sha")
        index.write_report(root / index.REPORT_FILE, {"recall@10": 1.0}, bid, "sha")
        info = index.commit_build(tmp_path, bid, {"weights_sha256": "sha", "num_vectors": 1, "dim": 4})
        ids.append(bid)
        s = index.open_index_set(tmp_path)
        assert s.build_id == bid and s.info == info and s.report["recall@10"] == 1.0
        assert s.index_path == root / index.INDEX_FILE and info["files"] == {index.INDEX_FILE: 11}
    assert sorted(p.name for p in (tmp_path / index.BUILDS_DIR).iterdir()) == sorted(ids[1:])  # current + previous
    assert pq.read_schema(s.meta_path).names[:8] == [*index.METADATA_COLUMNS, "width"]
    index.write_report(s.root / index.REPORT_FILE, {}, ids[1], "sha")  # another build's report
    with pytest.raises(index.IndexFormatError, match="mismatched index set.*report build_id"):
        index.open_index_set(tmp_path)
    (tmp_path / index.INFO_FILE).write_text(json.dumps({"format": "clipforge.index.v1"}))
    with pytest.raises(index.IndexFormatError, match="unknown format"):
        index.read_index_info(tmp_path)


def test_embed_dir_contract(tmp_path):
    from trainer.clip.formats import embeddings as emb

    with pytest.raises(emb.EmbedFormatError, match="run `clipforge embed` first"):
        emb.read_embed_manifest(tmp_path)
    img, txt, meta_path = emb.part_paths(tmp_path, 3)
    x = np.eye(2, 4, dtype=np.float16)
    emb.write_npy(img, x)
    emb.write_npy(txt, x[::-1])
    rows = pa.table({"key": ["a", "b"], "shard": ["s.tar"] * 2, "member": ["a.jpg", "b.jpg"], "offset": [512, 1536],
                     "size": [10, 20], "caption": ["x", "y"], "url": ["u", "v"], "embedded": [True, False],
                     "width": [64, 32]})
    emb.write_part_meta(meta_path, rows, {"rows": 2, "weights_sha256": "sha"})
    assert emb.read_part_info(meta_path) == {"rows": 2, "weights_sha256": "sha"}
    emb.write_embed_manifest(tmp_path, {"parts": [{"id": 3, "shard": "s.tar", "rows": 2, "embedded": 1}]})
    (part,) = emb.embed_parts(tmp_path)
    assert part.id == 3 and np.array_equal(part.load("txt"), x[::-1]) and part.embedded_mask().tolist() == [True, False]
    emb.write_npy(img, np.zeros((3, 4), np.float16))  # a part whose rows do not match the manifest
    with pytest.raises(emb.EmbedFormatError, match="expected \\(2, D\\)"):
        part.load("img")
