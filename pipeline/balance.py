"""Metadata balancing (CLIP paper §2.2, as MetaCLIP reproduces it): match every caption against a term list, cap
the samples per term, sample with a seed.

    matcher = TermMatcher.load(path)         # Aho-Corasick automaton (pyahocorasick): linear in the caption length
    matcher(captions) -> [[term, ...], ...]  # the terms found in each caption as substrings (MetaCLIP's rule)
    balance(con, "survivors", cfg, drops_parquet, terms_parquet) -> rows dropped

Reads  the term list: a text file with one term per line (blank lines and lines starting with '#' ignored), or a
       JSON list of strings.
Writes drops: key, shard, reason (`no_metadata_match` | `balanced_out`), detail, duplicate_of (null), sorted by
       shard then key; terms.parquet: term, matches_before, kept_after, probability (min(1, cap / matches)).

A term matched by `count` survivors keeps each of them with probability p = min(1, per_term_cap / count); a caption
is kept when the draw succeeds for any of its terms, so each term ends with about min(count, cap) samples (more when
its captions also match rarer terms, as in MetaCLIP). The draw for (key, term) is md5(seed:key:term) mapped to
[0, 1): the same seed keeps the same rows on any cluster, in any order, on a rerun. Everything global is DuckDB SQL
(spills to disk): only the per-term counts (one row per term) ever exist at once.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pipeline.common import sql_str
from trainer.clip.flags import opt, require


@dataclass
class BalanceConfig:
    """MetaCLIP-style balancing over a metadata term list (off without --metadata-terms)."""
    metadata_terms: str = opt("", help="term list (one term per line, or a JSON list): balancing on")
    per_term_cap: int = opt(20_000, help="samples kept per term, at most (the CLIP paper: 20,000 at 400M)")
    balance_seed: int = opt(0, help="seed of the per-(key, term) draws")
    keep_unmatched: bool = opt(False, help="keep captions that match no term (MetaCLIP drops them)")
    case_sensitive: bool = opt(False, help="match terms case-sensitively (default: both lower-cased)")

    def __post_init__(self):
        require(self, "per_term_cap", self.per_term_cap >= 1, "must be >= 1")

    @property
    def enabled(self) -> bool:
        return bool(self.metadata_terms)


def load_terms(path: str | Path) -> list[str]:
    """The distinct terms of a term list, in file order. ValueError for an unreadable or empty list."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"--metadata-terms {path}: {e}") from None
    if str(path).endswith(".json"):
        terms = json.loads(text)
        if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
            raise ValueError(f"--metadata-terms {path}: expected a JSON list of strings")
    else:
        terms = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    terms = list(dict.fromkeys(t for t in (s.strip() for s in terms) if t))
    if not terms:
        raise ValueError(f"--metadata-terms {path}: no terms")
    return terms


def terms_fingerprint(path: str | Path, case_sensitive: bool) -> str:
    return hashlib.sha256(Path(path).read_bytes() + (b"\0cs" if case_sensitive else b"\0ci")).hexdigest()[:16]


class TermMatcher:
    """Every term of a list found in a caption as a substring, with one Aho-Corasick automaton."""

    def __init__(self, terms: list[str], case_sensitive: bool = False):
        import ahocorasick

        self.case_sensitive = case_sensitive
        self.automaton = ahocorasick.Automaton()
        for term in terms:
            needle = term if case_sensitive else term.lower()
            if needle not in self.automaton:
                self.automaton.add_word(needle, needle)
        self.automaton.make_automaton()

    @classmethod
    def load(cls, path: str, case_sensitive: bool = False) -> "TermMatcher":
        return _cached_matcher(str(Path(path).resolve()), case_sensitive, terms_fingerprint(path, case_sensitive))

    def __call__(self, captions: list) -> list[list[str]]:
        out = []
        for text in captions:
            if not text:
                out.append([])
                continue
            hay = text if self.case_sensitive else text.lower()
            out.append(sorted({term for _, term in self.automaton.iter(hay)}))
        return out


@lru_cache(maxsize=4)
def _cached_matcher(path: str, case_sensitive: bool, fingerprint: str) -> TermMatcher:
    """One automaton per worker process and term list (500,000 terms take seconds to build)."""
    return TermMatcher(load_terms(path), case_sensitive)


# ---- the global step ---------------------------------------------------------------------------------------------
_U64 = "18446744073709551616.0"


def balance(con, survivors: str, cfg: BalanceConfig, drops: Path, terms_out: Path) -> int:
    """Drop the survivors the per-term caps leave out; write drops and the term counts. -> rows dropped."""
    cap, seed = int(cfg.per_term_cap), int(cfg.balance_seed)
    con.execute(f"""CREATE OR REPLACE TEMP TABLE _term_counts AS
        SELECT term, count(*) AS matches_before, least(1.0, {cap} / count(*)) AS probability
        FROM (SELECT unnest(terms) AS term FROM {survivors}) GROUP BY term""")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE _balance_keep AS
        SELECT s.key, s.shard,
               bool_or(md5_number_lower({seed}::VARCHAR || ':' || s.key || ':' || s.term) / {_U64} < c.probability)
                 AS keep,
               min(c.matches_before) AS rarest
        FROM (SELECT key, shard, unnest(terms) AS term FROM {survivors}) s JOIN _term_counts c USING (term)
        GROUP BY s.key, s.shard""")
    unmatched = "" if cfg.keep_unmatched else f"""
        UNION ALL SELECT key, shard, 'no_metadata_match', 'no term of the list in the caption', NULL
        FROM {survivors} WHERE len(coalesce(terms, [])) = 0"""
    con.execute(f"""COPY (SELECT * FROM (
            SELECT key, shard, 'balanced_out' AS reason,
                   'every matched term over its cap of {cap} (rarest matched ' || rarest || ' times)' AS detail,
                   NULL::VARCHAR AS duplicate_of
            FROM _balance_keep WHERE NOT keep {unmatched}) ORDER BY shard, key)
        TO {sql_str(drops)} (FORMAT parquet)""")
    con.execute(f"""COPY (
        SELECT c.term, c.matches_before, coalesce(a.kept_after, 0) AS kept_after, c.probability
        FROM _term_counts c LEFT JOIN (
            SELECT term, count(*) AS kept_after FROM (
                SELECT unnest(s.terms) AS term FROM {survivors} s JOIN _balance_keep k USING (key, shard)
                WHERE k.keep) GROUP BY term) a USING (term)
        ORDER BY c.matches_before DESC, c.term) TO {sql_str(terms_out)} (FORMAT parquet)""")
    return con.execute(f"SELECT count(*) FROM read_parquet({sql_str(drops)})").fetchall()[0][0]
