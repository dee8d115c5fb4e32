"""trainer.evaluate and trainer.evaldata: metric functions on hand-made features, zero-shot on solid-colour images with a model whose
answers are known, the linear probe, the `clipforge eval` CLI end to end, and 2 gloo ranks (odd sample counts,
a corrupt image) giving the single-process metrics with the same number of forward calls on every rank; plus the
same on a DeepSpeed ZeRO-3 engine (where every forward is a collective)."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipeline.cli import main as cli_main
from trainer import evaldata as ed
from trainer import evaluate as ev
from trainer.clip.checkpoint import save_model
from trainer.clip.formats.shards import MANIFEST, write_shard_dir
from trainer.clip.model import CLIP, get_config
from trainer.clip.tokenizer import tokenize
from trainer.clip.transform import MEAN, STD
from helpers import free_port, write_shards

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
CLASSES = {"classnames": ["red", "green", "blue"], "templates": ["a {} square.", "a photo of something {}."]}


# ----------------------------------------------------------------------------------------------- builders
def _image_bytes(rgb, size=32, fmt="PNG", noise_seed=None):
    if noise_seed is not None:
        arr = np.random.default_rng(noise_seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    else:
        arr = np.full((size, size, 3), rgb, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def write_labelled_shards(root, items, per_shard=4, manifest=True):
    """items: dicts with rgb (None: a corrupt image), and optional caption, cls (int -> .cls member),
    label (-> "label" in the .json member), noise (seed: a random-noise image instead of a solid colour)."""
    def sample(k, it):
        sample = {"__key__": f"{k:06d}"}
        if it.get("rgb") is None and it.get("noise") is None:
            sample["png"] = b"\x89PNG\r\n\x1a\n not an image"
        else:
            sample["png"] = _image_bytes(it.get("rgb"), noise_seed=it.get("noise"))
        if "caption" in it:
            sample["txt"] = it["caption"]
        if "cls" in it:
            sample["cls"] = str(it["cls"])
        meta = {"key": f"{k:06d}"}
        if "label" in it:
            meta["label"] = it["label"]
        sample["json"] = json.dumps(meta)
        return sample

    starts = range(0, len(items), per_shard)
    write_shard_dir(root, ((sample(k, it) for k, it in enumerate(items[s: s + per_shard], start=s)) for s in starts),
                    durable=False)
    if not manifest:
        (root / MANIFEST).unlink()
    return root


def write_image_folder(root, per_class=2, corrupt_in=None):
    for folder, rgb in (("red", COLOURS["red"]), ("green", COLOURS["green"]), ("dark_blue", COLOURS["blue"])):
        d = root / folder
        d.mkdir(parents=True)
        for i in range(per_class):
            (d / f"{i}.png").write_bytes(_image_bytes(rgb))
        (d / "notes.txt").write_text("not an image")
    if corrupt_in:
        (root / corrupt_in / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def colour_items():
    """12 solid-colour samples, 4 per colour; a red image labelled green and a blue image labelled red; labels
    as .cls indices and as .json names; plus a corrupt image and an unlabelled sample (both skipped)."""
    names = CLASSES["classnames"]
    items = []
    for k in range(12):
        colour = names[k % 3]
        label = {3: "green", 5: "red"}.get(k, colour)  # k=3: a red image labelled green; k=5: blue labelled red
        items.append({"rgb": COLOURS[colour], **({"cls": names.index(label)} if k % 2 else {"label": label})})
    items.insert(7, {"rgb": None, "cls": 0})  # corrupt image
    items.insert(2, {"rgb": COLOURS["red"]})  # no label
    return items


EXPECTED_TOP1 = 10 / 12
EXPECTED_PER_CLASS = (3 / 4 + 4 / 5 + 3 / 3) / 3  # red-labelled: 3 of 4; green-labelled: 4 of 5; blue: 3 of 3


class ColourModel(nn.Module):
    """A CLIP stand-in with known answers: an image's feature is its mean RGB; a text's is the count of the words
    red / green / blue in it. forward(images, tokens) -> (image features, text features, scale), like CLIP."""

    def __init__(self):
        super().__init__()
        self.word_ids = [int(tokenize([w], 8)[0, 1]) for w in ("red", "green", "blue")]
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))
        self.calls = 0

    def forward(self, images, tokens):
        self.calls += 1
        rgb = (images * self.std + self.mean).mean(dim=(2, 3))  # [B, 3]
        words = torch.stack([(tokens == i).sum(dim=1) for i in self.word_ids], dim=1).float()  # [B, 3]
        return F.normalize(rgb, dim=-1), F.normalize(words, dim=-1), torch.tensor(1.0)


def _tiny(seed=0):
    torch.manual_seed(seed)
    return CLIP(get_config("tiny")).eval()


# ----------------------------------------------------------------------------------------------- imports
def test_evaluate_reexports_the_data_api_and_imports_no_deepspeed_or_ray():
    # trainer/loop.py and pipeline/cli.py import these from trainer.evaluate
    from trainer.evaluate import EvalDataError, build_eval_data, evaluate, flatten_metrics, main

    assert EvalDataError is ed.EvalDataError and build_eval_data is ed.build_eval_data
    assert all(callable(f) for f in (evaluate, flatten_metrics, main))
    code = ("import sys, trainer.evaluate, trainer.evaldata; "
            "print([m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'ray')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]", out.stdout


# ----------------------------------------------------------------------------------------------- metrics
def test_retrieval_metrics_identity_and_constructed():
    x = F.normalize(torch.randn(20, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    m = ev.retrieval_metrics(x, x)
    assert all(v == 1.0 for v in m.values()) and len(m) == 6

    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]])  # caption 1 describes image 1 but looks like image 0
    m = ev.retrieval_metrics(img, txt, ks=(1, 2, 3))
    # text->image: caption 0 rank 0, caption 1: images 0 (1 > 0) and 2 (tie 0 = 0) ahead -> rank 2, caption 2 rank 0
    assert m["text_to_image_R@1"] == pytest.approx(2 / 3) and m["text_to_image_R@2"] == pytest.approx(2 / 3)
    assert m["text_to_image_R@3"] == 1.0
    # image->text: image 0 ties caption 1 (rank 1), image 1 ties captions 0 and 2 (rank 2), image 2 rank 0
    assert m["image_to_text_R@1"] == pytest.approx(1 / 3) and m["image_to_text_R@2"] == pytest.approx(2 / 3)
    assert m["image_to_text_R@3"] == 1.0

    # several captions per image: image->text hits when ANY of its captions is in the top k
    img = torch.eye(2)
    txt = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])  # image 0's captions: 0 (looks like image 1) and 1
    m = ev.retrieval_metrics(img, txt, image_index_of_text=[0, 0, 1], ks=(1,))
    assert m["image_to_text_R@1"] == 1.0
    assert m["text_to_image_R@1"] == pytest.approx(2 / 3)

    # collapsed features: every score ties -> ties count against the model
    same = torch.ones(5, 4) / 2
    m = ev.retrieval_metrics(same, same, ks=(1, 5))
    assert m["text_to_image_R@1"] == 0.0 and m["image_to_text_R@1"] == 0.0 and m["text_to_image_R@5"] == 1.0
    with pytest.raises(ValueError):
        ev.retrieval_metrics(torch.eye(2), torch.eye(3))


def test_retrieval_metrics_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(37, 8, generator=g), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(37, 8, generator=g), dim=-1)
    full = ev.retrieval_metrics(img, txt, chunk=1000)
    assert ev.retrieval_metrics(img, txt, chunk=5) == full
    assert 0 < full["text_to_image_R@1"] < full["text_to_image_R@5"] <= full["text_to_image_R@10"] < 1


def test_zeroshot_metrics_known_values():
    W = torch.eye(6)  # [D, C]: class c = direction c
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    feats = torch.eye(6)[[0, 0, 0, 1, 1, 1, 5, 2]]  # sample 3 predicts 1 (label 0), sample 6 predicts 5 (label 2)
    m = ev.zeroshot_metrics(feats, labels, W)
    assert m["top1"] == pytest.approx(6 / 8)
    assert m["mean_per_class_recall"] == pytest.approx((3 / 4 + 1 + 1 / 2) / 3)
    # misses: the true class ties with 4 other zero logits behind the winner -> rank 5 -> not in the top 5
    assert m["top5"] == pytest.approx(6 / 8)
    feats2 = feats.clone()
    feats2[3] = torch.tensor([0.5, 1, 0, 0, 0, 0])  # true class second: a top-5 hit
    assert ev.zeroshot_metrics(feats2, labels, W)["top5"] == pytest.approx(7 / 8)


def test_rank_slice_pads_to_equal_lengths():
    assert ev.rank_slice(7, 0, 2) == ([0, 1, 2, 3], 4)
    assert ev.rank_slice(7, 1, 2) == ([4, 5, 6, 6], 3)
    assert ev.rank_slice(1, 1, 2) == ([0], 0)
    assert ev.rank_slice(5, 3, 4) == ([4, 4], 0)
    for n in range(1, 12):
        for world in (1, 2, 3, 4):
            parts = [ev.rank_slice(n, r, world) for r in range(world)]
            assert len({len(idx) for idx, _ in parts}) == 1
            assert [i for idx, v in parts for i in idx[:v]] == list(range(n))


def test_linear_probe_separable_and_random_labels():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32)) * 3
    y_tr, y_te = rng.integers(0, 4, 400), rng.integers(0, 4, 200)
    x_tr = centres[y_tr] + rng.normal(size=(400, 32))
    x_te = centres[y_te] + rng.normal(size=(200, 32))
    names = np.array(["cat", "dog", "emu", "fox"])
    r = ev.linear_probe(x_tr, names[y_tr], x_te, names[y_te])
    assert r["top1"] >= 0.95 and r["mean_per_class_accuracy"] >= 0.95
    assert r["num_classes"] == 4 and len(r["sweep"]) == len(ev.DEFAULT_CS) and r["best_C"] in ev.DEFAULT_CS

    random_tr, random_te = rng.integers(0, 4, 400), rng.integers(0, 4, 400)
    r = ev.linear_probe(rng.normal(size=(400, 32)), random_tr, rng.normal(size=(400, 32)), random_te)
    assert abs(r["top1"] - 0.25) < 0.08, r

    with pytest.raises(ValueError, match="2 classes"):
        ev.linear_probe(x_tr, np.zeros(400), x_te, y_te)


# ----------------------------------------------------------------------------------------------- data + evaluate
def test_zeroshot_on_solid_colours_with_known_answers(tmp_path):
    data = write_labelled_shards(tmp_path / "zs", colour_items())
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES))
    s = ed.load_zeroshot_set(data, tmp_path / "classes.json")
    assert len(s) == 13 and s.skipped == {"no_label": 1} and s.templates == CLASSES["templates"]
    model = ColourModel().train()
    out = ev.evaluate(model, ed.EvalData(zeroshot=s), "cpu", batch_size=4, image_size=32, context_length=16)
    z = out["zeroshot"]
    assert z["top1"] == pytest.approx(EXPECTED_TOP1) and z["top5"] == 1.0
    assert z["mean_per_class_recall"] == pytest.approx(EXPECTED_PER_CLASS)
    assert z["num_samples"] == 12 and z["num_classes"] == 3 and z["num_templates"] == 2
    assert z["skipped"] == 2 and z["skipped_reasons"] == {"corrupt_image": 1, "no_label": 1}
    assert model.calls == 2 + 4  # ceil(6 prompts / 4) + ceil(13 images / 4): one model call per batch
    assert model.training  # train/eval mode restored


def test_imagefolder_zeroshot_and_classes_file(tmp_path):
    root = write_image_folder(tmp_path / "folder", corrupt_in="green")
    s = ed.load_zeroshot_set(root)
    assert s.kind == "imagefolder" and s.classnames == ["dark blue", "green", "red"]
    assert s.templates == list(ed.DEFAULT_TEMPLATES) and len(s) == 7
    out = ev.evaluate(ColourModel(), ed.EvalData(zeroshot=s), "cpu", batch_size=3, image_size=32,
                      context_length=16)["zeroshot"]
    assert out["top1"] == 1.0 and out["num_samples"] == 6 and out["skipped_reasons"] == {"corrupt_image": 1}

    # with a classes file the folder names map onto its classnames (and the classifier covers them all)
    (tmp_path / "c.json").write_text(json.dumps({"classnames": ["red", "green", "dark blue", "purple"]}))
    s = ed.load_zeroshot_set(root, tmp_path / "c.json")
    assert s.classnames == ["red", "green", "dark blue", "purple"] and sorted(set(s.labels.tolist())) == [0, 1, 2]
    (tmp_path / "bad.json").write_text(json.dumps({"classnames": ["red", "green"]}))
    with pytest.raises(ed.EvalDataError, match="dark blue"):
        ed.load_zeroshot_set(root, tmp_path / "bad.json")


def test_bad_labelled_data_raises_clear_errors(tmp_path):
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES))
    unlabelled = write_shards(tmp_path / "plain", n_shards=1, per_shard=3)
    with pytest.raises(ed.EvalDataError, match="no labelled sample"):
        ed.load_labelled_set(unlabelled, tmp_path / "classes.json")
    unknown = write_labelled_shards(tmp_path / "unknown", [{"rgb": (1, 2, 3), "label": "purple"}])
    with pytest.raises(ed.EvalDataError, match="'purple' is not one of"):
        ed.load_labelled_set(unknown, tmp_path / "classes.json")
    out_of_range = write_labelled_shards(tmp_path / "range", [{"rgb": (1, 2, 3), "cls": 7}])
    with pytest.raises(ed.EvalDataError, match="out of range"):
        ed.load_labelled_set(out_of_range, tmp_path / "classes.json")
    indices_only = write_labelled_shards(tmp_path / "idx", [{"rgb": (1, 2, 3), "cls": 0}, {"rgb": (3, 2, 1), "cls": 1}])
    assert ed.load_labelled_set(indices_only).label_names() == ["0", "1"]  # fine for a linear probe
    with pytest.raises(ed.EvalDataError, match="zero-shot needs a classes file"):
        ed.load_zeroshot_set(indices_only)
    with pytest.raises(ed.EvalDataError, match="not found"):
        ed.load_retrieval_set(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ed.EvalDataError, match="neither"):
        ed.load_labelled_set(tmp_path / "empty")
    (tmp_path / "t.json").write_text(json.dumps({"classnames": ["a"], "templates": ["no placeholder"]}))
    with pytest.raises(ed.EvalDataError, match="placeholder"):
        ed.load_classes(tmp_path / "t.json")


def test_retrieval_features_match_the_model_and_mode_is_restored(tmp_path):
    root = write_shards(tmp_path / "ret", n_shards=2, per_shard=5, size=40, corrupt_keys={3}, manifest=False)
    s = ed.load_retrieval_set(root)
    assert len(s) == 10
    model = _tiny()
    model.train()
    model.visual.eval()  # a mixed state must come back as it was
    out = ev.evaluate(model, ed.EvalData(retrieval=s), "cpu", batch_size=4)["retrieval"]
    assert model.training and not model.visual.training and model.transformer.training
    assert out["num_images"] == 9 and out["skipped"] == 1 and out["skipped_reasons"] == {"corrupt_image": 1}
    assert set(out) >= {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}

    # the features evaluate() scores are the model's own embeddings of the preprocessed images and captions
    feats, ok = ev.embed_images(model, s.samples, "cpu", batch_size=3)
    assert ok.tolist() == [k != 3 for k in range(10)] and float(feats[3].abs().sum()) == 0.0
    from trainer.clip.transform import image_transform
    pre = image_transform(64)
    with torch.no_grad():
        model.eval()
        ref_img = model.encode_image(torch.stack([pre(ed.read_image(s.samples[i])) for i in range(10) if i != 3]),
                                     normalize=True)
        ref_txt = model.encode_text(tokenize([s.samples[i].caption for i in range(10) if i != 3], 32), normalize=True)
    torch.testing.assert_close(feats[ok], ref_img, atol=1e-5, rtol=1e-4)
    assert out == {**ev.retrieval_metrics(ref_img, ref_txt), **{k: out[k] for k in
                   ("num_images", "num_texts", "skipped", "skipped_reasons")}}


# ----------------------------------------------------------------------------------------------- CLI
def _cli_fixture(tmp_path):
    ckpt = save_model(_tiny(), tmp_path / "ckpt")
    ret = write_shards(tmp_path / "ret", n_shards=2, per_shard=6, size=40, corrupt_keys={5})
    zs = write_labelled_shards(tmp_path / "zs", colour_items())
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES))
    folder_train = write_image_folder(tmp_path / "lp_train", per_class=4)
    folder_test = write_image_folder(tmp_path / "lp_test", per_class=2, corrupt_in="red")
    return ckpt, ret, zs, folder_train, folder_test


def test_cli_end_to_end_and_bad_input(tmp_path, capsys):
    ckpt, ret, zs, lp_train, lp_test = _cli_fixture(tmp_path)
    out = tmp_path / "out" / "metrics.json"
    rc = cli_main(["eval", "--checkpoint", str(ckpt), "--retrieval", str(ret), "--zeroshot", str(zs),
                   "--classes", str(tmp_path / "classes.json"), "--linear-probe-train", str(lp_train),
                   "--linear-probe-test", str(lp_test), "--batch-size", "8", "--workers", "1",
                   "--lp-cs", "0.1", "1", "10", "--out", str(out)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    result = json.loads(printed[-1])
    assert json.loads(out.read_text()) == result
    r, z, lp = result["retrieval"], result["zeroshot"], result["linear_probe"]
    for d in ("image_to_text", "text_to_image"):
        assert all(0.0 <= r[f"{d}_R@{k}"] <= 1.0 for k in (1, 5, 10))
        assert r[f"{d}_R@1"] <= r[f"{d}_R@5"] <= r[f"{d}_R@10"]
    assert r["num_images"] == 11 and r["skipped"] == 1
    assert 0 <= z["top1"] <= z["top5"] <= 1 and 0 <= z["mean_per_class_recall"] <= 1
    assert z["num_samples"] == 12 and z["num_classes"] == 3 and z["num_templates"] == 2 and z["skipped"] == 2
    # solid colours are trivially separable even for a random-init image tower
    assert lp["top1"] == 1.0 and lp["num_train"] == 12 and lp["num_test"] == 6 and lp["num_classes"] == 3
    assert [row["C"] for row in lp["sweep"]] == [0.1, 1.0, 10.0]
    assert lp["skipped"] == {"train": 0, "test": 1}
    assert result["skipped"] == 1 + 2 + 1

    bad = [
        ["--checkpoint", str(ckpt), "--retrieval", str(tmp_path / "missing")],  # missing dir
        ["--checkpoint", str(ckpt), "--zeroshot", str(ret), "--classes", str(tmp_path / "classes.json")],  # no labels
        ["--checkpoint", str(tmp_path / "no_ckpt"), "--retrieval", str(ret)],  # missing checkpoint
        ["--checkpoint", str(ckpt)],  # nothing to evaluate
        ["--checkpoint", str(ckpt), "--linear-probe-train", str(lp_train)],  # test set missing
        ["--checkpoint", str(ckpt), "--zeroshot", str(zs), "--classes", str(tmp_path / "nope.json")],
    ]
    write_labelled_shards(tmp_path / "unknown", [{"rgb": (1, 2, 3), "label": "purple"}])
    bad.append(["--checkpoint", str(ckpt), "--zeroshot", str(tmp_path / "unknown"), "--classes",
                str(tmp_path / "classes.json")])  # unknown class name
    for argv in bad:
        assert ev.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and "error" in err, (argv, err)


# ----------------------------------------------------------------------------------------------- distributed
WORLD = 2


def _dist_data(root):
    ret = write_labelled_shards(root / "ret", [{"noise": k, "caption": f"a picture of thing {k}"} for k in range(6)]
                                + [{"rgb": None, "caption": "broken"}], per_shard=3)  # 7 samples, one corrupt
    zs = write_labelled_shards(root / "zs", [{"rgb": COLOURS[c], "label": c} for c in ("red", "green", "blue",
                                                                                       "red", "blue")])
    (root / "classes.json").write_text(json.dumps({**CLASSES, "templates": CLASSES["templates"] + ["{}"]}))
    return ed.build_eval_data(retrieval=ret, zeroshot=zs, classes=root / "classes.json")


def _counting(model):
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _rank_main(rank, port, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        data = _dist_data_loaded(root)
        model = _tiny()
        calls = _counting(model)
        metrics = ev.evaluate(model, data, "cpu", rank=rank, world=WORLD, batch_size=2)
        feats, ok = ev.embed_images(model, data.retrieval.samples, "cpu", rank=rank, world=WORLD, batch_size=2)
        torch.save({"metrics": metrics, "calls": calls[0], "feats": feats, "ok": ok},
                   os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _dist_data_loaded(root):
    root = Path(root)
    return ed.build_eval_data(retrieval=root / "ret", zeroshot=root / "zs", classes=root / "classes.json")


def test_two_ranks_equal_single_process(tmp_path):
    data = _dist_data(tmp_path)
    assert len(data.retrieval) == 7 and len(data.zeroshot) == 5  # odd: rank 1 gets padding
    mp.spawn(_rank_main, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    model = _tiny()
    calls = _counting(model)
    single = ev.evaluate(model, data, "cpu", batch_size=2)
    feats, ok = ev.embed_images(model, data.retrieval.samples, "cpu", batch_size=2)
    assert calls[0] == 4 + 5 + 3 + 4  # retrieval ceil(7/2), prompts ceil(9/2), zero-shot ceil(5/2), embed_images
    assert got[0]["calls"] == got[1]["calls"] == 2 + 3 + 2 + 2  # per rank: ceil(ceil(n/2)/2) per pass
    assert single["retrieval"]["skipped_reasons"] == {"corrupt_image": 1} and single["retrieval"]["num_images"] == 6
    for g in got:
        for task in ("retrieval", "zeroshot"):
            for k, v in single[task].items():
                assert g["metrics"][task][k] == pytest.approx(v, abs=1e-6), (task, k)
        assert g["ok"].tolist() == ok.tolist()
        torch.testing.assert_close(g["feats"], feats, atol=1e-5, rtol=1e-4)
    assert got[0]["metrics"] == got[1]["metrics"]


def _zero3_rank(rank, port, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    from trainer.config import TrainConfig
    from trainer.engine import build_engine, destroy_distributed, init_distributed
    from trainer.step import train_step

    cfg = TrainConfig.tiny(batch_size=2, zero=3, grad_checkpointing=False)
    init_distributed(cfg)
    try:
        engine, _, _ = build_engine(cfg, WORLD, total_steps=4, model=_tiny())
        clip = engine.module.model
        assert clip.positional_embedding.numel() == 0  # partitioned: only a forward hook can gather it
        engine.train()
        metrics = ev.evaluate(clip, _dist_data_loaded(root), "cpu", rank=rank, world=WORLD, batch_size=2)
        assert clip.training
        images = torch.randn(2, 3, 64, 64)
        loss, _ = train_step(engine, [(images, tokenize([f"rank {rank} a", f"rank {rank} b"], 32))])  # still trains
        torch.save({"metrics": metrics, "loss": float(loss)}, os.path.join(root, f"z3_rank{rank}.pt"))
        engine.destroy()
    finally:
        destroy_distributed()


@pytest.mark.slow  # DeepSpeed start-up on 2 CPU ranks: 15-30 s on a 2-core machine
def test_zero3_engine_module_two_ranks(tmp_path):
    """Under ZeRO-3 the CLIP's own parameters are gathered only by its forward hook: evaluate() must go through
    model(images, tokens) (encode_text called directly would fail), on the same call count on every rank."""
    data = _dist_data(tmp_path)
    mp.spawn(_zero3_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    single = ev.evaluate(_tiny(), data, "cpu", batch_size=2)
    for r in range(WORLD):
        got = torch.load(tmp_path / f"z3_rank{r}.pt")
        assert np.isfinite(got["loss"])
        for task in ("retrieval", "zeroshot"):
            for k, v in single[task].items():
                assert got["metrics"][task][k] == pytest.approx(v, abs=1e-6), (r, task, k)


def test_zeroshot_synonyms_average_every_name(tmp_path):
    from trainer.evaluate import zeroshot_classifier

    model = _tiny()
    templates = ["a {}.", "an icon of {}."]
    plain = zeroshot_classifier(model, ["cat", "car"], templates, "cpu")
    with_syn = zeroshot_classifier(model, ["cat", "car"], templates, "cpu", synonyms={"cat": ["kitten", "tabby"]})
    assert torch.allclose(plain[:, 1], with_syn[:, 1])  # no synonyms: unchanged
    # one template: each name's column is its normalised prompt embedding, and a class with synonyms is the
    # renormalised mean of its names' embeddings
    one = ["a {}."]
    every = zeroshot_classifier(model, ["cat", "kitten", "tabby"], one, "cpu")
    syn = zeroshot_classifier(model, ["cat"], one, "cpu", synonyms={"cat": ["kitten", "tabby"]})
    assert torch.allclose(syn[:, 0], torch.nn.functional.normalize(every.mean(dim=1), dim=0), atol=1e-5)
    assert not torch.allclose(with_syn[:, 0], plain[:, 0], atol=1e-3)
    (tmp_path / "c.json").write_text(json.dumps({"classnames": ["cat"], "synonyms": {"dog": ["puppy"]}}))
    with pytest.raises(ed.EvalDataError, match="not classnames"):
        ed.load_classes(tmp_path / "c.json")
    (tmp_path / "c.json").write_text(json.dumps({"classnames": ["cat"], "synonyms": {"cat": []}}))
    with pytest.raises(ed.EvalDataError, match="non-empty lists"):
        ed.load_classes(tmp_path / "c.json")
    (tmp_path / "c.json").write_text(json.dumps({"classnames": ["cat"], "synonyms": {"cat": ["kitten"]}}))
    assert ed.load_classes(tmp_path / "c.json")[2] == {"cat": ["kitten"]}
