"""Eval data for trainer.evaluate: the data contract, scanning the eval sets once, and reading their images.

Eval data contract
  Retrieval: any clipforge shard dir (manifest.json + *.tar, or a dir of plain *.tar): every sample with an image
    member (jpg/jpeg/png/webp) and a non-empty `.txt` caption is one (image, caption) pair. Samples without an
    image or a caption are skipped and counted.
  Labelled data (zero-shot, linear probe), either
    * a shard dir whose samples carry a class label: the `.cls` member (an integer class index, as text) or a
      `"label"` key in the `.json` member (a class name, or an integer index), plus a classes file
      `{"classnames": [...], "templates": ["a photo of a {}.", ...], "synonyms": {"classname": ["another name"]}}`
      (templates and synonyms optional; a bare JSON list is taken as the classnames). A class's zero-shot
      embedding is the mean over its names (the classname, then its synonyms) x the templates. Without a
      classes file, name labels define the classes (sorted); integer labels then have no names (fine for the linear probe, an error for zero-shot). A sample without a label is
      skipped and counted; a name not in the classnames, or an index out of range, is an error.
    * an ImageFolder-style dir: one sub-directory per class holding its images (searched recursively); the class
      name is the folder name with '_' -> ' '. With a classes file, every folder must name one of its classnames
      (the zero-shot classifier then covers all of them); without one, the folders are the classes.
  Images that cannot be decoded are skipped and counted at evaluation time ("corrupt_image"), never a crash.
  Eval sets are scanned once (`build_eval_data` / `load_*_set`: tar headers and the small members only) and hold
  byte offsets into the tars, so each evaluation reads exactly the images it needs.

Pure torch + PIL + numpy; no DeepSpeed, no Ray.
"""
from __future__ import annotations

import io
import json
import logging
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.clip.formats.shards import IMAGE_EXTS, image_ext, is_shard_dir, iter_tar_samples
from trainer.data import DataError, read_shards
from trainer.clip.tokenizer import tokenize
from trainer.clip.transform import image_transform

log = logging.getLogger("clipforge.trainer.evaldata")

# A small prompt ensemble in the spirit of the CLIP paper's ImageNet prompts (written for clipforge).
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of the big {}.",
    "a photo of the small {}.",
    "a drawing of a {}.",
    "a cropped photo of a {}.",
)
FOLDER_IMAGE_EXTS = tuple(IMAGE_EXTS) + ("bmp", "gif", "tif", "tiff")


class EvalDataError(DataError):
    """Eval data is missing, unreadable, unlabelled or inconsistent with its classes file."""


# ----------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class EvalSample:
    path: str  # a tar, or an image file (ImageFolder)
    offset: int  # byte offset of the image data in `path` (0 for a plain file)
    size: int  # image bytes (-1: the whole file)
    key: str
    caption: str | None = None


@dataclass
class EvalSet:
    root: str
    kind: str  # "shards" | "imagefolder"
    samples: list[EvalSample]
    labels: np.ndarray | None = None  # int64 [n]: class index of each sample (labelled sets only)
    classnames: list[str] | None = None  # None: integer labels without names
    templates: list[str] | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # found while scanning, by reason
    synonyms: dict[str, list[str]] | None = None  # class name -> more names for it (zero-shot prompts)

    def __len__(self) -> int:
        return len(self.samples)

    def label_names(self) -> list[str]:
        """Each sample's class as a string (its name, or its index when the classes have no names)."""
        assert self.labels is not None
        if self.classnames is None:
            return [str(int(i)) for i in self.labels]
        return [self.classnames[int(i)] for i in self.labels]


@dataclass
class EvalData:
    """What `evaluate` runs on; build it once at start-up with `build_eval_data`."""
    retrieval: EvalSet | None = None
    zeroshot: EvalSet | None = None


SMALL_MEMBERS = ("txt", "cls", "json")  # read while scanning; images are read at evaluation time, by offset


def _scan_tar(path: str, skipped: Counter) -> list[tuple[str, dict]]:
    """[(key, {"image": (offset, size), "txt"/"cls"/"json": bytes})] in tar order; broken tars are counted."""
    groups = []
    try:
        for sample in iter_tar_samples(path, read=lambda ext: ext in SMALL_MEMBERS):
            group = {ext: m.data for ext, m in sample.members.items() if ext in SMALL_MEMBERS}
            ext = image_ext(sample.members)
            if ext is not None:
                group["image"] = (sample.members[ext].offset, sample.members[ext].size)
            groups.append((sample.key, group))
    except (tarfile.TarError, OSError, EOFError) as e:
        skipped["unreadable_tar"] += 1
        log.warning("eval data: cannot read (the rest of) %s: %r", path, e)
    return groups


def _shard_samples(root: Path, skipped: Counter) -> list[tuple[EvalSample, dict]]:
    """[(sample, its small members)] of every sample with an image (caption: the stripped `.txt`, None when
    empty or absent); samples without an image are counted."""
    try:
        shards = read_shards(root)
    except DataError as e:
        raise EvalDataError(str(e)) from e
    out = []
    for tar in shards.tars:
        for key, group in _scan_tar(tar, skipped):
            if "image" not in group:
                skipped["no_image"] += 1
                continue
            caption = group.get("txt", b"").decode("utf-8", errors="replace").strip() or None
            out.append((EvalSample(tar, *group["image"], key, caption), group))
    return out


