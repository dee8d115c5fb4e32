"""Token-id parity: clipforge's fast tokenizer == open_clip's tokenizer == clipforge's pure-Python reference, on a
deterministic corpus of >= 10,000 varied captions generated here (no downloads)."""
from __future__ import annotations

import html
import importlib.util
import random
import time
import unicodedata
from pathlib import Path

import pytest
import torch

from trainer.clip.tokenizer import (
    FastTokenizer,
    clean_chunks,
    clean_text,
    get_reference_tokenizer,
    get_tokenizer,
    hf_tokenizer,
    skips_ftfy,
    tokenize,
)

ROOT = Path(__file__).resolve().parents[1]
CTX = 77

WORDS = (
    "a an the photo picture image close-up of on in with and at by near under over two three several small large "
    "red blue green yellow black white old young happy dog dogs cat cats bird man woman child children people car "
    "bus train bicycle street road beach mountain river lake tree trees flower flowers house building city sky "
    "sunset night snow rain table plate food pizza sandwich coffee cup laptop phone book sitting standing running "
    "playing holding eating looking wearing shirt hat glasses dress vintage illustration vector icon logo stock "
    "background texture pattern watercolor painting 3d render hd 4k wallpaper design modern minimalist"
).split()
TEMPLATES = [
    "{a} {b} {c}", "A {a} of a {b} {c}.", "{A} {b}'s {c} and {d}", "it's a {a} {b}!", "They're {a}-ing the {b}",
    "{a} {b}, {c}; {d}: {e}?", "\"{a}\" {b} ({c})", "{a} {b} #{c} @{d}", "{a} {b} {c} {d} {e} {f} {g} {h}",
    "WE'LL {A} THE {B}", "you've {a}'d {b}'m {c}'ll", "{a} http://example.com/{b}/{c}?id={n}&x=1",
]
SCRIPTS = {
    "cjk": "日本語のテキスト写真猫犬東京大阪中文图片可爱的小狗和猫咪在草地上玩耍한국어사진고양이강아지",
    "arabic": "صورة قطة كلب جميلة في الحديقة مع الأطفال العربية",
    "hebrew": "תמונה של חתול וכלב בגן",
    "cyrillic": "Фотография кошки и собаки на траве Привет МИР ёжик",
    "greek": "ΟΔΟΣ ΣΟΦΟΣ φωτογραφία γάτας ΚΑΙ ΣΚΎΛΟΥ ᾳ ᾼ",
    "devanagari": "बिल्ली और कुत्ते की तस्वीर हिन्दी",
    "thai": "ภาพแมวและสุนัขในสวน",
    "latin": "café naïve résumé façade Ærø Øresund Straße ĳssel Łódź İstanbul ŉ ǅ ﬁne ﬂower Ǆ ẞ São Paulo",
    "nfd": unicodedata.normalize("NFD", "café naïve résumé Ærø São Tomé"),
}
EMOJI = [
    "😀", "🐶", "🐱", "☕", "❤️", "👍🏽", "👍🏿", "👨‍👩‍👧‍👦", "👩🏽‍💻", "🏳️‍🌈", "🇺🇸", "🇯🇵", "1️⃣", "#️⃣", "🧑‍🤝‍🧑",
    "✨", "🔥", "🎉", "🙈", "🤷‍♀️", "👁‍🗨", "🐈‍⬛", "😶‍🌫️", "⛹🏻‍♂️", "🫠", "🪿", "©", "®", "™", "☺",
]
ENTITIES = ["&amp;", "&quot;", "&#39;", "&lt;", "&gt;", "&nbsp;", "&#x27;", "&amp;amp;", "&eacute;", "&#8217;", "&hellip;",
            "&copy;", "&#128512;", "&ampx", "& ", "&;", "&#0;", "&lt;b&gt;bold&lt;/b&gt;"]
