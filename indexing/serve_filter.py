"""The filter language of search (indexing.search.Searcher, and so of the service indexing.serve and the CLI): a
restricted boolean expression over the metadata columns of an index, evaluated with DuckDB into the set of allowed
vector ids. One definition: the Python API, `clipforge search --filter` and `POST /search` all go through here.

    compile_filter("width >= 512 AND caption ILIKE '%dog%'", columns)  ->  '(("width" >= 512) AND ("caption" ...))'
    FilterCache(BUILD/metadata.parquet, ...).allowed(expr)               ->  IdSet (a bitmap of allowed ids)
    selector_params(faiss_index, ids)                                    ->  (faiss SearchParameters, keep-alive)

The language: column names of the metadata, numbers, 'strings' (quotes doubled inside), = != <> < <= > >=,
[NOT] LIKE / ILIKE 'pattern', IS [NOT] NULL, [NOT] IN (literals), AND / OR / NOT, parentheses. A small tokenizer and
a recursive-descent parser accept nothing else (no functions, subqueries, `;`, unknown columns, over-long or
over-deep expressions: FilterError naming the problem) and re-emit the expression as fully parenthesised SQL, so no
client text reaches DuckDB verbatim. Reads metadata.parquet (streamed by DuckDB under memory_limit, spilling to
temp_directory, never all rows in Python); writes nothing but DuckDB's spill files. Each distinct filter is evaluated
once into a bitmap of N/8 bytes (the layout faiss.IDSelectorBitmap reads, so a search can restrict the index to
it); a bounded LRU keeps the recent ones (a restart starts with an empty cache).
"""
from __future__ import annotations

import math
import os
import re
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, NoReturn

import numpy as np


class FilterError(ValueError):
    """A filter outside the language (or one DuckDB cannot evaluate): a 400 with this message."""


_KEYWORDS = {"AND", "OR", "NOT", "LIKE", "ILIKE", "IS", "NULL", "IN"}
_SQL_WORDS = {"SELECT", "FROM", "WHERE", "WITH", "UNION", "EXISTS", "CASE", "CAST", "INSERT", "UPDATE", "DELETE",
              "DROP", "CREATE", "ALTER", "ATTACH", "COPY", "PRAGMA", "INSTALL", "LOAD", "SET", "CALL", "EXPORT"}
_TOKEN = re.compile(r"(?P<num>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)|(?P<str>'(?:[^']|'')*')"
                    r"|(?P<op><=|>=|<>|!=|=|<|>)|(?P<punct>[(),])|(?P<word>[A-Za-z_][A-Za-z0-9_]*)|(?P<minus>-)")


class _Tok(NamedTuple):
    kind: str  # num | str | op | punct | word | minus
    text: str
    pos: int


def tokenize(expr: str) -> list[_Tok]:
    out, pos, end = [], 0, len(expr.rstrip())
    while pos < end:
        while expr[pos].isspace():
            pos += 1
        m = _TOKEN.match(expr, pos)
        if m is None:
            what = "unterminated string literal" if expr[pos] == "'" else f"character {expr[pos]!r} is not allowed"
            raise FilterError(f"{what} (at position {pos})")
        out.append(_Tok(m.lastgroup, m.group(), pos))
        pos = m.end()
    return out


