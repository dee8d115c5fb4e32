"""Evaluation of a CLIP: zero-shot classification, image<->text retrieval and a linear probe.

    python -m trainer.evaluate --checkpoint RUN/checkpoint --retrieval HELDOUT_SHARDS \
        --zeroshot DATA --classes classes.json \
        --linear-probe-train TRAIN_DATA --linear-probe-test TEST_DATA --out metrics.json
    (= clipforge eval ...)

Metrics follow CLIP_benchmark's conventions:
  * zero-shot: per class, the mean of the L2-normalised text embeddings of its prompts (class name put into each
    template), renormalised -> classifier W [D, C]; logits = image_features @ W; top-1, top-5 and the mean
    per-class recall (top-1 accuracy of each class present, averaged over classes).
  * retrieval: the full score matrix; text->image R@k = the caption's image is among the top k images;
    image->text R@k = any of the image's captions is among the top k texts.
  * linear probe (paper section 3.2): scikit-learn L-BFGS logistic regression on frozen, L2-normalised image
    features (standardised with the training split's mean / std), the inverse L2 strength C picked by a small
    sweep on a held-out 20% of the training set, then refit on the whole training set with the best C;
    top-1 and mean per-class accuracy on the test set.
  Ties count against the model (a collapsed model whose features are all equal scores 0, never 1).

Eval data (what --retrieval, --zeroshot and --linear-probe-* accept; how samples, labels and classes files are
read; how the sets are scanned once): see trainer.evaldata. Its build_eval_data, EvalData and EvalDataError are
importable from here too.

Distributed use (inside the training loop, every rank at the same time):

    eval_data = build_eval_data(retrieval=HELDOUT_DIR, zeroshot=DATA, classes=FILE)   # once, every rank
    ...
    metrics = evaluate(engine.module.model, eval_data, device, rank=rank, world=world)  # every rank

Each rank embeds a contiguous slice of the samples (and of the zero-shot prompts), padded to the same length, so
every rank runs exactly the same number of forward calls on batches of the same shapes (under DeepSpeed ZeRO-3
every forward is a collective); the padded features are all-gathered, the padding dropped, and every rank computes
the metrics from the same gathered tensors with the same CPU code, so all ranks return the same numbers.

Every embedding goes through `model(images, tokens)` (the module's __call__, so forward hooks run: ZeRO-3 gathers
the CLIP's own top-level parameters - positional_embedding, text_projection - only in the CLIP's forward hook,
and calling `encode_text` directly on a ZeRO-3 model fails). An image-only batch passes one placeholder prompt,
a text-only batch one blank image; their outputs are discarded. The model runs in eval mode under no_grad; each
submodule's train/eval flag is restored afterwards. Works with world=1 without torch.distributed.

Pure torch + numpy (+ scikit-learn, imported by the linear probe only); no DeepSpeed, no Ray.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.clip.flags import CLI, opt, require, run_main
from trainer.clip.formats.atomic import atomic_write_json
from trainer.data import DataError
from trainer.evaldata import (EvalCollate, EvalData, EvalDataError, EvalItems, EvalSample, EvalSet,
                              build_eval_data, load_labelled_set)
from trainer.clip.tokenizer import tokenize

DEFAULT_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)  # linear-probe sweep over the inverse L2 strength
RECALL_KS = (1, 5, 10)


# ----------------------------------------------------------------------------------------------- model calls
@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """model.eval() + torch.no_grad(); every submodule's train/eval flag is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, training in modes:
            m.training = training


def _model_sizes(model, image_size: int | None, context_length: int | None) -> tuple[int, int]:
    config = getattr(model, "config", None)
    if image_size is None:
        image_size = getattr(getattr(config, "vision", None), "image_size", None)
    if context_length is None:
        context_length = getattr(getattr(config, "text", None), "context_length", None)
    if image_size is None or context_length is None:
        raise ValueError("the model has no .config: pass image_size= and context_length=")
    return int(image_size), int(context_length)


