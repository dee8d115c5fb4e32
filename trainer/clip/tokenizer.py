"""CLIP byte-level BPE tokenizer (lower-cased, 49,152 BPE tokens + start/end = 49,408 ids).

Text is cleaned (ftfy, HTML unescape, whitespace collapse, lower case), split by CLIP's pre-tokenizer regex,
each piece is mapped byte-wise to printable unicode characters and merged with the BPE merge table
(trainer/clip/assets/bpe_simple_vocab_16e6.txt.gz). ids match open_clip's tokenizer (and OpenAI's, which differs
only in how a caption that literally contains a special-token string is treated, see below):
<start_of_text> = 49406, <end_of_text> = 49407, 0 = padding.

Two implementations share the merges table:

* `SimpleTokenizer` - the pure-Python reference (the textbook algorithm, always runs ftfy; slow). Tests
  compare the fast path against it and against open_clip.
* `FastTokenizer` - what `get_tokenizer()` / `tokenize()` use. Same ids, several times faster
  (numbers in bench/bench_tokenizer.py):

  1. Cleaning. `ftfy.fix_text` costs ~30 us per caption, and for most captions it provably does nothing:
     on ASCII text ftfy can only change HTML entities (an '&' followed by something other than whitespace or
     the end), terminal escapes and control characters (\\x00-\\x08, \\x0b, \\x0e-\\x1f, \\x7f); NFC, quote
     uncurling, width/ligature fixes and mojibake repair need non-ASCII input, and \\t \\n \\r \\x0c are
     whitespace that the collapse step removes anyway (verified exhaustively for all 1- and 2-character ASCII
     strings and "a&b" triples, and on the parity corpus, in tests/test_tokenizer_parity.py). So such ASCII text
     skips ftfy and html.unescape (`skips_ftfy`); everything else takes the full ftfy path (~30-60 us).
  2. Chunk memo. CLIP's regex never matches across whitespace, so after cleaning, a caption's tokens are the
     concatenation of the tokens of its space-separated chunks ("dog.", "it's", "2019"). A bounded dict
     chunk -> ids answers most chunks of a caption stream with one lookup each.
  3. Misses. Unseen chunks are split with CLIP's regex (the same `regex` pattern/flags as open_clip, so the
     split is exact by construction) and the pieces are BPE-merged in Rust by a HF `tokenizers.Tokenizer`
     built in code from the shipped merges (BPE model with the 256 byte symbols, the same + "</w>", the
     joined merges and the two specials; end_of_word_suffix "</w>"; ByteLevel pre-tokenizer). By default each
     piece goes through the model's `tokenize` (Rust BPE + its cache, ~1 us/piece), which measured ~3x
     cheaper per chunk than `encode_batch_fast(..., is_pretokenized=True)` because the latter builds full
     Encodings; `FastTokenizer(parallel_misses=True)` uses encode_batch_fast for batches with >= 4096 misses
     (parallel over rayon threads; RAYON_NUM_THREADS=1 or TOKENIZERS_PARALLELISM=false pins it to one
     thread) - only worth it on many-core machines with cold memos.

  Why the CLIP regex split is not done by the Rust tokenizer's `Split` pre-tokenizer: its regex engine
  (Oniguruma) disagrees with the `regex` module (used by open_clip, IGNORECASE) on U+017F 'ſ' (`'ſ` matches
  `'s` case-insensitively), on U+0345 (case-folds to a letter) and on ~17k code points assigned after
  Oniguruma's Unicode tables. `hf_tokenizer(with_split=True)` still builds that standalone variant (exact
  for ASCII text) for tools that want a single tokenizers.Tokenizer, but ids here never depend on it.
  Likewise, lower-casing happens in Python: Rust's per-char lowercase lacks Python's final-sigma rule.

Special-token strings: as in open_clip, a caption containing the literal text "<start_of_text>" /
"<end_of_text>" at a regex-piece boundary gets the special id there (OpenAI's original used
"<|startoftext|>"/"<|endoftext|>" for the same thing; we follow open_clip, the reference our tests use).

Throughput (2-core dev box, bench/bench_tokenizer.py, 1M varied synthetic captions, ~13% non-ASCII): ~22 s of
CPU on one core (~27 s wall on a loaded box) vs ~76 s for open_clip; ftfy on the non-ASCII captions dominates.
"""
from __future__ import annotations