QUOTES = ["“", "”", "‘", "’", "«", "»", "„", "‹", "›", "—", "–", "…", "′", "″", "´", "`", "ʼ", "＂", "Ｆｕｌｌｗｉｄｔｈ", "①②"]
SPACES = ["\t", "\n", "\r\n", "  ", "   \t ", "\u00a0", "\u3000", "\u2028", "\u200b", "\u2009", "\x0c", "\x0b", "\x85",
          "\u1680", "\x1c", "\ufeff", "\u00ad"]
CONTROL = ["\x00", "\x07", "\x1b[31m", "\x1b[0m", "\x7f", "\x9d", "\x81", "\ud800".encode("utf-8", "surrogatepass")
           .decode("utf-8", "replace"), "\ufffd", "\u202e", "\u0345", "ſ", "'ſ", "K", "'S", "'ſt"]
PUNCT = ["!!!", "...", "?!", "--", "((", "))", "$5.99", "100%", "3.14159", "1,000,000", "2019-05-12", "12:30pm",
         "#tag", "@user", "<3", ":-)", "^_^", "¯\\_(ツ)_/¯", "***", "~~~", "||", "<>", "{}", "[x]", "a/b\\c", "e=mc²",
         "½", "٣٤٥", "१२३", "Ⅻ", "⁴²", "0x1F", "v1.2.3", "C++", "C#", "don't", "can't", "won't", "I'd", "O'Neil"]
SPECIAL = ["<start_of_text>", "<end_of_text>", "<|startoftext|>", "<|endoftext|>", "x<start_of_text>y",
           "!<end_of_text>", "<START_OF_TEXT>", "<start_of_text><end_of_text>"]


def _mojibake(rng: random.Random, text: str) -> str:
    """UTF-8 text mis-decoded as cp1252 / latin-1 (what ftfy repairs), sometimes only partly."""
    enc = rng.choice(["cp1252", "latin-1"])
    bad = text.encode("utf-8").decode(enc, errors="replace" if enc == "cp1252" else "strict")
    return bad if rng.random() < 0.8 else text + " " + bad


def _random_codepoints(rng: random.Random, n: int) -> str:
    out = []
    while len(out) < n:
        cp = rng.choice([rng.randrange(0x80, 0x3000), rng.randrange(0x3000, 0x10000), rng.randrange(0x10000, 0x30000)])
        if not 0xD800 <= cp < 0xE000:
            out.append(chr(cp))
    return "".join(out)