class _Parser:
    """Recursive descent over the tokens; each rule returns the SQL of what it parsed (fully parenthesised)."""
    MAX_DEPTH = 32

    def __init__(self, tokens: list[_Tok], columns: dict[str, str]):  # columns: lower-cased name -> name
        self.toks, self.i, self.cols, self.depth = tokens, 0, columns, 0

    def peek(self, ahead: int = 0) -> _Tok | None:
        return self.toks[self.i + ahead] if self.i + ahead < len(self.toks) else None

    def accept(self, *texts: str) -> _Tok | None:
        """The next token, consumed, if it is a keyword or punctuation of `texts` (keywords in any case)."""
        tok = self.peek()
        if tok is not None and tok.kind in ("word", "punct") and tok.text.upper() in texts:
            self.i += 1
            return tok
        return None

    def fail(self, message: str, tok: _Tok | None = None) -> NoReturn:
        tok = tok or self.peek()
        raise FilterError(message + (f" (at position {tok.pos}: {tok.text!r})" if tok else " (at the end)"))

    def parse(self) -> str:
        if not self.toks:
            raise FilterError("the filter is empty")
        sql, tok = self.or_(), self.peek()
        if tok is not None:
            self.fail("unbalanced parentheses: unexpected ')'" if tok.text == ")" else "expected AND, OR or the end")
        return sql

    def _chain(self, op: str, rule) -> str:
        parts = [rule()]
        while self.accept(op):
            parts.append(rule())
        return parts[0] if len(parts) == 1 else "(" + f" {op} ".join(parts) + ")"

    def or_(self) -> str:  # OR binds looser than AND, AND looser than NOT
        return self._chain("OR", lambda: self._chain("AND", self.not_))

    def not_(self) -> str:
        self.depth += 1  # one level per NOT and per parenthesis: no RecursionError from a hostile filter
        try:
            if self.depth > self.MAX_DEPTH:
                self.fail(f"the filter nests deeper than {self.MAX_DEPTH} levels")
            return f"(NOT {self.not_()})" if self.accept("NOT") else self.predicate()
        finally:
            self.depth -= 1

    def predicate(self) -> str:
        if self.accept("("):
            inner = self.or_()  # already parenthesised
            if not self.accept(")"):
                self.fail("unbalanced parentheses: expected ')'")
            return inner
        left, tok = self.operand(), self.peek()
        if tok is not None and tok.kind == "op":
            self.i += 1
            return f"({left} {'<>' if tok.text == '!=' else tok.text} {self.operand()})"
        if self.accept("IS"):
            neg = "NOT " if self.accept("NOT") else ""
            if not self.accept("NULL"):
                self.fail("expected NULL after IS")
            return f"({left} IS {neg}NULL)"
        neg = "NOT " if self.accept("NOT") else ""
        op = self.accept("LIKE", "ILIKE", "IN")
        if op is None:
            self.fail("expected a comparison (= != <> < <= > >= [NOT] LIKE / ILIKE / IN, IS [NOT] NULL)")
        if op.text.upper() == "IN":
            return f"({left} {neg}IN ({self.literal_list()}))"
        pattern = self.peek()
        if pattern is None or pattern.kind != "str":
            self.fail(f"{op.text.upper()} needs a quoted string pattern")
        self.i += 1
        return f"({left} {neg}{op.text.upper()} {pattern.text})"

    def literal_list(self) -> str:
        if not self.accept("("):
            self.fail("IN needs a parenthesised list of literals")
        items = [self.literal()]
        while self.accept(","):
            items.append(self.literal())
        if not self.accept(")"):
            self.fail("unbalanced parentheses: expected ')' after the IN list")
        return ", ".join(items)

    def operand(self) -> str:
        tok = self.peek()
        if tok is not None and tok.kind == "word" and tok.text.upper() not in _KEYWORDS:
            self._check_word(tok)
            name = self.cols.get(tok.text.lower())
            if name is None:
                self.fail(f"unknown column {tok.text!r} (columns: {', '.join(self.cols.values())})", tok)
            self.i += 1
            return '"' + name.replace('"', '""') + '"'
        return self.literal()

    def _check_word(self, tok: _Tok) -> None:
        nxt = self.toks[self.i + 1] if self.i + 1 < len(self.toks) else None
        if nxt is not None and nxt.text == "(":
            self.fail("function calls are not allowed", tok)
        if tok.text.upper() in _SQL_WORDS:
            self.fail("subqueries and SQL statements are not allowed", tok)

    def literal(self) -> str:
        tok, self.i = self.peek(), self.i + 1
        if tok is not None and tok.kind == "str":
            return tok.text  # the token pattern admits only '...' with quotes doubled: already a safe SQL literal
        if tok is not None and tok.kind == "minus":
            tok, self.i = self.peek(), self.i + 1
            if tok is None or tok.kind != "num":
                self.fail("'-' must be followed by a number", tok)
            return "-" + self._number(tok)
        if tok is not None and tok.kind == "num":
            return self._number(tok)
        if tok is not None and tok.kind == "word":
            self.i -= 1
            self._check_word(tok)
            if tok.text.upper() == "NULL":
                self.fail("compare with NULL using IS NULL / IS NOT NULL", tok)
        self.fail("expected a number or a 'quoted string'", tok)

    def _number(self, tok: _Tok) -> str:
        value = int(tok.text) if tok.text.isdigit() else float(tok.text)
        if (isinstance(value, float) and not math.isfinite(value)) or (isinstance(value, int) and value >= 2 ** 63):
            self.fail("number out of range", tok)
        return repr(value)


def compile_filter(expr: str, columns: list[str], max_chars: int = 1000) -> str:
    """A filter expression -> the equivalent DuckDB SQL condition, or FilterError naming the problem. Accepts only
    column names of `columns`, numbers, 'strings', = != <> < <= > >=, [NOT] LIKE / ILIKE 'pattern', IS [NOT] NULL,
    [NOT] IN (literals), AND / OR / NOT and parentheses."""
    if len(expr) > max_chars:
        raise FilterError(f"the filter is {len(expr)} characters long; at most {max_chars} are allowed")
    return _Parser(tokenize(expr), {c.lower(): c for c in columns}).parse()


