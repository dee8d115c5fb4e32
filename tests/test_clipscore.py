"""pipeline/clipscore.py: the CLIP-score step on a tiny random CLIP, real crawl tars and features parts.

Scores are checked against the cosine computed directly with the model; the npy files against the features
parts' rows; reruns against file mtimes; distribution with two actors, an actor that dies, a part that always fails.
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

from pipeline.clipscore import (FAULT_ENV, ClipScoreConfig, PartScorer, ScoreJob, info_path, load_image, read_part,
                                score_parts, scores_path)
from pipeline.distribute import DistributeConfig
from trainer.clip.checkpoint import CheckpointError, save_model, weights_sha256
from trainer.clip.configs import get_config
from trainer.clip.flags import with_flags
from trainer.clip.formats.ledger import WORK_DIR, embedding_paths
from trainer.clip.formats.shards import iter_tar_samples, write_tar
from trainer.clip.model import CLIP
from trainer.clip.tokenizer import tokenize
from trainer.clip.transform import image_transform

N_ROWS = 26
REASON = {3: "caption_too_short", 5: "crawl_failed", 11: "language"}  # rows the earlier rules dropped
NO_IMAGE = {5, 7}  # row 7: no reason, but no image either
CORRUPT = 9
DIST = DistributeConfig(retry_backoff_s=0.0, progress_interval_s=0.0)


def _model(seed: int) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(get_config("tiny")).eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two tiny random checkpoints: {"a": (dir, model), "b": (dir, model)}."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        model = _model(seed)
        out[name] = (str(save_model(model, root / name)), model)
    return out


def _image_bytes(rng, i: int) -> tuple[str, bytes]:
    w, h = int(rng.integers(40, 120)), int(rng.integers(40, 120))
    mode = ("RGB", "L", "RGBA")[i % 3]
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    arr = rng.integers(0, 255, (h, w, channels), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)
    buf = io.BytesIO()
    ext = "png" if mode == "RGBA" else "jpg"
    img.save(buf, "PNG" if ext == "png" else "JPEG")
    return ext, buf.getvalue()


def make_part(root, shard_id: int) -> tuple[ScoreJob, dict]:
    """A crawl tar + features parquet. -> (job, {part_row: (image bytes, caption)} of the rows that have an image)."""
    rng = np.random.default_rng(100 + shard_id)
    tar = root / "crawl" / f"{shard_id:05d}.tar"
    tar.parent.mkdir(parents=True, exist_ok=True)
    samples, images = [], {}
    for i in range(N_ROWS):
        caption = f"a photo of thing {i} in shard {shard_id}" + (" and more words" * 20 if i == 2 else "")
        if i in NO_IMAGE:
            images[i] = (None, caption)
            continue
        ext, data = _image_bytes(rng, i)
        if i == CORRUPT:
            data = b"\xff\xd8\xff\xe0 this is not a jpeg at all" * 4
        key = f"{shard_id:05d}{i:04d}"
        samples.append({"__key__": key, ext: data, "txt": caption, "json": {"key": key}})
        images[i] = (data, caption, key, ext)
    write_tar(tar, samples, durable=False)
    where = {s.key: next(m for e, m in s.members.items() if e in ("jpg", "png"))
             for s in iter_tar_samples(tar, read=lambda ext: False)}
    cols = {c: [] for c in ("part_row", "key", "caption", "shard", "image_ext", "image_offset", "image_size",
                            "reason")}
    for i in range(N_ROWS):
        has = images[i][0] is not None
        key = images[i][2] if has else f"{shard_id:05d}{i:04d}"
        member = where[key] if has else None
        for c, v in (("part_row", i), ("key", key), ("caption", images[i][1]), ("shard", tar.name),
                     ("image_ext", images[i][3] if has else None), ("image_offset", member.offset if has else None),
                     ("image_size", member.size if has else None), ("reason", REASON.get(i))):
            cols[c].append(v)
    schema = pa.schema([("part_row", pa.int32()), ("key", pa.string()), ("caption", pa.string()),
                        ("shard", pa.string()), ("image_ext", pa.string()), ("image_offset", pa.int64()),
                        ("image_size", pa.int64()), ("reason", pa.string())])
    features = root / "filter" / WORK_DIR / "features" / f"part-{shard_id:05d}.parquet"
    features.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols, schema=schema), features)
    return ScoreJob(shard_id, str(tar), str(features)), {i: v[:2] for i, v in images.items() if v[0] is not None}


def candidates() -> list[int]:
    return [i for i in range(N_ROWS) if i not in REASON and i not in NO_IMAGE]


@torch.no_grad()
def reference(model: CLIP, images: dict) -> dict:
    """{part_row: (cosine, image emb, text emb)} computed directly with the model, for the decodable candidates."""
    preprocess, out = image_transform(model.config.vision.image_size), {}
    for i in candidates():
        if i == CORRUPT:
            continue
        data, caption = images[i]
        x = preprocess(Image.open(io.BytesIO(data))).unsqueeze(0)
        fi = torch.nn.functional.normalize(model.encode_image(x), dim=-1)[0]
        ft = torch.nn.functional.normalize(
            model.encode_text(tokenize([caption], context_length=model.config.text.context_length)), dim=-1)[0]
        out[i] = (float(fi @ ft), fi.numpy(), ft.numpy())
    return out


def _scores(filter_dir, shard_id) -> dict:
    t = pq.read_table(scores_path(filter_dir, shard_id))
    return dict(zip(t.column("part_row").to_pylist(), t.column("clip_score").to_pylist()))


def _meta(filter_dir, shard_id) -> dict:
    return {k.decode(): v.decode() for k, v in pq.read_schema(scores_path(filter_dir, shard_id)).metadata.items()}


def _check_part(filter_dir, shard_id, images, model, sha, dtype=np.float16):
    ref = reference(model, images)
    got = _scores(filter_dir, shard_id)
    assert sorted(got) == candidates()  # one row per candidate row
    assert got[CORRUPT] is None  # the corrupt image: a null score
    for i, (cos, _, _) in ref.items():
        assert got[i] == pytest.approx(cos, abs=1e-3)
    assert _meta(filter_dir, shard_id)["weights_sha256"] == sha
    img_p, txt_p = embedding_paths(filter_dir, shard_id)
    img, txt = np.load(img_p), np.load(txt_p)
    assert img.shape == txt.shape == (N_ROWS, model.config.embed_dim) and img.dtype == dtype
    for i in range(N_ROWS):
        if i in ref:
            np.testing.assert_allclose(img[i].astype(np.float32), ref[i][1], atol=2e-3)
            np.testing.assert_allclose(txt[i].astype(np.float32), ref[i][2], atol=2e-3)
        else:  # a reason, no image, or the corrupt one
            assert not img[i].any() and not txt[i].any()


# ------------------------------------------------------------------------------------------------ no Ray
def test_config_validation_and_flags():
    cfg = ClipScoreConfig()
    assert not cfg.enabled and cfg.clip_mode == "off" and ClipScoreConfig(clip_checkpoint="x").enabled
    assert all(name.startswith("clip_") for name in cfg.__dataclass_fields__)
    assert with_flags(cfg, clip_mode="top_fraction", clip_top_fraction=0.5).clip_top_fraction == 0.5
    for bad in ({"clip_mode": "best"}, {"clip_threshold": 1.5}, {"clip_top_fraction": 0.0},
                {"clip_batch_size": 0}, {"clip_actors": -1}, {"clip_cpus_per_actor": 0},
                {"clip_device": "tpu"}, {"clip_embedding_dtype": "int8"}):
        with pytest.raises(ValueError, match="--clip-"):
            ClipScoreConfig(**bad)


def test_weights_sha256(ckpts, tmp_path):
    path, _ = ckpts["a"]
    want = hashlib.sha256(open(os.path.join(path, "model.safetensors"), "rb").read()).hexdigest()
    assert weights_sha256(path) == want == weights_sha256(os.path.join(path, "model.safetensors"))
    assert weights_sha256(ckpts["b"][0]) != want
    with pytest.raises(CheckpointError):
        weights_sha256(tmp_path / "nope")
    with pytest.raises(CheckpointError):
        weights_sha256(tmp_path)  # a dir without weights


def test_load_image_counts_bad_ranges(tmp_path):
    job, images = make_part(tmp_path, 0)
    size = os.path.getsize(job.crawl_tar)
    part = read_part(job)
    prep = image_transform(64)
    fd = os.open(job.crawl_tar, os.O_RDONLY)
    try:
        good = int(np.flatnonzero(part.rows == 0)[0])
        assert load_image(fd, int(part.offsets[good]), int(part.sizes[good]), prep).shape == (3, 64, 64)
        assert load_image(fd, size - 10, 100, prep) is None  # cut short by the end of the file
        assert load_image(fd, -1, 100, prep) is None and load_image(fd, 0, -1, prep) is None
        assert load_image(fd, 0, 1 << 40, prep) is None  # an absurd size: no huge read
        assert load_image(fd, 0, 512, prep) is None  # a tar header is not an image
    finally:
        os.close(fd)
    assert part.n == N_ROWS and list(part.rows) == candidates()


def test_read_part_rejects_bad_features(tmp_path):
    job, _ = make_part(tmp_path, 0)
    t = pq.read_table(job.features)
    pq.write_table(t.drop(["image_size"]), job.features)
    with pytest.raises(ValueError, match="image_size"):
        read_part(job)
    pq.write_table(t.set_column(0, "part_row", pa.array(list(range(1, N_ROWS + 1)), pa.int32())), job.features)
    with pytest.raises(ValueError, match="part_row"):
        read_part(job)


@pytest.fixture
def keep_torch_threads():
    """PartScorer sets torch's thread count (an actor's CPUs); in the test process it is put back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_part_scorer_in_process_float32_no_embeddings(ckpts, tmp_path, keep_torch_threads):
    path, model = ckpts["a"]
    job, images = make_part(tmp_path, 4)
    filter_dir = str(tmp_path / "filter")
    cfg = ClipScoreConfig(clip_checkpoint=path, clip_batch_size=5, clip_embedding_dtype="float32")
    r = PartScorer(cfg, weights_sha256(path)).score(filter_dir, job)
    assert (r["scored"], r["decode_failed"], r["reused"]) == (len(candidates()) - 1, 1, False)
    _check_part(filter_dir, 4, images, model, weights_sha256(path), dtype=np.float32)
    # the same part without embeddings: recomputed, and the npy files of the other setting are gone
    scorer = PartScorer(ClipScoreConfig(clip_checkpoint=path, clip_save_embeddings=False), weights_sha256(path))
    assert scorer.score(filter_dir, job)["reused"] is False
    assert not any(p.exists() for p in embedding_paths(filter_dir, 4))
    assert scorer.score(filter_dir, job)["reused"] is True


