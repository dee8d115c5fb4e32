"""CLIP byte-level BPE tokenizer (lower-cased, 49,152 BPE tokens + start/end = 49,408 ids).

Text is cleaned (ftfy, HTML unescape, whitespace collapse, lower case), split by CLIP's pre-tokenizer regex,
each piece is mapped byte-wise to printable unicode characters and merged with the BPE merge table
(trainer/assets/bpe_simple_vocab_16e6.txt.gz). ids match OpenAI's tokenizer: <start_of_text> = 49406,
<end_of_text> = 49407, 0 = padding.
"""
from __future__ import annotations

import functools
import gzip
import html
from pathlib import Path

import ftfy
import regex
import torch

VOCAB_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # 48,894 merges after the header line
SOT, EOT = "<|startoftext|>", "<|endoftext|>"  # the start/end-of-text special tokens


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


def clean_text(text: str) -> str:
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


class SimpleTokenizer:
    # special tokens, 's 't 're 've 'm 'll 'd, letter runs, single digits, runs of other non-space symbols
    PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

    def __init__(self, vocab_path: str | Path = VOCAB_PATH):
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1 : NUM_MERGES + 1]  # skip the "#version" header
        merges = [tuple(line.split()) for line in lines]
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.sot_token, self.eot_token = self.encoder[SOT], self.encoder[EOT]
        self.vocab_size = len(vocab)
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

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self.pattern.findall(clean_text(text)):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[tok] for tok in self._bpe_cached(mapped))
        return ids

    def decode(self, ids) -> str:
        """ids -> text (special tokens and padding dropped; word ends '</w>' become spaces)."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if i in (0, self.sot_token, self.eot_token):
                continue
            tok = self.decoder[i]
            word_end = tok.endswith("</w>")
            out.extend(self.byte_decoder[c] for c in (tok[:-4] if word_end else tok))
            if word_end:
                out.extend(b" ")
        return out.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | list[str], context_length: int = 77) -> torch.Tensor:
        return tokenize(texts, context_length, tokenizer=self)


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()


def tokenize(texts: str | list[str], context_length: int = 77, tokenizer: SimpleTokenizer | None = None) -> torch.Tensor:
    """-> LongTensor[B, context_length]: <sot> ids <eot> 0 ...; too-long texts are cut, keeping <eot> last."""
    tok = tokenizer or get_tokenizer()
    if isinstance(texts, str):
        texts = [texts]
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [tok.sot_token, *tok.encode(text), tok.eot_token]
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = tok.eot_token
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out
