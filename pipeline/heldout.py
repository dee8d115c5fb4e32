"""The held-out style: every picture emoji drawn by another design team (Google's Noto Color Emoji, Debian's
`fonts-noto-color-emoji`), as an eval set for retrieval and zero-shot classification.

`clipforge heldout OUT [--image-size 64]` writes
    OUT/manifest.json, OUT/shard-00000.tar ...   a clipforge shard dir (trainer.clip.formats.shards): per emoji
        KEY.png   the glyph rendered by Pillow (embedded colour) centred on white, resized to --image-size
        KEY.txt   its name, the same naming the sample web's captions use ("red apple": pipeline.emojidata)
        KEY.json  {"label": its Unicode group as a class name, "group", "subgroup", "codepoint", "name", "style"}
    OUT/classes.json   {"classnames": the 9 Unicode groups ("food and drink", ...), "templates": [...],
                        "synonyms": {group: its Unicode subgroup names ("food fruit", "drink", ...)}}
    OUT/heldout.json   what was built (config, counts per group, font) -- written last

It is the eval contract of trainer.evaldata as it stands: `--eval-retrieval OUT --eval-zeroshot OUT
--eval-classes OUT/classes.json` (or `clipforge eval --retrieval OUT --zeroshot OUT --classes ...`). Nothing here
is ever training data: the sample web renders OpenMoji, this renders Noto. A rerun with the same config writes the
same bytes (tars have mtime 0; PNG encoding is deterministic); every file is written atomically.
"""
from __future__ import annotations

import io
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pipeline.emojidata import GROUPS, EmojiDataError, emoji_table, group_classname
from trainer.clip.flags import CLI, opt, run_main
from trainer.clip.formats.atomic import atomic_write_json
from trainer.clip.formats.shards import write_shard_dir