def _check_dir(path: str | Path, what: str) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise EvalDataError(f"{what} dir not found: {root}")
    return root


def load_retrieval_set(path: str | Path) -> EvalSet:
    """(image, caption) pairs of a shard dir. Raises EvalDataError when there is none."""
    root = _check_dir(path, "retrieval")
    if not is_shard_dir(root):
        raise EvalDataError(f"retrieval data {root} has neither manifest.json nor *.tar shards")
    skipped: Counter = Counter()
    samples = []
    for sample, _ in _shard_samples(root, skipped):
        if sample.caption is None:
            skipped["no_caption"] += 1
            continue
        samples.append(sample)
    if not samples:
        raise EvalDataError(f"no (image, caption) sample in {root} (skipped: {dict(skipped)})")
    return EvalSet(str(root), "shards", samples, skipped=dict(skipped))


def _check_synonyms(synonyms, classnames: list[str] | None, p: Path) -> dict[str, list[str]] | None:
    if synonyms is None:
        return None
    if not isinstance(synonyms, dict) or not all(
            isinstance(v, list) and v and all(isinstance(x, str) and x.strip() for x in v) for v in synonyms.values()):
        raise EvalDataError(f"classes file {p}: \"synonyms\" must map class names to non-empty lists of names")
    unknown = [c for c in synonyms if classnames is None or c not in classnames]
    if unknown:
        raise EvalDataError(f"classes file {p}: synonyms for names that are not classnames: {unknown[:5]}")
    return {c: list(v) for c, v in synonyms.items()}