def _forward(model, images, tokens, device, image_size: int, context_length: int):
    """(image features | None, text features | None), L2-normalised float32, through model.__call__."""
    dummy_images, dummy_tokens = images is None, tokens is None
    if dummy_images:
        images = torch.zeros(1, 3, image_size, image_size)
    if dummy_tokens:
        tokens = tokenize([""], context_length)
    img, txt = model(images.to(device, non_blocking=True), tokens.to(device, non_blocking=True))[:2]
    img = None if dummy_images else F.normalize(img.float(), dim=-1)
    txt = None if dummy_tokens else F.normalize(txt.float(), dim=-1)
    return img, txt


def _check_world(rank: int, world: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad rank {rank} / world {world}")
    if world > 1:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"world={world} needs an initialised torch.distributed process group")
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise ValueError(f"rank {rank} / world {world} do not match the process group "
                             f"({dist.get_rank()} / {dist.get_world_size()})")


def rank_slice(n: int, rank: int, world: int) -> tuple[list[int], int]:
    """This rank's share of n items: (global indices padded to ceil(n / world) by repeating the last item,
    number of real ones). Every rank gets the same length, so the same number of batches."""
    per = math.ceil(n / world)
    start = rank * per
    valid = max(0, min(per, n - start))
    return [min(start + j, n - 1) for j in range(per)], valid


def _embed(model, n: int, samples, texts, device, *, batch_size: int, workers: int, rank: int, world: int,
           image_size: int, context_length: int):
    """Embed n items (images of `samples` and/or `texts`) split over the ranks -> on every rank, in global
    order: (image features [n, D] | None, text features [n, D] | None, decoded ok [n] bool), float32 on CPU."""
    indices, _ = rank_slice(n, rank, world)
    loader = torch.utils.data.DataLoader(
        EvalItems(indices, samples, texts, image_size), batch_size=batch_size, shuffle=False,
        num_workers=workers, collate_fn=EvalCollate(context_length))
    imgs, txts, oks = [], [], []
    with eval_mode(model):
        for images, tokens, ok in loader:  # one model call per batch
            img, txt = _forward(model, images, tokens, device, image_size, context_length)
            if img is not None:
                imgs.append(img)
            if txt is not None:
                txts.append(txt)
            oks.append(ok)
    d_img = imgs[0].shape[1] if imgs else 0
    parts = [torch.cat(x) for x in (imgs, txts) if x] + [torch.cat(oks).to(device).float()[:, None]]
    local = torch.cat(parts, dim=1)  # [per, (D) + (D) + 1]
    if world > 1:
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local.contiguous())
    else:
        gathered = [local]
    full = torch.cat([g[: rank_slice(n, r, world)[1]] for r, g in enumerate(gathered)]).cpu()  # [n, ...]
    assert len(full) == n
    img = full[:, :d_img].contiguous() if imgs else None
    txt = full[:, d_img: -1].contiguous() if txts else None
    return img, txt, full[:, -1] > 0.5