import functools
import gzip
import html
import itertools
import re
import threading
from pathlib import Path

import ftfy
import numpy as np
import regex
import torch

VOCAB_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # 48,894 merges after the header line
SOT, EOT = "<start_of_text>", "<end_of_text>"  # open_clip's names for ids 49406 / 49407
# special tokens, 's 't 're 've 'm 'll 'd, letter runs, single digits, runs of other non-space symbols
PATTERN = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# What ftfy.fix_text + html.unescape can act on in ASCII text: controls other than \t \n \x0c \r (ftfy removes
# them; \x1b also starts terminal escapes), DEL, and '&' that could start an entity (any '&' not followed by
# whitespace or the end). ASCII text without these is returned unchanged by both (see skips_ftfy).
_ASCII_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_ENTITY_START = re.compile(r"&(?![ \t\n\r\x0c]|\Z)")


@functools.lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Every byte 0..255 -> a printable unicode character (printable latin-1 bytes map to themselves).

    The dict's order (printable bytes first, then the remapped ones) is the order of the first 256 vocab ids."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)  # unprintable bytes -> code points past latin-1, in byte order
            extra += 1
    return mapping


@functools.lru_cache(maxsize=4)
def load_merges(vocab_path: str | Path = VOCAB_PATH) -> tuple[tuple[str, str], ...]:
    """The 48,894 BPE merges, lowest rank first (parsed once per path)."""
    with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : NUM_MERGES + 1]  # skip the "#version" header
    return tuple(tuple(line.split()) for line in lines)


@functools.lru_cache(maxsize=4)
def load_vocab(vocab_path: str | Path = VOCAB_PATH) -> tuple[str, ...]:
    """id -> token string: 256 byte symbols, the same with '</w>', one token per merge, then SOT, EOT."""
    symbols = list(bytes_to_unicode().values())
    merges = load_merges(vocab_path)
    return tuple(symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT])


_FTFY_CONFIG = ftfy.TextFixerConfig(explain=False)  # what ftfy.fix_text(text) builds on every call


def clean_text(text: str) -> str:
    """CLIP's cleaning: ftfy.fix_text, html.unescape twice, whitespace collapse + strip, lower case."""
    text = ftfy.fix_text(text, config=_FTFY_CONFIG)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


def skips_ftfy(text: str) -> bool:
    """True when ftfy.fix_text + html.unescape provably leave `text` unchanged (plain ASCII, see module doc).

    isprintable() is a fast C check that rules out every control character on ASCII text."""
    return (
        text.isascii()
        and (text.isprintable() or not _ASCII_CONTROL.search(text))
        and ("&" not in text or not _ENTITY_START.search(text))
    )


def clean_chunks(text: str) -> list[str]:
    """clean_text(text).split(' '), skipping ftfy/html.unescape when they provably cannot change `text`."""
    return text.lower().split() if skips_ftfy(text) else clean_text(text).split()


def _decode(ids, vocab, byte_decoder, skip: tuple[int, ...]) -> str:
    """ids -> text (special tokens and padding dropped; word ends '</w>' become spaces)."""
    out = bytearray()
    for i in ids:
        i = int(i)
        if i in skip:
            continue
        tok = vocab[i]
        word_end = tok.endswith("</w>")
        out.extend(byte_decoder[c] for c in (tok[:-4] if word_end else tok))
        if word_end:
            out.extend(b" ")
    return out.decode("utf-8", errors="replace").strip()


