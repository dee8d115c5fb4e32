"""Which emoji are pictures, what they are called and which Unicode group they belong to: the one rule the sample
web (OpenMoji, the training side) and the held-out set (Noto Color Emoji, the evaluation side) share.

Reads (never writes) Unicode's emoji-test.txt, as Debian's `unicode-data` package installs it
(/usr/share/unicode/emoji/emoji-test.txt; `make test` / `make demo` install the package when it is missing), or a
copy named by $CLIPFORGE_EMOJI_TEST. Names are Python's `unicodedata` names, lower-cased ("RED APPLE" ->
"red apple"): the captions both sides use.
"""
from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

EMOJI_TEST_PATHS = (Path("/usr/share/unicode/emoji/emoji-test.txt"),)
# Unicode's emoji groups, in emoji-test.txt order ("Component" -- skin tones, hair -- is not a picture).
GROUPS = ("Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places",
          "Activities", "Objects", "Symbols", "Flags")


class EmojiDataError(RuntimeError):
    """emoji-test.txt is not installed or cannot be read."""


def picture_name(char: str) -> str | None:
    """The caption name of a single-codepoint picture emoji, or None for what is not a picture (digits, '#',
    regional indicators, skin-tone swatches and hair components, unnamed code points)."""
    if len(char) != 1 or ord(char) < 0x2000:
        return None
    name = unicodedata.name(char, "")
    if not name or "REGIONAL INDICATOR" in name or name.startswith(("EMOJI MODIFIER", "EMOJI COMPONENT")):
        return None
    return name.lower()


@dataclass(frozen=True)
class Emoji:
    char: str
    name: str       # picture_name(char)
    group: str      # one of GROUPS
    subgroup: str   # Unicode's subgroup, e.g. "food-fruit"


def emoji_test_path() -> Path:
    env = os.environ.get("CLIPFORGE_EMOJI_TEST")
    for p in ([Path(env)] if env else []) + list(EMOJI_TEST_PATHS):
        if p.is_file():
            return p
    raise EmojiDataError("Unicode's emoji-test.txt is not installed: `apt-get install unicode-data` (or set "
                         "CLIPFORGE_EMOJI_TEST to a copy of https://unicode.org/Public/emoji/latest/emoji-test.txt)")


def _parse(text: str) -> dict[str, Emoji]:
    out: dict[str, Emoji] = {}
    group = subgroup = ""
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#") and ";" in line and group in GROUPS:
            codes = [c for c in line.split(";", 1)[0].split() if c != "FE0F"]
            if len(codes) != 1:
                continue
            char = chr(int(codes[0], 16))
            name = picture_name(char)
            if name and char not in out:
                out[char] = Emoji(char, name, group, subgroup)
    return out


@lru_cache(maxsize=4)
def _table(path: str) -> dict[str, Emoji]:
    try:
        return _parse(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise EmojiDataError(f"cannot read {path}: {e}") from e


def emoji_table() -> dict[str, Emoji]:
    """Every single-codepoint picture emoji of emoji-test.txt -> its Emoji, in file (group) order."""
    return _table(str(emoji_test_path()))


def group_classname(group: str) -> str:
    """'Food & Drink' -> 'food and drink': the zero-shot class name of a Unicode group."""
    return group.lower().replace("&", "and")