def test_part_scorer_part_without_candidates(ckpts, tmp_path, keep_torch_threads):
    path, _ = ckpts["a"]
    job, _ = make_part(tmp_path, 6)
    t = pq.read_table(job.features)
    pq.write_table(t.set_column(t.column_names.index("reason"), "reason", pa.array(["language"] * N_ROWS)),
                   job.features)
    filter_dir = str(tmp_path / "filter")
    r = PartScorer(ClipScoreConfig(clip_checkpoint=path), weights_sha256(path)).score(filter_dir, job)
    assert (r["rows"], r["scored"], r["decode_failed"], r["dim"]) == (N_ROWS, 0, 0, 128)
    assert pq.read_table(scores_path(filter_dir, 6)).num_rows == 0
    img = np.load(embedding_paths(filter_dir, 6)[0])
    assert img.shape == (N_ROWS, 128) and not img.any()


# ------------------------------------------------------------------------------------------------ on Ray
def test_score_parts_two_actors_rerun_and_other_checkpoint(ray_local, ckpts, tmp_path):
    (path_a, model_a), (path_b, model_b) = ckpts["a"], ckpts["b"]
    parts = [make_part(tmp_path, s) for s in (0, 1)]
    jobs, filter_dir = [job for job, _ in parts], str(tmp_path / "filter")
    cfg = ClipScoreConfig(clip_checkpoint=path_a, clip_batch_size=4)
    sha_a = weights_sha256(path_a)

    r = score_parts(cfg, filter_dir, jobs, DIST)
    assert (r["parts"], r["reused"], r["failed"], r["dim"], r["weights_sha256"]) == (2, 0, {}, 128, sha_a)
    assert r["scored"] == r["computed"] == 2 * (len(candidates()) - 1) and r["decode_failed"] == 2
    assert r["actors"] == 2 and len(r["parts_by_actor"]) == 2  # two parts went to two actors
    for (job, images) in parts:
        _check_part(filter_dir, job.shard_id, images, model_a, sha_a)
    info = json.loads(info_path(filter_dir).read_text())
    assert info == {"checkpoint": os.path.abspath(path_a), "weights_sha256": sha_a, "dim": 128, "dtype": "float16"}

    files = [p for job in jobs for p in (scores_path(filter_dir, job.shard_id), *embedding_paths(filter_dir,
                                                                                                  job.shard_id))]
    mtimes = [p.stat().st_mtime_ns for p in files]
    again = score_parts(cfg, filter_dir, jobs, DIST)
    assert (again["reused"], again["parts"], again["computed"], again["scored"]) == (2, 2, 0, r["scored"])
    assert [p.stat().st_mtime_ns for p in files] == mtimes  # nothing rewritten

    other = score_parts(with_flags(cfg, clip_checkpoint=path_b), filter_dir, jobs, DIST)
    assert (other["reused"], other["parts"], other["failed"]) == (0, 2, {})
    for (job, images) in parts:
        _check_part(filter_dir, job.shard_id, images, model_b, weights_sha256(path_b))
    assert json.loads(info_path(filter_dir).read_text())["weights_sha256"] == weights_sha256(path_b)