def make_corpus(seed: int = 0) -> list[str]:
    """>= 10,000 deterministic varied captions: every category the tokenizer must get right."""
    rng = random.Random(seed)
    w = lambda: rng.choice(WORDS)  # noqa: E731

    def english() -> str:
        t = rng.choice(TEMPLATES)
        fill = {k: w() for k in "abcdefgh"}
        fill.update({k.upper(): w().capitalize() for k in "ab"}, n=rng.randrange(10**6))
        return t.format(**fill)

    def mix(parts, k) -> str:
        return " ".join(rng.choice(parts) for _ in range(k))

    corpus: list[str] = []
    corpus += [english() for _ in range(3000)]
    # unicodedata names: the name as words, the character itself, or both
    for _ in range(1000):
        chars = _random_codepoints(rng, rng.randint(1, 4))
        names = [unicodedata.name(c, "UNNAMED").title() for c in chars]
        style = rng.randrange(3)
        corpus.append(" ".join(names) if style == 0 else chars if style == 1 else f"{chars} ({', '.join(names)})")
    for _ in range(1000):  # emoji: ZWJ sequences, skin tones, flags, keycaps; glued to words or spaced
        sep = rng.choice(["", " ", ""])
        corpus.append(sep.join(rng.choice(EMOJI + WORDS[:40]) for _ in range(rng.randint(1, 10))))
    for _ in range(1500):  # scripts, mixed with each other and with English
        s = rng.choice(list(SCRIPTS.values()))
        i = rng.randrange(len(s))
        corpus.append(f"{english()} {s[i:i + rng.randint(1, 30)]}" if rng.random() < 0.4 else s[i : i + rng.randint(1, 40)])
    for _ in range(800):  # HTML entities, single and double escaped, with and without '<'
        t = english().split()
        for _ in range(rng.randint(1, 3)):
            t.insert(rng.randrange(len(t) + 1), rng.choice(ENTITIES))
        s = rng.choice(["", " "]).join(t)
        corpus.append(s if rng.random() < 0.7 else f"<p>{s}</p>")
    for _ in range(800):  # mojibake of non-ASCII text (ftfy fixes most of it)
        corpus.append(_mojibake(rng, rng.choice([english() + " " + rng.choice(QUOTES) + w() + rng.choice(QUOTES),
                                                 rng.choice(list(SCRIPTS.values()))[:20], mix(EMOJI, 3),
                                                 SCRIPTS["latin"][: rng.randint(5, 60)]])))
    for _ in range(600):  # curly quotes, dashes, ellipses, fullwidth, ligatures
        corpus.append("".join(rng.choice([w(), " ", " ", *QUOTES]) for _ in range(rng.randint(3, 15))))
    for _ in range(600):  # whitespace of every kind, leading/trailing/repeated
        corpus.append("".join(rng.choice([w(), w().upper(), *SPACES]) for _ in range(rng.randint(1, 12))))
    for _ in range(800):  # numbers, punctuation runs, contractions, URLs
        corpus.append(rng.choice([" ", ""]).join(rng.choice(PUNCT + WORDS[:20]) for _ in range(rng.randint(1, 10))))
    for _ in range(400):  # control characters, terminal escapes, odd code points, random unicode
        corpus.append("".join(rng.choice([w(), " ", *CONTROL, _random_codepoints(rng, 2)]) for _ in range(rng.randint(1, 8))))
    for _ in range(300):  # very long captions (> 77 tokens): truncation
        corpus.append(" ".join(english() for _ in range(rng.randint(8, 30))) + rng.choice(["", " " + mix(EMOJI, 20)]))
    corpus += ["", " ", "\n", "\t \r\n", "\u00a0", "&nbsp;", "\x00", "😀", "a", "A", ".", "'s", "1"]
    corpus += [rng.choice(SPECIAL) + " " + english() for _ in range(30)] + SPECIAL
    corpus += [html.escape(english()) for _ in range(100)]
    return corpus


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    c = make_corpus()
    assert len(c) >= 10_000
    return c


@pytest.fixture(scope="module")
def open_clip_ids(corpus) -> torch.Tensor:
    open_clip = pytest.importorskip("open_clip")
    tok = open_clip.get_tokenizer("ViT-B-32")
    assert type(tok).__name__ == "SimpleTokenizer"  # the pure-Python CLIP tokenizer, offline
    t0 = time.perf_counter()
    ids = tok(corpus, context_length=CTX)
    print(f"open_clip: {len(corpus)} captions in {time.perf_counter() - t0:.1f}s")
    return ids


def _first_mismatches(corpus, got, want, k=5):
    bad = (got != want).any(dim=1).nonzero().flatten().tolist()
    return len(bad), [(corpus[i], got[i][got[i] > 0].tolist(), want[i][want[i] > 0].tolist()) for i in bad[:k]]


def test_corpus_covers_the_hard_cases(corpus, open_clip_ids):
    assert sum(not t.isascii() for t in corpus) > 4000
    assert sum("&" in t for t in corpus) > 500
    assert sum("\u200d" in t for t in corpus) > 100  # ZWJ emoji sequences
    assert sum(clean_text(t) != " ".join(t.split()).lower() for t in corpus) > 1000  # ftfy/unescape matter
    assert int((open_clip_ids[:, -1] == 49407).sum()) > 250  # truncated captions
    assert int((open_clip_ids[:, 1] == 49407).sum()) >= 5  # empty after cleaning


