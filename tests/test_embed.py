"""indexing/embed.py + embed_part.py: `clipforge embed` on a tiny random CLIP and real shard tars built here.

Embeddings are checked against encode_image_batch / encode_texts of the same images and captions; the meta
parquets against the tars' own member order; reruns against file mtimes and a checkpoint loader that refuses to
run; filter reuse against known vectors in a hand-made FILTER_DIR; the Ray executor against the local one.
"""
import hashlib
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from indexing.embed import EmbedConfig, main, run
from trainer.clip import checkpoint
from trainer.clip.checkpoint import load_pretrained, save_model, weights_sha256
from trainer.clip.configs import get_config
from trainer.clip.encode import encode_image_batch, encode_texts
from trainer.clip.formats.atomic import atomic_write_json
from trainer.clip.formats.embeddings import (EMBED_META_COLUMNS, embed_parts, part_paths, read_embed_manifest,
                                             read_part_info)
from trainer.clip.formats.ledger import embedding_paths, write_filter_manifest
from trainer.clip.formats.shards import SAMPLE_SCHEMA, image_ext, iter_tar_samples, write_manifest, write_tar
from trainer.clip.model import CLIP

PER_SHARD = 9
CORRUPT, NO_IMAGE = 2, 5  # per shard: sample 2's jpg is garbage, sample 5 has no image member
DIM = get_config("tiny").embed_dim


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """-> (checkpoint dir, model, preprocess, tokenizer) of a tiny random CLIP."""
    torch.manual_seed(0)
    path = str(save_model(CLIP(get_config("tiny")).eval(), tmp_path_factory.mktemp("ckpt") / "a"))
    return (path, *load_pretrained(path))


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _image(rng, i: int) -> tuple[str, bytes]:
    mode = ("RGB", "L", "RGBA")[i % 3]
    arr = rng.integers(0, 255, (int(rng.integers(30, 90)), int(rng.integers(30, 90)), 4), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if mode == "L" else arr[..., :3] if mode == "RGB" else arr, mode)
    buf = io.BytesIO()
    img.save(buf, "PNG" if mode == "RGBA" else "JPEG")
    return ("png" if mode == "RGBA" else "jpg"), buf.getvalue()


def write_tar_shard(root, s: int, seed: int = 0, sidecar: bool = True, n: int = PER_SHARD) -> dict:
    """shard-0000S.tar (+ its sidecar parquet with a carried column). -> the manifest entry."""
    rng = np.random.default_rng(1000 * seed + s)
    samples, rows = [], []
    for i in range(n):
        key = f"{s:04d}{i:05d}"
        caption = f"photo {i} of shard {s} seed {seed}"
        meta = {"key": key, "url": f"http://x.test/{key}", "caption": caption, "width": 10 + i, "height": 20}
        sample = {"__key__": key, "txt": caption, "json": meta}
        if i != NO_IMAGE:
            ext, data = _image(rng, i)
            sample[ext] = b"\xff\xd8\xff\xe0 not a jpeg" * 3 if i == CORRUPT else data
        samples.append(sample)
        rows.append({**meta, "sha256": hashlib.sha256(key.encode()).hexdigest(), "language": "en",
                     "clip_score": 0.25, "source_id": 100 * s + i})
    write_tar(root / f"shard-{s:05d}.tar", samples, durable=False)
    entry = {"tar": f"shard-{s:05d}.tar", "num_samples": n}
    if sidecar:
        schema = pa.schema([*SAMPLE_SCHEMA, ("source_id", pa.int64())])
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / f"shard-{s:05d}.parquet")
        entry["parquet"] = f"shard-{s:05d}.parquet"
    return entry


def make_shards(root, n_shards: int = 2, filter_dir=None, **kw):
    root.mkdir(parents=True, exist_ok=True)
    entries = [write_tar_shard(root, s, **kw) for s in range(n_shards)]
    write_manifest(root, entries, source={"filter_dir": str(filter_dir)} if filter_dir else {})
    return root


def cfg(shards, ckpt, out, **kw) -> EmbedConfig:
    return EmbedConfig.tiny(str(shards), ckpt[0], str(out), batch_size=4, **kw)


def reference(ckpt, tar: str) -> dict:
    """{key: (image emb, text emb)} of the tar's decodable images, computed directly (float32)."""
    _, model, preprocess, tokenizer = ckpt
    out = {}
    for s in iter_tar_samples(tar):
        ext = image_ext(s.members)
        try:
            x = preprocess(Image.open(io.BytesIO(s.members[ext].data)))
        except (KeyError, OSError):
            continue
        caption = s.members["txt"].data.decode()
        out[s.key] = (encode_image_batch(model, x.unsqueeze(0))[0], encode_texts(model, tokenizer, [caption])[0])
    return out