def embed_images(model, samples: Sequence[EvalSample], device, *, batch_size: int = 64, workers: int = 0,
                 rank: int = 0, world: int = 1, image_size: int | None = None,
                 context_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (image features [n, D] float32 CPU, decoded ok [n] bool); rows of undecodable images are zeros."""
    _check_world(rank, world)
    image_size, context_length = _model_sizes(model, image_size, context_length)
    img, _, ok = _embed(model, len(samples), list(samples), None, device, batch_size=batch_size, workers=workers,
                        rank=rank, world=world, image_size=image_size, context_length=context_length)
    img[~ok] = 0
    return img, ok


def zeroshot_classifier(model, classnames: Sequence[str], templates: Sequence[str], device, *,
                        batch_size: int = 256, rank: int = 0, world: int = 1, image_size: int | None = None,
                        context_length: int | None = None, synonyms: dict[str, Sequence[str]] | None = None
                        ) -> torch.Tensor:
    """-> W [D, C] float32 CPU: per class the mean of its normalised prompt embeddings (every template with the
    class name and each of its synonyms), renormalised. The prompts are split over the ranks (same call count on
    every rank)."""
    _check_world(rank, world)
    image_size, context_length = _model_sizes(model, image_size, context_length)
    if not classnames or not templates:
        raise ValueError("zero-shot needs at least one class name and one template")
    names = [[c, *(synonyms or {}).get(c, ())] for c in classnames]
    prompts = [t.replace("{}", n) for ns in names for n in ns for t in templates]  # class-major
    _, txt, _ = _embed(model, len(prompts), None, prompts, device, batch_size=batch_size, workers=0, rank=rank,
                       world=world, image_size=image_size, context_length=context_length)
    counts = torch.tensor([len(ns) * len(templates) for ns in names])
    per_class = torch.stack([x.mean(dim=0) for x in torch.split(txt, counts.tolist())])  # [C, D]
    return F.normalize(per_class, dim=-1).T.contiguous()  # [D, C]


# ----------------------------------------------------------------------------------------------- metrics
def zeroshot_metrics(image_features, labels, classifier, chunk: int = 4096) -> dict:
    """image_features [N, D], labels [N] (class indices), classifier [D, C] -> top1, top5, mean per-class
    recall. A class counts as within the top k when fewer than k other classes score at least as high."""
    x = torch.as_tensor(image_features, dtype=torch.float32)
    w = torch.as_tensor(classifier, dtype=torch.float32)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"{len(x)} features for {len(y)} labels")
    if int(y.min()) < 0 or int(y.max()) >= w.shape[1]:
        raise ValueError("label out of the classifier's range")
    ranks = torch.empty(len(x), dtype=torch.long)
    for s in range(0, len(x), chunk):
        logits = 100.0 * x[s: s + chunk] @ w  # [c, C]
        true = logits.gather(1, y[s: s + chunk, None])
        ranks[s: s + chunk] = (logits >= true).sum(dim=1) - 1
    top1 = ranks < 1
    per_class = [top1[y == c].float().mean().item() for c in torch.unique(y).tolist()]
    return {"top1": top1.float().mean().item(), "top5": (ranks < 5).float().mean().item(),
            "mean_per_class_recall": float(np.mean(per_class))}


def retrieval_metrics(image_features, text_features, image_index_of_text=None, ks: Sequence[int] = RECALL_KS,
                      chunk: int = 1024) -> dict:
    """Recall@k both ways over the full score matrix (computed in row chunks).

    image_index_of_text[j] = the image that caption j describes (default: j). text->image: hit when fewer than k
    other images score at least as high as the caption's image; image->text: hit when fewer than k non-captions
    of the image score at least as high as its best caption. Images without a caption are left out of image->text.
    """
    img = torch.as_tensor(image_features, dtype=torch.float32)
    txt = torch.as_tensor(text_features, dtype=torch.float32)
    ni, nt = len(img), len(txt)
    if image_index_of_text is None:
        if ni != nt:
            raise ValueError(f"{ni} images and {nt} texts: pass image_index_of_text")
        idx = torch.arange(nt)
    else:
        idx = torch.as_tensor(np.asarray(image_index_of_text), dtype=torch.long)
    if ni == 0 or nt == 0 or len(idx) != nt or int(idx.min()) < 0 or int(idx.max()) >= ni:
        raise ValueError("retrieval needs images, texts and a valid image index per text")
    t2i = torch.empty(nt, dtype=torch.long)
    for s in range(0, nt, chunk):
        scores = txt[s: s + chunk] @ img.T  # [c, ni]
        true = scores.gather(1, idx[s: s + chunk, None])
        t2i[s: s + chunk] = (scores >= true).sum(dim=1) - 1
    i2t = torch.empty(ni, dtype=torch.long)
    for s in range(0, ni, chunk):
        scores = img[s: s + chunk] @ txt.T  # [c, nt]
        pos = idx[None, :] == torch.arange(s, min(s + chunk, ni))[:, None]  # [c, nt]: caption of this image
        best = scores.masked_fill(~pos, float("-inf")).max(dim=1).values  # [c]
        i2t[s: s + chunk] = ((scores >= best[:, None]) & ~pos).sum(dim=1)
    i2t = i2t[torch.bincount(idx, minlength=ni) > 0]
    out = {f"image_to_text_R@{k}": (i2t < k).float().mean().item() for k in ks}
    out.update({f"text_to_image_R@{k}": (t2i < k).float().mean().item() for k in ks})
    return out


def _accuracy(pred: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    correct = pred == y
    per_class = [correct[y == c].mean() for c in np.unique(y)]
    return float(correct.mean()), float(np.mean(per_class))


def linear_probe(train_features, train_labels, test_features, test_labels, Cs: Sequence[float] = DEFAULT_CS,
                 val_fraction: float = 0.2, max_iter: int = 1000, seed: int = 0, standardize: bool = True) -> dict:
    """Logistic regression (L-BFGS) on frozen features; C picked on a held-out split of the training set, then
    refit on the whole training set. Labels may be any hashable values (ints or class names).

    -> {"top1", "mean_per_class_accuracy", "best_C", "sweep": [{"C", "val_top1"}], "num_train", "num_test",
        "num_classes", "converged"}. Raises ValueError on fewer than 2 classes or empty inputs."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    Xtr, Xte = np.asarray(train_features, dtype=np.float32), np.asarray(test_features, dtype=np.float32)
    ytr, yte = np.asarray(train_labels), np.asarray(test_labels)
    if len(Xtr) != len(ytr) or len(Xte) != len(yte) or len(Xte) == 0:
        raise ValueError(f"linear probe: {len(Xtr)}/{len(ytr)} train and {len(Xte)}/{len(yte)} test features/labels")
    classes, counts = np.unique(ytr, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"linear probe needs at least 2 classes in the training set, got {len(classes)}")
    Cs = sorted(float(c) for c in Cs)
    if not Cs or Cs[0] <= 0:
        raise ValueError("linear probe: Cs must be positive")

    def scaled(Xa, Xb):
        if not standardize:
            return Xa, Xb
        scaler = StandardScaler().fit(Xa)  # statistics of the fitting split only
        return scaler.transform(Xa), scaler.transform(Xb)

    def fit_predict(clf, Xa, ya, Xb):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(Xa, ya)
        return clf.predict(Xb)

    sweep = []
    best_C = Cs[0] if len(Cs) == 1 else 1.0
    n_val = int(round(val_fraction * len(Xtr)))
    if len(Cs) > 1 and n_val >= 1 and len(Xtr) - n_val >= 2:
        can_stratify = counts.min() >= 2 and min(n_val, len(Xtr) - n_val) >= len(classes)
        Xf, Xv, yf, yv = train_test_split(Xtr, ytr, test_size=n_val, random_state=seed,
                                          stratify=ytr if can_stratify else None)
        if len(np.unique(yf)) >= 2:
            Xf, Xv = scaled(Xf, Xv)
            clf = LogisticRegression(max_iter=max_iter, warm_start=True)  # warm starts along increasing C
            for C in Cs:
                clf.set_params(C=C)
                sweep.append({"C": C, "val_top1": float((fit_predict(clf, Xf, yf, Xv) == yv).mean())})
            best_C = max(sweep, key=lambda r: r["val_top1"])["C"]  # first maximum: the strongest regularisation
    clf = LogisticRegression(C=best_C, max_iter=max_iter)
    Xa, Xb = scaled(Xtr, Xte)
    pred = fit_predict(clf, Xa, ytr, Xb)
    top1, per_class = _accuracy(pred, yte)
    return {"top1": top1, "mean_per_class_accuracy": per_class, "best_C": best_C, "sweep": sweep,
            "num_train": int(len(Xtr)), "num_test": int(len(Xte)), "num_classes": int(len(classes)),
            "converged": bool(np.max(clf.n_iter_) < max_iter)}


# ----------------------------------------------------------------------------------------------- evaluate
def _skips(evalset: EvalSet, ok: torch.Tensor) -> dict:
    reasons = Counter(evalset.skipped)
    bad = int((~ok).sum())
    if bad:
        reasons["corrupt_image"] += bad
    return {"skipped": int(sum(reasons.values())), "skipped_reasons": dict(sorted(reasons.items()))}


def _require_decoded(ok: torch.Tensor, what: str, s: EvalSet) -> None:
    if not bool(ok.any()):
        raise EvalDataError(f"{what}: no image in {s.root} could be decoded")


def _retrieval(model, s: EvalSet, device, kw: dict) -> dict:
    img, txt, ok = _embed(model, len(s), s.samples, [x.caption for x in s.samples], device, **kw)
    _require_decoded(ok, "retrieval", s)
    metrics = retrieval_metrics(img[ok], txt[ok])
    return {**metrics, "num_images": int(ok.sum()), "num_texts": int(ok.sum()), **_skips(s, ok)}


def _zeroshot(model, s: EvalSet, device, kw: dict) -> dict:
    classifier = zeroshot_classifier(model, s.classnames, s.templates, device, batch_size=kw["batch_size"],
                                     rank=kw["rank"], world=kw["world"], image_size=kw["image_size"],
                                     context_length=kw["context_length"], synonyms=s.synonyms)
    img, _, ok = _embed(model, len(s), s.samples, None, device, **kw)
    _require_decoded(ok, "zero-shot", s)
    metrics = zeroshot_metrics(img[ok], s.labels[ok.numpy()], classifier)
    return {**metrics, "num_samples": int(ok.sum()), "num_classes": len(s.classnames),
            "num_templates": len(s.templates),
            "num_synonyms": sum(len(v) for v in (s.synonyms or {}).values()), **_skips(s, ok)}


def evaluate(model: torch.nn.Module, data: EvalData, device, rank: int = 0, world: int = 1, *,
             batch_size: int = 64, workers: int = 0, image_size: int | None = None,
             context_length: int | None = None) -> dict:
    """Zero-shot and retrieval metrics of `model` on `data`; call it on EVERY rank at the same time.

    model: the plain CLIP nn.Module (under DeepSpeed: engine.module.model); it runs in eval mode under no_grad
    and its train/eval flags are restored. Returns (identical on every rank)
    {"retrieval": {image_to_text_R@1/5/10, text_to_image_R@1/5/10, num_images, num_texts, skipped, skipped_reasons},
     "zeroshot": {top1, top5, mean_per_class_recall, num_samples, num_classes, num_templates, skipped, ...}}
    with a key only for the sets `data` holds. Raises EvalDataError when a set has no decodable image."""
    _check_world(rank, world)
    image_size, context_length = _model_sizes(model, image_size, context_length)
    kw = dict(batch_size=batch_size, workers=workers, rank=rank, world=world, image_size=image_size,
              context_length=context_length)
    out = {}
    with eval_mode(model):
        if data.retrieval is not None:
            out["retrieval"] = _retrieval(model, data.retrieval, device, kw)
        if data.zeroshot is not None:
            out["zeroshot"] = _zeroshot(model, data.zeroshot, device, kw)
    return out


def flatten_metrics(metrics: dict, prefix: str = "eval") -> dict[str, float]:
    """{"retrieval": {"text_to_image_R@1": x}} -> {"eval/retrieval/text_to_image_R@1": x} (numbers only),
    e.g. for metrics.jsonl / TensorBoard scalars."""
    out = {}
    for k, v in metrics.items():
        name = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten_metrics(v, name))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = v
    return out