class SimpleTokenizer:
    """Pure-Python reference implementation (slow; see FastTokenizer)."""

    PATTERN = PATTERN

    def __init__(self, vocab_path: str | Path = VOCAB_PATH):
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(load_merges(vocab_path))}
        self.vocab = load_vocab(vocab_path)
        self.encoder = {tok: i for i, tok in enumerate(self.vocab)}
        self.decoder = dict(enumerate(self.vocab))
        self.sot_token, self.eot_token = self.encoder[SOT], self.encoder[EOT]
        self.vocab_size = len(self.vocab)
        self.pattern = regex.compile(self.PATTERN, regex.IGNORECASE)
        self._bpe_cached = functools.lru_cache(maxsize=100_000)(self._bpe)

    def _bpe(self, piece: str) -> tuple[str, ...]:
        """Greedily apply the lowest-rank merge until none applies. The last symbol carries '</w>'."""
        word = tuple(piece[:-1]) + (piece[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            a, b = best
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == a and word[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode_pieces(self, pieces) -> list[int]:
        """Regex pieces of cleaned text -> ids (a special-token piece maps to its id)."""
        ids: list[int] = []
        for piece in pieces:
            if piece == SOT or piece == EOT:
                ids.append(self.encoder[piece])
                continue
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[tok] for tok in self._bpe_cached(mapped))
        return ids

    def encode(self, text: str) -> list[int]:
        return self.encode_pieces(self.pattern.findall(clean_text(text)))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """ids -> text (special tokens and padding dropped; word ends '</w>' become spaces)."""
        return _decode(ids, self.vocab, self.byte_decoder, (0, self.sot_token, self.eot_token))

    def __call__(self, texts: str | list[str], context_length: int = 77) -> torch.Tensor:
        return tokenize(texts, context_length, tokenizer=self)


@functools.lru_cache(maxsize=4)
def hf_tokenizer(vocab_path: str | Path = VOCAB_PATH, with_split: bool = False):
    """A HF `tokenizers.Tokenizer` for CLIP's BPE, built from the shipped merges (no tokenizer.json needed).

    with_split=False (what FastTokenizer uses): expects pre-tokenized input (CLIP regex pieces of cleaned text,
    `is_pretokenized=True`); applies the byte-level mapping and the BPE merges.
    with_split=True: standalone - also splits with CLIP's regex in Rust (Oniguruma); exact for cleaned ASCII
    text, may differ from the `regex` module on rare code points (see the module docstring). Neither variant
    cleans text or adds <start_of_text>/<end_of_text>. Built once per arguments and shared: do not mutate it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = load_vocab(vocab_path)
    bpe = models.BPE(
        vocab={tok: i for i, tok in enumerate(vocab)},
        merges=list(load_merges(vocab_path)),
        end_of_word_suffix="</w>",
        cache_capacity=1 << 18,
    )
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if with_split:
        split = pre_tokenizers.Split(Regex(PATTERN.split("|", 2)[2]), behavior="removed", invert=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    return tok


class FastTokenizer:
    """CLIP tokenizer with open_clip-identical ids: fast cleaning + chunk memo + Rust BPE (see module docstring).

    Thread-safe (the memo is a plain dict; concurrent misses may be computed twice, harmlessly)."""

    def __init__(self, vocab_path: str | Path = VOCAB_PATH, memo_size: int = 1 << 18, parallel_misses: bool = False):
        self.vocab_path = vocab_path
        self.vocab = load_vocab(vocab_path)
        self.vocab_size = len(self.vocab)
        self.sot_token, self.eot_token = self.vocab_size - 2, self.vocab_size - 1
        self.byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        self.pattern = regex.compile(PATTERN, regex.IGNORECASE)
        self.memo_size = memo_size
        self.parallel_misses = parallel_misses
        self._byte_table = {b: c for b, c in bytes_to_unicode().items()}  # latin-1 char of a byte -> symbol
        self._memo: dict[str, tuple[int, ...]] = {}
        self._hf = None
        self._lock = threading.Lock()
        self.stats = {"chunks": 0, "misses": 0}  # misses: chunks BPE-encoded in Rust (memo_size=0: every chunk)

    @property
    def hf(self):
        """The Rust BPE (built lazily, once)."""
        if self._hf is None:
            with self._lock:
                if self._hf is None:
                    self._hf = hf_tokenizer(self.vocab_path, with_split=False)
        return self._hf

    def _encode_chunks(self, chunks: list[str]) -> list[tuple[int, ...]]:
        """Distinct cleaned chunks -> ids each (regex split in Python, BPE merges in Rust)."""
        pieces = [self.pattern.findall(c) for c in chunks]
        if self.parallel_misses and len(chunks) >= 4096:
            return self._encode_pieces_parallel(pieces)
        return [self._encode_pieces(ps) for ps in pieces]

    def _encode_pieces(self, pieces: list[str]) -> tuple[int, ...]:
        """Regex pieces -> ids: byte-level mapping in Python, BPE in Rust (BPE.tokenize, no Encoding overhead)."""
        bpe, table = self.hf.model.tokenize, self._byte_table
        ids: list[int] = []
        for p in pieces:
            if p == SOT or p == EOT:  # a literal special-token string, as in open_clip
                ids.append(self.sot_token if p == SOT else self.eot_token)
                continue
            if not p.isascii():  # printable ASCII maps to itself; anything else goes byte-wise
                p = p.encode("utf-8").decode("latin-1").translate(table)
            ids.extend([t.id for t in bpe(p)])
        return tuple(ids)

    def _encode_pieces_parallel(self, pieces: list[list[str]]) -> list[tuple[int, ...]]:
        """Same via encode_batch_fast: parallel over rayon threads, but ~3x more work per chunk (Encodings)."""
        out: list[tuple[int, ...] | None] = [None] * len(pieces)
        todo = []
        for i, ps in enumerate(pieces):
            if ps and SOT not in ps and EOT not in ps:
                todo.append(i)
            else:
                out[i] = self._encode_pieces(ps)
        if todo:
            encs = self.hf.encode_batch_fast([pieces[i] for i in todo], is_pretokenized=True, add_special_tokens=False)
            for i, enc in zip(todo, encs):
                out[i] = tuple(enc.ids)
        return out  # type: ignore[return-value]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """texts -> ids per text (no <start_of_text>/<end_of_text>)."""
        memo = self._memo
        control, entity = _ASCII_CONTROL.search, _ENTITY_START.search
        chunked = [  # clean_chunks, inlined
            t.lower().split()
            if t.isascii() and (t.isprintable() or not control(t)) and ("&" not in t or not entity(t))
            else clean_text(t).split()
            for t in texts
        ]
        # distinct chunks not in the memo (C-level set/dict operations), BPE them in one Rust batch
        missing = list(set(itertools.chain.from_iterable(chunked)).difference(memo))
        self.stats["chunks"] += sum(map(len, chunked))
        self.stats["misses"] += len(missing)
        if missing:
            if len(memo) + len(missing) > max(self.memo_size, 0):
                memo.clear()  # bounded memory; frequent chunks come back within a batch or two
            memo.update(zip(missing, self._encode_chunks(missing)))
        lookup, chain = memo.__getitem__, itertools.chain.from_iterable
        try:
            out = [list(chain(map(lookup, chunks))) for chunks in chunked]
        except KeyError:  # another thread cleared the memo meanwhile: look up privately
            local = {c: memo.get(c) for c in set(itertools.chain.from_iterable(chunked))}
            redo = [c for c, r in local.items() if r is None]
            local.update(zip(redo, self._encode_chunks(redo)))
            out = [list(chain(map(local.__getitem__, chunks))) for chunks in chunked]
        if len(memo) > self.memo_size:
            memo.clear()  # memo_size 0 (or a batch larger than the memo): keep nothing
        return out

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids) -> str:
        """ids -> text (special tokens and padding dropped; word ends '</w>' become spaces)."""
        return _decode(ids, self.vocab, self.byte_decoder, (0, self.sot_token, self.eot_token))

    def __call__(self, texts: str | list[str], context_length: int = 77) -> torch.Tensor:
        return tokenize(texts, context_length, tokenizer=self)


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> FastTokenizer:
    return FastTokenizer()


@functools.lru_cache(maxsize=1)
def get_reference_tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()


def tokenize(
    texts: str | list[str], context_length: int = 77, tokenizer: FastTokenizer | SimpleTokenizer | None = None
) -> torch.Tensor:
    """-> LongTensor[B, context_length]: <sot> ids <eot> 0 ...; too-long texts are cut, keeping <eot> last."""
    if context_length < 1:
        raise ValueError(f"context_length must be >= 1, got {context_length}")
    tok = tokenizer or get_tokenizer()
    if isinstance(texts, str):
        texts = [texts]
    sot, eot, keep = tok.sot_token, tok.eot_token, context_length - 2
    encoded = tok.encode_batch(list(texts))
    n = len(encoded)
    out = np.zeros((n, context_length), dtype=np.int64)
    if n == 0:
        return torch.from_numpy(out)
    if keep < 0:  # context_length 1: just <eot>
        out[:, 0] = eot
        return torch.from_numpy(out)
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=n)
    if lengths.max() > keep:  # truncate: <sot> first keep ids <eot>
        encoded = [ids[:keep] for ids in encoded]
        np.minimum(lengths, keep, out=lengths)
    flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64, count=int(lengths.sum()))
    cols = np.arange(context_length)
    out[:, 0] = sot
    out[(cols >= 1) & (cols <= lengths[:, None])] = flat
    out[np.arange(n), lengths + 1] = eot
    return torch.from_numpy(out)