def mtimes(out) -> dict:
    return {p: p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.is_file() and p.name != "embed.json"}


# ------------------------------------------------------------------------------------------------ config / CLI
def test_config_validation_and_cli(tmp_path, ckpt, capsys):
    for bad in ({"batch_size": 0}, {"dtype": "int8"}, {"executor": "spark"}, {"actors": -1},
                {"cpus_per_actor": 0}, {"device": "tpu"}, {"memory_limit": "lots"}):
        with pytest.raises(ValueError, match="--"):
            EmbedConfig(**bad)
    assert main([str(tmp_path), "--checkpoint", ckpt[0], "--out", str(tmp_path / "o"), "--dtype", "float32",
                 "--no-captions", "--executor", "local", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["dtype"], printed["captions"], printed["executor"], printed["reuse"]) == ("float32", False,
                                                                                              "local", True)
    assert main([str(tmp_path / "nope"), "--checkpoint", ckpt[0], "--out", str(tmp_path / "o")]) == 2
    assert main([str(tmp_path), "--checkpoint", ckpt[0], "--out", str(tmp_path / "o")]) == 2  # no shards in it
    make_shards(tmp_path / "shards", 1)
    assert main([str(tmp_path / "shards"), "--checkpoint", str(tmp_path / "no-ckpt"), "--out", str(tmp_path)]) == 2
    assert main([str(tmp_path / "shards"), "--out", str(tmp_path / "o")]) == 2  # --checkpoint is required
    assert "error" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ local executor
def test_local_rows_in_tar_order_match_the_model(tmp_path, ckpt):
    shards, out = make_shards(tmp_path / "shards", 2), tmp_path / "emb"
    m = run(cfg(shards, ckpt, out))
    assert m == read_embed_manifest(out) and m["failed"] == {} and m["dim"] == DIM
    assert (m["num_rows"], m["num_embedded"], m["reused_rows"]) == (2 * PER_SHARD, 2 * (PER_SHARD - 2), 0)
    assert m["not_embedded"] == {"no_image": 2, "decode_failed": 2}
    assert [(p["id"], p["shard"], p["rows"], p["embedded"]) for p in m["parts"]] == [
        (s, f"shard-{s:05d}.tar", PER_SHARD, PER_SHARD - 2) for s in range(2)]
    for part in embed_parts(out):
        tar = str(shards / part.shard)
        samples = list(iter_tar_samples(tar, read=lambda ext: False))
        meta = pq.read_table(part.meta)
        assert meta.column_names[:len(EMBED_META_COLUMNS)] == list(EMBED_META_COLUMNS)
        assert {"width", "height", "sha256", "language", "clip_score", "source_id"} <= set(meta.column_names)
        assert meta.column("key").to_pylist() == [s.key for s in samples]  # tar order
        assert meta.column("source_id").to_pylist() == [100 * part.id + i for i in range(PER_SHARD)]
        for s, row in zip(samples, meta.to_pylist()):
            image = s.members.get(image_ext(s.members) or "")
            assert (row["member"], row["offset"], row["size"]) == ((image.name, image.offset, image.size) if image
                                                                   else (None, None, None))
        assert meta.column("caption").to_pylist()[0] == f"photo 0 of shard {part.id} seed 0"
        embedded = part.embedded_mask()
        assert list(np.flatnonzero(~embedded)) == [CORRUPT, NO_IMAGE]
        img, txt, ref = part.load("img"), part.load("txt"), reference(ckpt, tar)
        assert img.dtype == np.float16 and img.shape == (PER_SHARD, DIM)
        for i, key in enumerate(meta.column("key").to_pylist()):
            if not embedded[i]:
                assert not img[i].any() and not txt[i].any()
                continue
            np.testing.assert_allclose(img[i].astype(np.float32), ref[key][0], atol=2e-3)
            np.testing.assert_allclose(txt[i].astype(np.float32), ref[key][1], atol=2e-3)
        norms = np.linalg.norm(img[embedded].astype(np.float32), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=2e-3)


def test_float32_no_captions_and_plain_tars_without_sidecar(tmp_path, ckpt):
    shards = tmp_path / "plain"
    shards.mkdir()
    write_tar_shard(shards, 0, sidecar=False)
    m = run(cfg(shards, ckpt, tmp_path / "emb", dtype="float32", captions=False))
    part = next(embed_parts(tmp_path / "emb"))
    img, txt = part.load("img"), part.load("txt")
    assert img.dtype == np.float32 and img.any() and not txt.any() and m["captions"] is False
    meta = pq.read_table(part.meta)
    assert meta.column("width").to_pylist() == [10 + i for i in range(PER_SHARD)]  # the json's scalar fields
    assert meta.column("url").to_pylist()[1] == "http://x.test/000000001"
    ref = reference(ckpt, str(shards / "shard-00000.tar"))
    np.testing.assert_allclose(img[0], ref["000000000"][0], atol=1e-5)


def test_missing_and_corrupt_tars_are_failed_parts(tmp_path, ckpt, capsys):
    shards = make_shards(tmp_path / "shards", 3)
    os.unlink(shards / "shard-00001.tar")  # listed by the manifest, gone
    data = (shards / "shard-00002.tar").read_bytes()
    (shards / "shard-00002.tar").write_bytes(data[:len(data) // 2])  # cut in the middle
    m = run(cfg(shards, ckpt, tmp_path / "emb"))
    assert [p["id"] for p in m["parts"]] == [0] and sorted(m["failed"]) == ["1", "2"]
    assert m["failed"]["1"]["type"] == "FileNotFoundError" and m["failed"]["1"]["shard"] == "shard-00001.tar"
    assert "truncated" in m["failed"]["2"]["error"] or m["failed"]["2"]["type"] in ("ReadError", "EOFError")
    assert not part_paths(tmp_path / "emb", 2)[2].exists()  # no partial part
    rc = main([str(shards), "--checkpoint", ckpt[0], "--out", str(tmp_path / "emb"), "--executor", "local"])
    assert rc == 1 and "FAILED part 1" in capsys.readouterr().err


def test_rerun_skips_recomputes_changes_and_resumes(tmp_path, ckpt, monkeypatch):
    shards, out = make_shards(tmp_path / "shards", 3), tmp_path / "emb"
    first = run(cfg(shards, ckpt, out))
    before = mtimes(out)

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(checkpoint, "load_pretrained", refuse)
    again = run(cfg(shards, ckpt, out))  # every part complete: no model load, no file rewritten
    assert again["run"]["parts_skipped"] == 3 and again["parts"] == first["parts"] and mtimes(out) == before
    monkeypatch.undo()

    write_tar_shard(shards, 1, seed=7, n=PER_SHARD + 1, sidecar=False)  # a changed tar; the old sidecar stays
    part_paths(out, 2)[2].unlink()  # a run killed before part 2's meta was written
    m = run(cfg(shards, ckpt, out))
    assert (m["run"]["parts_computed"], m["run"]["parts_skipped"], m["failed"]) == (2, 1, {})
    after = mtimes(out)
    assert all(after[p] == t for p, t in before.items() if "00000" in p.name)  # part 0 untouched
    assert all(after[p] != t for p, t in before.items() if "00001" in p.name or "00002" in p.name)
    assert m["parts"][1]["rows"] == PER_SHARD + 1 and read_part_info(part_paths(out, 1)[2])["rows"] == PER_SHARD + 1
    meta = pq.read_table(part_paths(out, 1)[2])
    assert meta.column("caption").to_pylist()[0] == "photo 0 of shard 1 seed 7"
    assert meta.column("source_id").to_pylist()[-2:] == [100 + PER_SHARD - 1, None]  # a key the sidecar lacks

    entries = json.loads((shards / "manifest.json").read_text())["shards"][:2]  # the listing shrinks
    write_manifest(shards, entries)
    (out / "emb" / ".img-00000.npy.x.tmp").write_bytes(b"left by a killed writer")
    m = run(cfg(shards, ckpt, out))
    assert [p["id"] for p in m["parts"]] == [0, 1] and m["run"]["parts_skipped"] == 2
    assert not any(p.exists() for p in part_paths(out, 2)) and not list((out / "emb").glob(".*.tmp"))


# ------------------------------------------------------------------------------------------------ filter reuse
def make_filter_dir(root, shards, sha: str) -> dict:
    """A FILTER_DIR whose ledger holds the keys of every shard sample with an image except the corrupt one,
    spread over two ledger parts in a scrambled order, with known unit vectors; one of them left zero (a row the
    filter never scored). -> {key: (img vector, txt vector)} of the rows that must be reused."""
    rng = np.random.default_rng(5)
    keys = [f"{s:04d}{i:05d}" for s in range(2) for i in range(PER_SHARD) if i not in (CORRUPT, NO_IMAGE)]
    keys += ["999900000", "999900001"]  # rows the shards do not have
    rng.shuffle(keys)
    parts = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    known, unscored = {}, "000000004"
    (root / "ledger").mkdir(parents=True)
    (root / "emb").mkdir()
    for p, part_keys in enumerate(parts):
        n = len(part_keys) + 3  # and rows of other keys before them
        img, txt = np.zeros((n, DIM), np.float16), np.zeros((n, DIM), np.float16)
        rows = rng.permutation(n)[: len(part_keys)]
        for key, r in zip(part_keys, rows):
            if key == unscored:
                continue
            v = rng.normal(size=(2, DIM))
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            img[r], txt[r] = v.astype(np.float16)
            known[key] = (img[r].astype(np.float32), txt[r].astype(np.float32))
        others = [f"other{p}-{j}" for j in range(3)]
        ledger_rows = sorted(list(zip(part_keys, rows.tolist())) + list(zip(others, sorted(set(range(n)) -
                                                                                           set(rows.tolist())))),
                             key=lambda kr: kr[1])
        pq.write_table(pa.table({"key": [k for k, _ in ledger_rows],
                                 "part_row": pa.array([r for _, r in ledger_rows], pa.int32())}),
                       root / "ledger" / f"part-{p:05d}.parquet")
        np.save(embedding_paths(root, p)[0], img)
        np.save(embedding_paths(root, p)[1], txt)
    atomic_write_json(root / "emb" / "info.json", {"checkpoint": "x", "weights_sha256": sha, "dim": DIM,
                                                   "dtype": "float16"})
    write_filter_manifest(root, {"parts": [{"part": f"part-{p:05d}", "rows": 1, "kept": 1} for p in range(2)]})
    return {k: v for k, v in known.items() if not k.startswith("9999")}


def test_filter_reuse_takes_known_vectors_by_key(tmp_path, ckpt):
    filt = tmp_path / "filter"
    shards, out = make_shards(tmp_path / "shards", 2, filter_dir=filt), tmp_path / "emb"
    known = make_filter_dir(filt, shards, weights_sha256(ckpt[0]))
    m = run(cfg(shards, ckpt, out))
    assert m["reuse"]["used"] is True and m["reused_rows"] == len(known) == m["run"]["rows_reused"]
    assert m["num_embedded"] == 2 * (PER_SHARD - 2) and m["run"]["rows_encoded"] == 1  # the unscored row
    assert sum(read_part_info(part_paths(out, s)[2])["reused"] for s in range(2)) == len(known)
    assert not (out / "_clipforge").exists()  # the lookup is scratch
    for part in embed_parts(out):
        keys = pq.read_table(part.meta, columns=["key"]).column("key").to_pylist()
        img, txt = part.load("img"), part.load("txt")
        ref = reference(ckpt, str(shards / part.shard))
        for i, key in enumerate(keys):
            if key in known:
                np.testing.assert_array_equal(img[i].astype(np.float32), known[key][0])
                np.testing.assert_array_equal(txt[i].astype(np.float32), known[key][1])
            elif key in ref:  # the row the filter never scored: encoded by the model
                np.testing.assert_allclose(img[i].astype(np.float32), ref[key][0], atol=2e-3)
    # the same dir under other weights: nothing reused; --no-reuse: nothing either
    atomic_write_json(filt / "emb" / "info.json", {"weights_sha256": "0" * 64, "dim": DIM, "dtype": "float16"})
    other = run(cfg(shards, ckpt, tmp_path / "emb2"))
    assert other["reused_rows"] == 0 and "other weights" in other["reuse"]["why"]
    assert run(cfg(shards, ckpt, tmp_path / "emb3", reuse=False))["reused_rows"] == 0


def test_filter_dir_flag_overrides_the_manifest(tmp_path, ckpt):
    filt = tmp_path / "filter"
    shards = make_shards(tmp_path / "shards", 2)  # the manifest names no filter dir
    known = make_filter_dir(filt, shards, weights_sha256(ckpt[0]))
    assert run(cfg(shards, ckpt, tmp_path / "emb"))["reused_rows"] == 0
    assert run(cfg(shards, ckpt, tmp_path / "emb2", filter_dir=str(filt)))["reused_rows"] == len(known)
    with pytest.raises(ValueError, match="--filter-dir"):
        run(cfg(shards, ckpt, tmp_path / "emb3", filter_dir=str(tmp_path / "nope")))


# ------------------------------------------------------------------------------------------------ Ray executor
def test_ray_executor_gives_the_local_bytes(ray_local, tmp_path, ckpt):
    shards = make_shards(tmp_path / "shards", 2)
    local = run(cfg(shards, ckpt, tmp_path / "local"))
    remote = run(cfg(shards, ckpt, tmp_path / "ray", executor="ray", actors=2))
    assert remote["run"]["actors"] == 2 and remote["failed"] == {} and remote["parts"] == local["parts"]
    for s in range(2):
        a, b = part_paths(tmp_path / "local", s), part_paths(tmp_path / "ray", s)
        assert a[0].read_bytes() == b[0].read_bytes() and a[1].read_bytes() == b[1].read_bytes()
        assert pq.read_table(a[2]).equals(pq.read_table(b[2]))
    again = run(cfg(shards, ckpt, tmp_path / "ray", executor="ray"))
    assert again["run"]["parts_skipped"] == 2 and again["run"]["actors"] == 0  # no actor started for done parts