NOTO_PATHS = (Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"),)
NOTO_SIZE = 109  # the one size of Noto's CBDT bitmap strikes
STYLE = "noto-color-emoji"
# Zero-shot prompts for a group name, in the phrasing of the sample web's captions (not tuned on this set).
TEMPLATES = ("an emoji of {}.", "a {} emoji.", "an icon of {}.", "a picture of {}.", "{}, flat illustration.",
             "a {} icon.")


class HeldoutError(RuntimeError):
    """The Noto font or Unicode's emoji data is not installed."""


@dataclass
class HeldoutConfig:
    """The held-out set."""
    out: str = opt("", positional=True, help="where to write the shard dir, classes.json and heldout.json")
    image_size: int = opt(64, help="square image side, the training resolution (tiny: 64)")
    max_emoji: int = opt(0, help="at most this many emoji, spread over the table (0: all)")
    samples_per_shard: int = opt(512, help="samples per tar")
    font: str = opt("", help="a colour emoji font (default: Debian's Noto Color Emoji, or $CLIPFORGE_NOTO_FONT)")

    def __post_init__(self):
        if self.image_size < 16:
            raise ValueError("--image-size must be >= 16")
        if self.max_emoji < 0 or self.samples_per_shard < 1:
            raise ValueError("--max-emoji must be >= 0 and --samples-per-shard >= 1")

    @classmethod
    def tiny(cls, out: str = "") -> "HeldoutConfig":
        return cls(out=out, image_size=64, max_emoji=90, samples_per_shard=32)


def noto_font_path(explicit: str = "") -> Path:
    env = explicit or os.environ.get("CLIPFORGE_NOTO_FONT", "")
    for p in ([Path(env)] if env else []) + list(NOTO_PATHS):
        if p.is_file():
            return p
    raise HeldoutError("Noto Color Emoji is not installed: `apt-get install fonts-noto-color-emoji` "
                       "(or --font / $CLIPFORGE_NOTO_FONT)")


def font_chars(path: Path) -> set[int]:
    """The code points the font has a glyph for."""
    from fontTools.ttLib import TTFont

    with TTFont(str(path), lazy=True) as f:
        return set(f["cmap"].getBestCmap())


def render(char: str, font: ImageFont.FreeTypeFont, side: int) -> Image.Image:
    """The glyph in colour, centred on a white square, resized (Lanczos) to side x side."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), char, font=font, embedded_color=True)
    w, h = right - left, bottom - top
    canvas = max(w, h) + 8
    img = Image.new("RGB", (canvas, canvas), (255, 255, 255))
    ImageDraw.Draw(img).text(((canvas - w) / 2 - left, (canvas - h) / 2 - top), char, font=font,
                             embedded_color=True)
    return img.resize((side, side), Image.Resampling.LANCZOS)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def select(cfg: HeldoutConfig, font_path: Path) -> list:
    """The emoji of the set: every picture emoji the font draws, in table order, spread when --max-emoji caps it."""
    drawn = font_chars(font_path)
    table = [e for e in emoji_table().values() if ord(e.char) in drawn]
    if cfg.max_emoji and len(table) > cfg.max_emoji:
        step = len(table) / cfg.max_emoji
        table = [table[int(i * step)] for i in range(cfg.max_emoji)]
    return table


def _sample(e, font, side: int) -> dict:
    key = f"{ord(e.char):06x}"
    label = group_classname(e.group)
    meta = {"key": key, "label": label, "group": e.group, "subgroup": e.subgroup, "codepoint": f"U+{ord(e.char):04X}",
            "name": e.name, "caption": e.name, "style": STYLE, "width": side, "height": side}
    return {"__key__": key, "png": _png(render(e.char, font, side)), "txt": e.name, "json": meta}


def group_synonyms(groups: list[str]) -> dict[str, list[str]]:
    """Each group's zero-shot names besides its own: Unicode's subgroup names ("food-fruit" -> "food fruit"), the
    taxonomy's words for what a group holds (from emoji-test.txt, not from any image)."""
    table = emoji_table().values()
    out = {}
    for g in groups:
        subs = dict.fromkeys(e.subgroup.replace("-", " ") for e in table if e.group == g)
        out[group_classname(g)] = [s for s in subs if s != group_classname(g)]
    return {k: v for k, v in out.items() if v}


def build(cfg: HeldoutConfig) -> dict:
    """Write the held-out set under cfg.out; returns the summary also written to OUT/heldout.json."""
    out = Path(cfg.out)
    font_path = noto_font_path(cfg.font)
    font = ImageFont.truetype(str(font_path), NOTO_SIZE)
    chosen = select(cfg, font_path)
    if not chosen:
        raise HeldoutError(f"{font_path} draws none of Unicode's picture emoji")
    n = cfg.samples_per_shard
    chunks = [chosen[i:i + n] for i in range(0, len(chosen), n)]
    write_shard_dir(out, ([_sample(e, font, cfg.image_size) for e in chunk] for chunk in chunks), heldout=STYLE)
    present = [g for g in GROUPS if any(e.group == g for e in chosen)]
    classes = {"classnames": [group_classname(g) for g in present], "templates": list(TEMPLATES),
               "synonyms": group_synonyms(present)}
    atomic_write_json(out / "classes.json", classes)
    summary = {"config": asdict(cfg), "font": str(font_path), "style": STYLE, "num_samples": len(chosen),
               "groups": dict(Counter(group_classname(e.group) for e in chosen)),
               "classes": str(out / "classes.json")}
    atomic_write_json(out / "heldout.json", summary)
    return summary


def _run(cfg: HeldoutConfig) -> int:
    s = build(cfg)
    print(f"held-out set: {s['num_samples']} Noto emoji in {len(s['groups'])} groups -> {cfg.out} "
          f"(eval with: --eval-retrieval {cfg.out} --eval-zeroshot {cfg.out} --eval-classes {s['classes']})")
    return 0


def main(argv=None) -> int:
    cli = CLI(HeldoutConfig, prog="clipforge heldout", description=__doc__.split("\n")[0],
              presets={"default": HeldoutConfig, "tiny": HeldoutConfig.tiny})
    return run_main(cli, argv, _run, (HeldoutError, EmojiDataError))


if __name__ == "__main__":
    raise SystemExit(main())
