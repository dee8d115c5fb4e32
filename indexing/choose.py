"""Which FAISS index to build for N vectors of dimension d under a memory budget, and why.

    choice = choose(n, d, parse_bytes("4GB"))             # -> Choice(factory, reasons, estimated_bytes, ...)
    choice = choose(n, d, budget, factory="IVF1024,Flat")  # an explicit factory string: checked and described

Reads and writes nothing: `choose` is arithmetic over (N, d, budget) (an explicit factory string is built once,
empty, to check it and read its structure). The ladder, best recall first, each step taken when its estimate fits:

    Flat                          N·d·4 bytes, exact; only while N <= flat_max (exact search is fast enough)
    HNSW32                        vectors + a 32-neighbour graph (~272 B/vector); only while N <= hnsw_max
    IVF{K},Flat                   vectors + 8-byte ids + K centroids; K = 8·sqrt(N) as a power of two under 1M
                                  vectors (the 4-16·sqrt(N) guideline), 65536 / 262144 / 1048576 above 1M / 10M /
                                  100M; an HNSW32 coarse quantizer (IVF{K}_HNSW32) once K >= 32768
    IVF..,PQ{m}x4fs,Refine(..)    4-bit fast-scan PQ codes re-ranked by float16 / 8-bit vectors (Refine(SQfp16)
                                  or Refine(SQ8)): as fast as PQ, close to IVF-Flat's recall; K = 4·sqrt(N) (a
                                  code costs a fraction of a float distance: fewer, longer lists)
    OPQ{m}_{d'},IVF..,PQ{m}       8-bit PQ codes only, the largest m that fits
    ... on disk                   nothing fits (or --on-disk): IVF inverted lists merged into a memory-mapped
                                  image.ivfdata; RAM holds the quantizer and the rotation (see indexing.grow)

Every decision appends a human-readable reason; the CLI prints them and report.json keeps them.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

HNSW_M = 32
HNSW_GRAPH_BYTES = 2 * HNSW_M * 4 + 16  # level-0 links (2M int32) + levels / offsets / upper levels, per vector
ID_BYTES = 8                             # int64 id per vector in an IVF inverted list
HNSW_QUANTIZER_FROM = 2 ** 15            # K at and above which the coarse quantizer is an HNSW32 graph (below: a
                                         # scan, which stays exact for queries off the image distribution)
PQ_M = (256, 192, 128, 96, 64, 48, 32, 24, 16, 12, 8, 4)
TRAIN_MIN, TRAIN_MAX, TRAIN_PER_LIST = 10_000, 1_000_000, 64
MIN_PER_LIST = 39                        # faiss's own floor: fewer training points per centroid and k-means warns
TUNABLE = ("nprobe", "quantizer_efSearch", "efSearch", "k_factor_rf")

_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text: str | int) -> int:
    """'4GB' -> 4e9, '512MB' -> 512e6, '1.5GiB' / '2G' -> binary units, '1000' -> bytes. ValueError otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"bad size {text!r}: expected a number with an optional unit (B, KB, MB, GB, TB; "
                             f"KiB..TiB or K, M, G, T for powers of 1024), e.g. 4GB or 512MB")
        value, unit = float(m.group(1)), m.group(2).lower()
    out = int(value * _UNITS[unit])
    if out <= 0:
        raise ValueError(f"bad size {text!r}: must be > 0 bytes")
    return out


def format_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Choice:
    factory: str
    reasons: list[str]
    estimated_bytes: int           # RAM the index holds at search time (for on_disk: without the inverted lists)
    needs_training: bool
    train_size: int                # vectors to train on (0 when needs_training is false)
    params_to_tune: list[str] = field(default_factory=list)  # faiss ParameterSpace names
    on_disk: bool = False          # IVF inverted lists merged on disk into image.ivfdata
    nlist: int = 0                 # IVF lists (0: not an IVF index)
    disk_bytes: int = 0            # for on_disk: the size of image.ivfdata (codes + ids)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Choice":
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