def test_score_parts_changed_features_recompute_that_part(ray_local, ckpts, tmp_path):
    path, model = ckpts["a"]
    parts = [make_part(tmp_path, s) for s in (0, 1)]
    jobs, filter_dir = [job for job, _ in parts], str(tmp_path / "filter")
    cfg = ClipScoreConfig(clip_checkpoint=path, clip_batch_size=8)
    assert score_parts(cfg, filter_dir, jobs, DIST)["computed"] > 0
    t = pq.read_table(jobs[1].features)  # a rerun of the rules now drops row 0 of part 1
    reasons = t.column("reason").to_pylist()
    reasons[0] = "aspect_ratio"
    pq.write_table(t.set_column(t.column_names.index("reason"), "reason", pa.array(reasons, pa.string())),
                   jobs[1].features)
    r = score_parts(cfg, filter_dir, jobs, DIST)
    assert (r["reused"], r["parts"], r["computed"]) == (1, 2, len(candidates()) - 2)
    assert 0 not in _scores(filter_dir, 1) and 0 in _scores(filter_dir, 0)
    assert not np.load(embedding_paths(filter_dir, 1)[0])[0].any()


def test_score_parts_actor_death_is_retried(ray_local, ckpts, tmp_path, monkeypatch, capsys):
    path, model = ckpts["a"]
    parts = [make_part(tmp_path, s) for s in (0, 1)]
    jobs, filter_dir = [job for job, _ in parts], str(tmp_path / "filter")
    monkeypatch.setenv(FAULT_ENV, "die:1")  # the actor scoring part 1 dies on the first attempt
    r = score_parts(ClipScoreConfig(clip_checkpoint=path), filter_dir, jobs, DIST)
    assert (r["parts"], r["failed"]) == (2, {})
    assert "part 1 attempt 1 failed (ActorDiedError" in capsys.readouterr().err  # it did die, and was retried
    _check_part(filter_dir, 1, parts[1][1], model, weights_sha256(path))


def test_score_parts_reports_parts_that_always_fail(ray_local, ckpts, tmp_path, monkeypatch):
    path, _ = ckpts["a"]
    parts = [make_part(tmp_path, s) for s in (0, 1)]
    jobs, filter_dir = [job for job, _ in parts], str(tmp_path / "filter")
    missing = ScoreJob(2, jobs[0].crawl_tar, str(tmp_path / "no-such-features.parquet"))
    monkeypatch.setenv(FAULT_ENV, "raise:1")
    dist = DistributeConfig(max_shard_retry=1, retry_backoff_s=0.0, progress_interval_s=0.0)
    r = score_parts(ClipScoreConfig(clip_checkpoint=path), filter_dir, [*jobs, missing], dist)
    assert r["parts"] == 1 and sorted(r["failed"]) == [1, 2]
    assert r["failed"][1]["type"] == "RuntimeError" and r["failed"][1]["attempts"] == 2
    assert r["failed"][2]["attempts"] == 2 and "no-such-features" in r["failed"][2]["error"]
    assert scores_path(filter_dir, 0).exists() and not scores_path(filter_dir, 1).exists()