# ----------------------------------------------------------------------------------------------- CLI
def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class EvalRunConfig:
    """What `clipforge eval` evaluates (the data formats: trainer.evaldata)."""
    checkpoint: str = opt("", required=True, help="CKPT_DIR (model.safetensors + config.json) or an OpenAI / "
                                                  "open_clip / HF checkpoint")
    retrieval: str | None = opt(None, metavar="SHARDS_DIR", help="image<->text retrieval on (image, caption) shards")
    zeroshot: str | None = opt(None, metavar="DATA", help="zero-shot classification: labelled shards or ImageFolder")
    classes: str | None = opt(None, metavar="FILE.json", help='zero-shot {"classnames": [...], "templates": [...]}')
    linear_probe_train: str | None = opt(None, metavar="DATA", help="linear probe training data (labelled)")
    linear_probe_test: str | None = opt(None, metavar="DATA", help="linear probe test data (labelled)")
    linear_probe_classes: str | None = opt(None, metavar="FILE.json", help="classnames for the linear-probe labels")
    lp_cs: list[float] = opt(default_factory=lambda: list(DEFAULT_CS), metavar="C",
                             help="inverse L2 strengths swept on a 20% validation split of the training set")
    lp_max_iter: int = opt(1000, help="L-BFGS iterations")
    batch_size: int = opt(64, help="images (or prompts) per forward pass")
    workers: int = opt(2, help="image decoding processes (0: in the main process)")
    device: str = opt(default_factory=_default_device, help="torch device")
    out: str | None = opt(None, metavar="metrics.json", help="also write the metrics here (atomically)")

    def __post_init__(self):
        if not (self.retrieval or self.zeroshot or self.linear_probe_train or self.linear_probe_test):
            raise ValueError("nothing to evaluate: give --retrieval, --zeroshot and/or "
                             "--linear-probe-train/--linear-probe-test")
        if bool(self.linear_probe_train) != bool(self.linear_probe_test):
            raise ValueError("--linear-probe-train and --linear-probe-test go together")
        if self.classes and not self.zeroshot:
            raise ValueError("--classes is for --zeroshot")
        for name in ("batch_size", "lp_max_iter"):
            require(self, name, getattr(self, name) >= 1, "must be >= 1")
        require(self, "workers", self.workers >= 0, "must be >= 0")
        require(self, "lp_cs", min(self.lp_cs) > 0, "must be > 0")


