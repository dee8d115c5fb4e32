"""The training data stream: shard split across slots, weighted sources, img2dataset output, exact resume."""
import json
from collections import Counter

import pytest
import torch

from helpers import write_shards
from trainer.data import DataError, read_shards, read_sources, shard_sequence, slot_shards, train_batches


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2] for x, y in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_state_gives_the_same_batches(tmp_path, workers):
    """A stream rebuilt from state_dict() after batch k yields exactly batches k+1... of the uninterrupted stream,
    shuffle buffer spanning shard boundaries, corrupt samples and DataLoader workers included."""
    shards = read_shards(write_shards(tmp_path / "s", n_shards=3, per_shard=10, size=32, corrupt_keys={4, 17}))
    kw = dict(image_size=32, context_length=16, batch_size=4, seed=3, rank=1, world=2, workers=workers,
              shuffle_buffer=6)
    ref = _take(train_batches(shards, **kw), 12)
    first = train_batches(shards, **kw)
    _take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip too
    resumed = train_batches(shards, **kw, state=state)
    assert _same(_take(resumed, 7), ref[5:])
    assert sum(b[2] for b in ref) >= 1  # corrupt samples were met, skipped and counted


def test_different_world_size_restarts_without_error(tmp_path, caplog):
    shards = read_shards(write_shards(tmp_path / "s", n_shards=2, per_shard=8, size=32))
    kw = dict(image_size=32, context_length=16, batch_size=4, shuffle_buffer=4)
    it = train_batches(shards, **kw, world=1)
    _take(it, 2)
    other = train_batches(shards, **kw, world=2, state=it.state_dict())
    assert len(_take(other, 2)) == 2
    assert "data stream restarts" in caplog.text


def test_shards_are_split_across_slots(tmp_path):
    shards = read_shards(write_shards(tmp_path / "s", n_shards=6, per_shard=2, size=32))
    seen = [[url for _, url in zip(range(3), (u for _, u in slot_shards([shards], 0, False, s, 6)))]
            for s in range(6)]
    first_round = [urls[0] for urls in seen]
    assert sorted(first_round) == sorted(shards.tars)  # one epoch: every shard read by exactly one slot
    resampled = Counter(u for _, u in zip(range(600), shard_sequence([shards], 0, resampled=True)))
    assert set(resampled) == set(shards.tars) and min(resampled.values()) > 60


def test_weighted_sources_and_img2dataset_output(tmp_path):
    a = write_shards(tmp_path / "a", n_shards=2, per_shard=10, size=32)  # clipforge layout (manifest)
    b = write_shards(tmp_path / "b", n_shards=4, per_shard=5, size=32, manifest=False)  # img2dataset layout
    for i, tar in enumerate(sorted(b.glob("*.tar"))):
        tar.rename(b / f"{i:05d}.tar")
        (b / f"{i:05d}_stats.json").write_text(json.dumps({"successes": 5, "failed_to_download": 2}))
    sources = read_sources([str(a), str(b)], [3.0, 1.0])
    assert sources[1].num_samples == 20 and len(sources[1].tars) == 4
    # weights are sample shares: 3:1 although source b has twice as many (smaller) shards
    draws = list(zip(range(4000), shard_sequence(sources, 0)))
    per_source = Counter(("a" if "/a/" in u else "b", 10 if "/a/" in u else 5) for _, u in draws)
    samples = {k[0]: n * k[1] for k, n in per_source.items()}
    assert 2.6 < samples["a"] / samples["b"] < 3.4
    # the stream reads both layouts
    it = train_batches(sources, 32, 16, batch_size=5, shuffle_buffer=4)
    assert all(b[0].shape == (5, 3, 32, 32) for b in _take(it, 6))
    with pytest.raises(DataError):
        read_sources([str(a), str(b)], [1.0])
    with pytest.raises(DataError):
        read_sources([str(a)], [0.0])


def test_missing_tars_are_left_out_and_reported(tmp_path):
    root = write_shards(tmp_path / "s", n_shards=3, per_shard=6, size=32)
    (root / "shard-00001.tar").unlink()
    s = read_shards(root)
    assert len(s.tars) == 2 and s.num_samples == 12 and s.missing_tars == 1
    for tar in root.glob("*.tar"):
        tar.unlink()
    with pytest.raises(DataError, match="no samples"):
        read_shards(root)