def load_classes(path: str | Path) -> tuple[list[str] | None, list[str] | None, dict[str, list[str]] | None]:
    """A classes file -> (classnames or None, templates or None, synonyms or None). Raises EvalDataError."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise EvalDataError(f"classes file not found: {p}") from e
    except (OSError, ValueError) as e:
        raise EvalDataError(f"cannot read classes file {p}: {e}") from e
    if isinstance(d, list):
        d = {"classnames": d}
    if not isinstance(d, dict):
        raise EvalDataError(f"classes file {p}: expected {{\"classnames\": [...], \"templates\": [...]}}")
    classnames, templates = d.get("classnames"), d.get("templates")
    if classnames is not None:
        if not isinstance(classnames, list) or not classnames or not all(isinstance(c, str) and c.strip() for c in classnames):
            raise EvalDataError(f"classes file {p}: \"classnames\" must be a non-empty list of non-empty strings")
        dup = [c for c, n in Counter(classnames).items() if n > 1]
        if dup:
            raise EvalDataError(f"classes file {p}: duplicate class names {dup[:5]}")
    if templates is not None:
        if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
            raise EvalDataError(f"classes file {p}: \"templates\" must be a non-empty list of strings")
        bad = [t for t in templates if "{}" not in t]
        if bad:
            raise EvalDataError(f"classes file {p}: templates without a {{}} placeholder: {bad[:3]}")
    return classnames, templates, _check_synonyms(d.get("synonyms"), classnames, p)


def _parse_label(key: str, group: dict, tar: str) -> int | str | None:
    if "cls" in group:
        text = group["cls"].decode("utf-8", errors="replace").strip()
        try:
            return int(text)
        except ValueError:
            raise EvalDataError(f"sample {key} in {tar}: .cls must be an integer class index, got {text[:40]!r}") from None
    if "json" in group:
        try:
            meta = json.loads(group["json"])
        except ValueError:
            return None
        label = meta.get("label") if isinstance(meta, dict) else None
        if isinstance(label, bool):
            label = None
        if isinstance(label, str):
            return label.strip() or None
        if isinstance(label, int):
            return label
    return None


def _index_labels(raw: list[int | str], classnames: list[str] | None, where: str) -> tuple[np.ndarray, list[str] | None]:
    """Raw labels (names or indices) -> (int64 indices, classnames). Raises EvalDataError on unknown labels."""
    names = [r for r in raw if isinstance(r, str)]
    if classnames is None:
        if names and len(names) != len(raw):
            raise EvalDataError(f"{where}: labels mix class names and integer indices; give a classes file")
        if names:
            classnames = sorted(set(names))
    lookup = {c: i for i, c in enumerate(classnames or [])}
    out = np.empty(len(raw), dtype=np.int64)
    for j, r in enumerate(raw):
        if isinstance(r, str):
            if r not in lookup:
                raise EvalDataError(f"{where}: label {r!r} is not one of the {len(lookup)} classnames "
                                    f"(e.g. {list(lookup)[:5]})")
            out[j] = lookup[r]
        else:
            if r < 0 or (classnames is not None and r >= len(classnames)):
                n = len(classnames) if classnames is not None else "?"
                raise EvalDataError(f"{where}: class index {r} out of range (number of classes: {n})")
            out[j] = r
    return out, classnames


def _folder_samples(root: Path) -> tuple[list[EvalSample], list[str]]:
    """ImageFolder: (samples, folder name per sample) over the class sub-directories, sorted."""
    samples, folders = [], []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(d.rglob("*")):
            if f.is_file() and f.suffix.lower().lstrip(".") in FOLDER_IMAGE_EXTS:
                samples.append(EvalSample(str(f.resolve()), 0, -1, str(f.relative_to(root))))
                folders.append(d.name)
    return samples, folders


def load_labelled_set(path: str | Path, classes: str | Path | None = None) -> EvalSet:
    """A labelled shard dir or an ImageFolder dir (see the module docstring). Raises EvalDataError."""
    root = _check_dir(path, "labelled eval data")
    classnames, templates, synonyms = load_classes(classes) if classes is not None else (None, None, None)
    skipped: Counter = Counter()
    if is_shard_dir(root):
        kind, samples, raw = "shards", [], []
        for sample, group in _shard_samples(root, skipped):
            label = _parse_label(sample.key, group, sample.path)
            if label is None:
                skipped["no_label"] += 1
                continue
            samples.append(sample)
            raw.append(label)
        if not samples:
            raise EvalDataError(f"no labelled sample in {root}: each needs a .cls member (class index) or a "
                                f"\"label\" in its .json (skipped: {dict(skipped)})")
    else:
        kind = "imagefolder"
        samples, folders = _folder_samples(root)
        if not samples:
            raise EvalDataError(f"{root} is neither a shard dir (manifest.json / *.tar) nor an ImageFolder dir "
                                f"(one sub-directory of images per class)")
        display = [f.replace("_", " ") for f in folders]
        if classnames is None:
            classnames = sorted(set(display), key=display.index)  # folder order (sorted)
            raw = display
        else:
            known = set(classnames)
            raw = [d if d in known or f not in known else f for d, f in zip(display, folders)]
    labels, classnames = _index_labels(raw, classnames, str(root))
    return EvalSet(str(root), kind, samples, labels, classnames, templates, dict(skipped), synonyms)


def load_zeroshot_set(path: str | Path, classes: str | Path | None = None) -> EvalSet:
    """A labelled set with class names and prompt templates (the defaults when the classes file has none)."""
    s = load_labelled_set(path, classes)
    if s.classnames is None:
        raise EvalDataError(f"{path}: labels are class indices without names; zero-shot needs a classes file "
                            f"with \"classnames\" (--classes FILE)")
    s.templates = list(s.templates or DEFAULT_TEMPLATES)
    return s


def build_eval_data(retrieval: str | Path | None = None, zeroshot: str | Path | None = None,
                    classes: str | Path | None = None) -> EvalData:
    """Scan the eval sets once (every rank may call it; the result is deterministic). Raises EvalDataError."""
    if classes is not None and zeroshot is None:
        raise EvalDataError("a classes file was given without zero-shot data")
    return EvalData(
        retrieval=load_retrieval_set(retrieval) if retrieval is not None else None,
        zeroshot=load_zeroshot_set(zeroshot, classes) if zeroshot is not None else None,
    )


# ----------------------------------------------------------------------------------------------- loading
def read_image(sample: EvalSample) -> Image.Image:
    with open(sample.path, "rb") as f:
        f.seek(sample.offset)
        data = f.read() if sample.size < 0 else f.read(sample.size)
    if sample.size >= 0 and len(data) != sample.size:
        raise OSError(f"short read: {len(data)} of {sample.size} bytes")
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


class EvalItems(torch.utils.data.Dataset):
    """What `evaluate` loads (also in DataLoader workers): item j = (image [3,S,S] or None, decoded ok, text or
    None) for global index indices[j]; an undecodable image gives a zero image and ok=False."""

    def __init__(self, indices, samples, texts, image_size: int):
        self.indices, self.samples, self.texts = list(indices), samples, texts
        self.image_size = image_size
        self.preprocess = image_transform(image_size, train=False) if samples is not None else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j):
        i = self.indices[j]
        image, ok = None, True
        if self.samples is not None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    image = self.preprocess(read_image(self.samples[i]))
            except Exception as e:  # noqa: BLE001 - any undecodable image is skipped and counted
                log.debug("eval: cannot decode %s#%s: %r", self.samples[i].path, self.samples[i].key, e)
                image, ok = torch.zeros(3, self.image_size, self.image_size), False
        return image, ok, (self.texts[i] if self.texts is not None else None)


class EvalCollate:
    """EvalItems -> (images [B,3,S,S] | None, tokens [B,L] | None, decoded ok [B] bool)."""

    def __init__(self, context_length: int):
        self.context_length = context_length

    def __call__(self, items):
        images = torch.stack([it[0] for it in items]) if items[0][0] is not None else None
        ok = torch.tensor([it[1] for it in items], dtype=torch.bool)
        tokens = tokenize([it[2] for it in items], self.context_length) if items[0][2] is not None else None
        return images, tokens, ok