@dataclass(frozen=True)
class IdSet:
    """Allowed vector ids as a bitmap: id i is bit (i % 8) of bits[i // 8] (faiss.IDSelectorBitmap's layout)."""
    bits: np.ndarray  # uint8[ceil(N / 8)]
    count: int

    def contains(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        return ((self.bits[ids >> 3] >> (ids & 7).astype(np.uint8)) & 1).astype(bool)


class FilterCache:
    """compile_filter + DuckDB over metadata.parquet -> IdSet; the last `size` distinct filters are kept.
    Vector id i is row i of the parquet (DuckDB's file_row_number)."""

    def __init__(self, meta_path: str | Path, num_rows: int, columns: list[str], max_chars: int = 1000,
                 size: int = 16, memory_limit: str = "1GB", temp_dir: str = ""):
        import duckdb

        self.duckdb, self.n, self.columns, self.max_chars, self.size = duckdb, num_rows, columns, max_chars, size
        self.source = "read_parquet('" + str(meta_path).replace("'", "''") + "', file_row_number = true)"
        temp = temp_dir or os.path.join(tempfile.gettempdir(), "clipforge-filter-duckdb")
        self.con = duckdb.connect(config={"memory_limit": memory_limit, "temp_directory": temp})
        self.cache: OrderedDict[str, IdSet] = OrderedDict()
        self.lock = threading.Lock()

    def allowed(self, expr: str) -> IdSet:
        where = compile_filter(expr, self.columns, self.max_chars)
        with self.lock:  # one evaluation at a time: bounded memory, and a repeated filter is computed once
            if where in self.cache:
                self.cache.move_to_end(where)
                return self.cache[where]
            ids = self._evaluate(where)
            self.cache[where] = ids
            while len(self.cache) > self.size:
                self.cache.popitem(last=False)
            return ids

    def _evaluate(self, where: str) -> IdSet:
        bits, count = np.zeros((self.n + 7) // 8, np.uint8), 0
        try:
            query = f"SELECT file_row_number FROM {self.source} WHERE {where}"
            for batch in self.con.cursor().sql(query).to_arrow_reader(1 << 20):
                ids = batch.column(0).to_numpy(zero_copy_only=False).astype(np.int64)
                np.bitwise_or.at(bits, ids >> 3, np.left_shift(1, ids & 7).astype(np.uint8))
                count += len(ids)
        except self.duckdb.Error as e:
            raise FilterError(f"cannot evaluate the filter: {str(e).splitlines()[0]}") from None
        return IdSet(bits, count)


# ----------------------------------------------------------------------------------------------- faiss selectors
def selector_params(index, allowed: IdSet):
    """(faiss SearchParameters restricting `index` to the allowed ids, objects to keep alive while they are used),
    or None for an index type that takes no selector here (the search widens k instead). The index's own nprobe /
    efSearch are carried over: SearchParametersIVF's default nprobe is 1, not the index's."""
    import faiss

    sel = faiss.IDSelectorBitmap(allowed.bits)
    made = _params_for(faiss.downcast_index(index), sel)
    return None if made is None else (made[0], (sel, allowed.bits, *made[1]))


def _params_for(idx, sel):
    """(params, objects to keep alive) for one (downcast) index level; None where no selector is taken here."""
    import faiss

    if isinstance(idx, faiss.IndexPreTransform):
        inner = _params_for(faiss.downcast_index(idx.index), sel)
        if inner is None:
            return None
        p = faiss.SearchParametersPreTransform()
        p.index_params = inner[0]
        return p, (inner[0], *inner[1])
    if isinstance(idx, faiss.IndexRefine):  # the base index selects; the refinement re-ranks only its candidates
        inner = _params_for(faiss.downcast_index(idx.base_index), sel)
        if inner is None:
            return None
        p = faiss.IndexRefineSearchParameters()
        p.k_factor, p.base_index_params = idx.k_factor, inner[0]
        return p, (inner[0], *inner[1])
    if isinstance(idx, faiss.IndexIVF):
        p, keep = faiss.SearchParametersIVF(), []
        p.sel, p.nprobe = sel, idx.nprobe
        q = faiss.downcast_index(idx.quantizer)
        if isinstance(q, faiss.IndexHNSW):
            qp = faiss.SearchParametersHNSW()
            qp.efSearch = q.hnsw.efSearch
            p.quantizer_params, keep = qp, [qp]
        return p, tuple(keep)
    if isinstance(idx, faiss.IndexHNSW):
        p = faiss.SearchParametersHNSW()
        p.sel, p.efSearch = sel, idx.hnsw.efSearch
        return p, ()
    if isinstance(idx, faiss.IndexFlat):
        p = faiss.SearchParameters()
        p.sel = sel
        return p, ()
    return None