def run(args: EvalRunConfig) -> dict:
    from trainer.clip.checkpoint import load_pretrained

    t0 = time.perf_counter()
    # every data set is scanned (and validated) before the model is loaded: bad input fails fast
    data = build_eval_data(args.retrieval, args.zeroshot, args.classes)
    lp_train = lp_test = None
    if args.linear_probe_train:
        lp_train = load_labelled_set(args.linear_probe_train, args.linear_probe_classes)
        lp_test = load_labelled_set(args.linear_probe_test, args.linear_probe_classes)
    model, _, _ = load_pretrained(args.checkpoint, device=args.device)
    result: dict = {"checkpoint": str(args.checkpoint), "device": str(args.device)}
    result.update(evaluate(model, data, args.device, batch_size=args.batch_size, workers=args.workers))
    if lp_train is not None:
        x, y, skips = {}, {}, {}
        for name, s in (("train", lp_train), ("test", lp_test)):
            feats, ok = embed_images(model, s.samples, args.device, batch_size=args.batch_size, workers=args.workers)
            _require_decoded(ok, "linear probe", s)
            x[name], y[name], skips[name] = feats[ok].numpy(), np.asarray(s.label_names())[ok.numpy()], _skips(s, ok)
        try:
            lp = linear_probe(x["train"], y["train"], x["test"], y["test"], Cs=args.lp_cs, max_iter=args.lp_max_iter)
        except ValueError as e:
            raise EvalDataError(str(e)) from e
        for key in ("skipped", "skipped_reasons"):
            lp[key] = {name: skips[name][key] for name in ("train", "test")}
        result["linear_probe"] = lp
    result["skipped"] = sum(
        v["skipped"] if isinstance(v["skipped"], int) else sum(v["skipped"].values())
        for v in result.values() if isinstance(v, dict) and "skipped" in v)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def _run_and_print(cfg: EvalRunConfig) -> int:
    result = run(cfg)
    if cfg.out:
        atomic_write_json(cfg.out, result)
    print(json.dumps(result), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from trainer.clip.checkpoint import CheckpointError

    cli = CLI(EvalRunConfig, prog="clipforge eval", description=__doc__.split("\n\n")[0])
    # OSError: e.g. --out not writable
    return run_main(cli, argv, _run_and_print, (DataError, CheckpointError, OSError), prefix="clipforge eval")


if __name__ == "__main__":
    raise SystemExit(main())