def test_fast_tokenizer_matches_open_clip(corpus, open_clip_ids):
    t0 = time.perf_counter()
    got = tokenize(corpus, CTX, tokenizer=FastTokenizer())  # a fresh one: cold memo
    print(f"clipforge fast: {len(corpus)} captions in {time.perf_counter() - t0:.2f}s")
    n, examples = _first_mismatches(corpus, got, open_clip_ids)
    assert n == 0, f"{n} captions differ from open_clip, e.g. {examples}"
    assert torch.equal(tokenize(corpus, CTX), got)  # the default (shared, possibly warm) tokenizer


def test_reference_tokenizer_matches_open_clip(corpus, open_clip_ids):
    got = tokenize(corpus, CTX, tokenizer=get_reference_tokenizer())
    n, examples = _first_mismatches(corpus, got, open_clip_ids)
    assert n == 0, f"{n} captions differ from open_clip, e.g. {examples}"


@pytest.mark.parametrize("memo_size,parallel", [(0, False), (64, False), (0, True)])
def test_memo_is_only_a_cache(corpus, open_clip_ids, memo_size, parallel):
    """No memo / a tiny memo that is cleared constantly / misses via parallel encode_batch_fast: same ids;
    batch == one caption at a time."""
    sub = corpus[::2] if parallel else corpus[::10]  # parallel misses need >= 4096 distinct chunks per batch
    tok = FastTokenizer(memo_size=memo_size, parallel_misses=parallel)
    batched = tok.encode_batch(sub)
    assert batched == [tok.encode(t) for t in sub]
    assert torch.equal(tokenize(sub, CTX, tokenizer=tok), open_clip_ids[:: 2 if parallel else 10])


def test_ftfy_skip_is_exact(corpus):
    """Where clean_chunks skips ftfy, ftfy + html.unescape would not have changed anything."""
    ascii_chars = [chr(i) for i in range(128)]
    probes = ascii_chars + [a + b for a in ascii_chars for b in ascii_chars] + [f"x{c}y z" for c in ascii_chars]
    probes += [f"{a}&{b}" for a in ascii_chars for b in ascii_chars] + [f"fish & chips &{c}" for c in ascii_chars]
    probes += [f"&{e}" for e in ("amp;", "amp", "#39;", "#x27", "lt;", "nbsp", "AMP;", "eacute;", "#0;", "\n\n")]
    for texts, min_skipped in ((probes, 9_700), (corpus, 3_000)):
        skipped = 0
        for t in texts:
            if skips_ftfy(t):
                skipped += 1
                assert " ".join(t.split()).lower() == clean_text(t), repr(t)
            assert clean_chunks(t) == clean_text(t).split(), repr(t)
        assert skipped > min_skipped


def test_rust_split_variant_matches_on_ascii(corpus):
    """hf_tokenizer(with_split=True) (regex split in Rust) agrees on cleaned ASCII text."""
    hf, ref = hf_tokenizer(with_split=True), get_tokenizer()
    texts = [c for c in (" ".join(clean_chunks(t)) for t in corpus) if c.isascii() and "_of_text>" not in c]
    assert len(texts) > 4000
    got = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    assert got == ref.encode_batch(texts)


def test_tokenize_edge_cases():
    tok = get_tokenizer()
    assert tokenize([], 77).shape == (0, 77)
    assert tokenize("a dog", 1).tolist() == [[49407]]
    assert tokenize("a dog", 2).tolist() == [[49406, 49407]]
    assert tokenize("a dog", 3).tolist() == [[49406, 320, 49407]]
    with pytest.raises(ValueError):
        tokenize("a dog", 0)
    assert tok.decode(tokenize("Ein Hund 🐶 läuft")[0]) == "ein hund 🐶 läuft"
    assert get_tokenizer() is tok and tok.hf is tok.hf  # built once


def test_bench_tokenizer_tiny():
    spec = importlib.util.spec_from_file_location("bench_tokenizer", ROOT / "bench" / "bench_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.run(2000, open_clip_n=300, subprocess_threads=False)
    assert r["n"] == 2000 and r["parity_ok"]
    assert r["fast_1thread"]["captions_per_s"] > 0 and r["open_clip"]["captions_per_s"] > 0