def nlist_for(n: int, fast_scan: bool = False) -> tuple[int, str]:
    """(K, why): the number of IVF lists for N vectors, capped so that every list keeps at least MIN_PER_LIST
    training vectors (faiss's k-means warns, and lists go empty, below that). By the guideline by size, except for
    4-bit fast-scan codes (fast_scan): 4·sqrt(N), since scanning such a code costs a fraction of a float distance,
    so fewer, longer lists beat a larger quantizer (measured: docs/search.md, "How many lists")."""
    if fast_scan:
        k = 1 << max(0, round(math.log2(4 * math.sqrt(max(n, 1)))))
        why = (f"K={k} lists ~ 4·sqrt(N) as a power of two: for fast-scan codes fewer, longer lists beat a larger "
               f"quantizer (measured at 1M x 512: K=4096 reaches recall 0.959 at 3,590 QPS per core, K=16384 "
               f"0.944 at 1,540)")
    elif n >= 100_000_000:
        k, why = 1 << 20, f"K=1048576 lists for N={n:,} >= 100M (guideline: IVF1048576_HNSW32 for 100M-1B)"
    elif n >= 10_000_000:
        k, why = 1 << 18, f"K=262144 lists for N={n:,} in 10M-100M (guideline: IVF262144_HNSW32)"
    elif n >= 1_000_000:
        k, why = 1 << 16, f"K=65536 lists for N={n:,} in 1M-10M (guideline: IVF65536_HNSW32)"
    else:
        k = 1 << max(0, round(math.log2(8 * math.sqrt(max(n, 1)))))
        why = f"K={k} lists ~ 8·sqrt(N) as a power of two (guideline under 1M vectors: 4-16·sqrt(N))"
    cap = max(1, n // MIN_PER_LIST)
    if k > cap:
        k = 1 << int(math.log2(cap))
        why = f"K={k} lists: the largest power of two with >= {MIN_PER_LIST} vectors per list (the guideline's is more)"
    return k, why


def train_size_for(nlist: int, n: int) -> int:
    """~64 vectors per list, clipped to [10k, 1M] and to N, but never under MIN_PER_LIST per list (k-means with
    fewer leaves lists empty: at K = 2^18..2^20 the sample is then tens of millions of vectors)."""
    lists = max(1, nlist)
    return int(min(n, max(TRAIN_MIN, MIN_PER_LIST * lists, min(TRAIN_MAX, TRAIN_PER_LIST * lists))))


def _coarse(n: int, d: int, fast_scan: bool = False) -> tuple[str, int, int, list[str]]:
    """(the IVF part of the factory, K, quantizer bytes, reasons)."""
    k, why = nlist_for(n, fast_scan)
    if k >= HNSW_QUANTIZER_FROM:
        return (f"IVF{k}_HNSW32", k, k * (4 * d + HNSW_GRAPH_BYTES),
                [why, f"HNSW32 coarse quantizer: K={k} >= {HNSW_QUANTIZER_FROM} centroids are too many to scan"])
    return f"IVF{k}", k, k * 4 * d, [why]


def _pq_shape(m: int, d: int) -> tuple[str, int, int] | None:
    """(OPQ prefix, d', rotation + codebook bytes) for m sub-quantizers, or None when m does not suit d."""
    if m > d // 2:
        return None
    d_out = min(d, 4 * m)
    if d_out % m:
        return None
    return f"OPQ{m}_{d_out},", d_out, d * d_out * 4 + d_out * 256 * 4


def _params(factory: str, refine: bool) -> list[str]:
    out = []
    if "IVF" in factory:
        out.append("nprobe")
        if "_HNSW" in factory:
            out.append("quantizer_efSearch")
    elif factory.startswith("HNSW"):
        out.append("efSearch")
    if refine:
        out.append("k_factor_rf")
    return out


@dataclass
class _Ask:
    n: int
    d: int
    budget: int
    reasons: list[str]


def choose(n: int, d: int, memory_budget_bytes: int, *, factory: str | None = None, flat_max: int = 100_000,
           hnsw_max: int = 2_000_000, on_disk: bool = False, train_size: int = 0) -> Choice:
    """The index for n vectors of dimension d within memory_budget_bytes (see the module docstring).
    factory: an explicit faiss factory string (not "auto") overrides the ladder. train_size > 0 overrides the
    training sample size. ValueError for bad arguments or an invalid factory string."""
    if n < 1 or d < 1 or memory_budget_bytes < 1:
        raise ValueError(f"choose: need n >= 1, d >= 1 and a budget > 0 (got n={n}, d={d}, "
                         f"budget={memory_budget_bytes})")
    ask = _Ask(n, d, memory_budget_bytes, [])
    if factory and factory != "auto":
        c = describe_factory(factory, n, d, memory_budget_bytes, on_disk=on_disk)
    else:
        c = _ladder(ask, on_disk, flat_max, hnsw_max)
    if train_size and c.needs_training:
        size = min(n, train_size)
        c = Choice(**{**c.to_dict(), "train_size": size,
                      "reasons": [*c.reasons, f"training sample: {size:,} vectors (--train-sample)"]})
    return c


def _ladder(ask: _Ask, on_disk: bool, flat_max: int, hnsw_max: int) -> Choice:
    n, d, budget, why = ask.n, ask.d, ask.budget, ask.reasons
    flat = n * d * 4
    why.append(f"N={n:,} vectors of d={d}: {format_bytes(flat)} as float32; budget {format_bytes(budget)}")
    if on_disk:
        why.append("--on-disk: an IVF index whose inverted lists are merged on disk (Flat / HNSW skipped)")
    elif flat <= budget and n <= flat_max:
        why.append(f"Flat (exact inner product): fits, and N <= {flat_max:,} (--flat-max) so an exact scan is "
                   f"fast enough; recall 1.0, nothing to tune")
        return Choice("Flat", why, flat, False, 0, [])
    else:
        why.append(f"not Flat: {'N > --flat-max ' + format(flat_max, ',') if flat <= budget else 'over budget'}")
        hnsw = n * (4 * d + HNSW_GRAPH_BYTES)
        if hnsw <= budget and n <= hnsw_max:
            why.append(f"HNSW32 (Flat storage): vectors + graph = {format_bytes(hnsw)} fit; no training; tune "
                       f"efSearch")
            return Choice("HNSW32", why, hnsw, False, 0, ["efSearch"])
        why.append(f"not HNSW32: {'over budget' if hnsw > budget else f'N > --hnsw-max {hnsw_max:,}'} "
                   f"({format_bytes(hnsw)} with the graph; its build time grows with N)")
    coarse, k, quant, coarse_why = _coarse(n, d)
    why.extend(coarse_why)
    train = train_size_for(k, n)
    ivf_flat = n * (4 * d + ID_BYTES) + quant
    if ivf_flat <= budget:
        why.append(f"IVF-Flat: vectors + ids + quantizer = {format_bytes(ivf_flat)} fit; train on {train:,}")
        f = f"{coarse},Flat"
        lists = n * (4 * d + ID_BYTES)
        return Choice(f, why, quant if on_disk else ivf_flat, True, train, _params(f, False), on_disk, k,
                      lists if on_disk else 0)
    why.append(f"not IVF-Flat: {format_bytes(ivf_flat)} is over budget")
    if not on_disk:
        got = _refined_pq(ask)
        if got is not None:
            return got
    return _plain_pq(ask, coarse, k, quant, train, on_disk)


def _refined_pq(ask: _Ask) -> Choice | None:
    """4-bit fast-scan PQ codes re-ranked by float16 or 8-bit copies of the vectors, when those fit. No OPQ:
    the codes only pick candidates, the refine orders them (and OPQ's training is the slow part of a build).
    Its own K: nlist_for(fast_scan=True)."""
    n, d = ask.n, ask.d
    coarse, k, quant, coarse_why = _coarse(n, d, fast_scan=True)
    train = train_size_for(k, n)
    shapes = [m for m in PQ_M if m <= d // 2 and d % m == 0 and m % 2 == 0]
    for refine, per in (("SQfp16", 2 * d), ("SQ8", d)):
        for m in shapes:
            total = n * (m // 2 + ID_BYTES + per) + quant + d * 16 * 4 + k * 32 * m // 2  # + fast-scan padding
            if total <= ask.budget:
                f = f"{coarse},PQ{m}x4fs,Refine({refine})"
                ask.reasons.extend(coarse_why)
                ask.reasons.append(
                    f"{f}: {m}x4-bit fast-scan PQ codes ({m // 2} B/vector) find candidates fast; Refine({refine}) "
                    f"re-ranks them with {per} B/vector copies; {format_bytes(total)} fit; tune nprobe and "
                    f"k_factor_rf")
                return Choice(f, ask.reasons, total, True, train, _params(f, True), False, k)
        ask.reasons.append(f"no Refine({refine}): {per} B/vector more does not fit")
    return None


def _plain_pq(ask: _Ask, coarse: str, k: int, quant: int, train: int, forced_disk: bool) -> Choice:
    """8-bit PQ codes, the largest m that fits; on disk when none fits (or when asked to)."""
    n, d = ask.n, ask.d
    shapes = [(m, _pq_shape(m, d)) for m in PQ_M if _pq_shape(m, d) is not None]
    if not shapes:
        raise ValueError(f"d={d} is too small for PQ: use --factory Flat or IVF..,Flat")
    fitting = [(m, s) for m, s in shapes if n * (m + ID_BYTES) + quant + s[2] <= ask.budget]
    on_disk = forced_disk or not fitting
    if fitting:
        m, (opq, d_out, tables) = fitting[0]
    else:  # the inverted lists go on disk: take ~d/4 bytes per code (the RAM budget no longer bounds them)
        m, (opq, d_out, tables) = next(((m, s) for m, s in shapes if m <= max(4, d // 4)), shapes[-1])
        ask.reasons.append(f"even PQ{shapes[-1][0]} codes do not fit in RAM: the inverted lists go on disk "
                           f"(memory-mapped); codes of {m} B/vector")
    codes = n * (m + ID_BYTES)
    f = f"{opq}{coarse},PQ{m}"
    ram = quant + tables + (0 if on_disk else codes)
    ask.reasons.append(f"{f}: {m}-byte PQ codes after an OPQ rotation to {d_out} dims; codes + ids "
                       f"{format_bytes(codes)}{' on disk' if on_disk else ''}, quantizer + rotation "
                       f"{format_bytes(quant + tables)}; tune nprobe")
    if ram > ask.budget:
        ask.reasons.append(f"warning: {format_bytes(ram)} stays in RAM, over the {format_bytes(ask.budget)} budget")
    return Choice(f, ask.reasons, ram, True, train, _params(f, False), on_disk, k, codes if on_disk else 0)


# ------------------------------------------------------------------------------------------------ explicit factory
def describe_factory(factory: str, n: int, d: int, budget: int, on_disk: bool = False) -> Choice:
    """The Choice of an explicit factory string: built empty (ValueError when faiss refuses it), its tunable
    parameters read from faiss's ParameterSpace, its bytes estimated from its structure."""
    import faiss

    index = new_empty(factory, d)
    ps = faiss.ParameterSpace()
    ps.initialize(index)
    names = {ps.parameter_ranges.at(i).name for i in range(ps.parameter_ranges.size())}
    ivf = _extract_ivf(index)
    nlist = int(ivf.nlist) if ivf is not None else 0
    ram, disk = index_bytes(index, n)
    reasons = [f"--factory {factory} given: the chooser's ladder is skipped",
               f"estimated {format_bytes(ram + disk)} for N={n:,} vectors of d={d}; budget {format_bytes(budget)}"]
    can_disk = ivf is not None and _on_disk_ok(index)
    if (on_disk or ram + disk > budget) and can_disk:
        reasons.append("the inverted lists go on disk (memory-mapped): " +
                       ("--on-disk" if on_disk else "the estimate is over the budget"))
        on_disk = True
    elif on_disk:
        raise ValueError(f"--on-disk needs a plain IVF index (no refine, no fast-scan); {factory!r} is not")
    elif ram + disk > budget:
        reasons.append("warning: the estimate is over the budget")
    trains = not index.is_trained
    return Choice(factory, reasons, ram if on_disk else ram + disk, trains,
                  train_size_for(nlist, n) if trains else 0, [p for p in TUNABLE if p in names], on_disk, nlist,
                  disk if on_disk else 0)


def new_empty(factory: str, d: int):
    """faiss.index_factory(d, factory, inner product); ValueError (no C++ trace) when the string is invalid."""
    import faiss

    try:
        return faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1].rsplit(": ", 1)[-1]  # drop faiss's "Error in <C++ sig>" prefix
        raise ValueError(f"invalid faiss factory string {factory!r}: {reason}") from None


def _extract_ivf(index):
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _on_disk_ok(index) -> bool:
    """An IVF index whose inverted lists OnDiskInvertedLists can hold: no refine wrapper, no fast-scan blocks."""
    import faiss

    outer = faiss.downcast_index(index)
    if isinstance(outer, faiss.IndexRefine):
        return False
    ivf = faiss.extract_index_ivf(index)
    return not isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFastScan)


def index_bytes(index, n: int) -> tuple[int, int]:
    """(bytes that stay in RAM, bytes of the inverted lists) of `index` (empty) once it holds n vectors."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        chain = sum(faiss.downcast_VectorTransform(index.chain.at(i)).d_in *
                    faiss.downcast_VectorTransform(index.chain.at(i)).d_out * 4 for i in range(index.chain.size()))
        ram, disk = index_bytes(index.index, n)
        return ram + chain, disk
    if isinstance(index, faiss.IndexRefine):
        ram, disk = index_bytes(index.base_index, n)
        return ram + disk + n * int(faiss.downcast_index(index.refine_index).code_size), 0
    if isinstance(index, faiss.IndexIVF):
        quant, _ = index_bytes(index.quantizer, int(index.nlist))
        return quant, n * (int(index.code_size) + ID_BYTES)
    if isinstance(index, faiss.IndexHNSW):
        storage, _ = index_bytes(index.storage, n)
        return storage + n * HNSW_GRAPH_BYTES, 0
    code = getattr(index, "code_size", None)
    return n * int(code if code is not None else 4 * index.d), 0
