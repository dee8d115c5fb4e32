"""Tokenizer throughput: clipforge's fast CLIP tokenizer vs open_clip's (pure-Python) tokenizer.

    python bench/bench_tokenizer.py [--n 1000000] [--open-clip-n 20000] [--batch 10000] [--no-memo-variant]

Captions are synthetic and varied (deterministic): a Zipf-distributed vocabulary of ~60k word forms, numbers,
punctuation, URLs/hashtags, ~4% HTML entities, ~13% non-ASCII (accents, CJK/Cyrillic/Arabic, emoji incl.
ZWJ/skin tones, curly quotes). Each variant tokenizes all N captions with tokenize(batch, 77) in batches
(output tensors are discarded), in a fresh process (cold memo, tokenizer build time reported separately):

* fast, 1 thread    : RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false (the per-core number)
* fast, all threads : FastTokenizer(parallel_misses=True), default rayon settings: memo misses go through
                      encode_batch_fast on all cores (cleaning/memo are Python, single-threaded, so on 2 cores
                      this gains nothing: encode_batch's per-Encoding overhead eats the second core)
* fast, no memo     : (--no-memo-variant) memo_size=0, 1 thread - every chunk goes through the Rust BPE
* open_clip         : open_clip.get_tokenizer("ViT-B-32") on the first --open-clip-n captions, extrapolated
                      linearly to N (it is ~3x slower); ids are compared with clipforge's on that subset.

Measured on the 2-core dev box (Python 3.11, tokenizers 0.23.3, open_clip 3.3.0; other jobs were running, so
wall > cpu), N = 1,000,000, memo miss rate 2.0%:
    clipforge fast, 1 thread            26.7 s wall (22.0 s cpu)   ~37,500 captions/s
    clipforge fast, all threads         21.7 s wall (21.5 s cpu)   ~46,100 captions/s
    clipforge fast, no memo, 1 thread   25.2 s wall (24.7 s cpu)   ~39,600 captions/s
    open_clip SimpleTokenizer           ~76 s (extrapolated from 20,000 in 1.53 s) ~13,100 captions/s
    ids identical on the open_clip subset. What is left is mostly ftfy.fix_text on the ~17% of captions that
    are non-ASCII or hold an HTML entity (~30-60 us each, pure Python, same cost as in open_clip).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_COMMON = (
    "a an the of in on with and at by for from to near under over two three small large big little red blue green "
    "white black yellow old new young happy beautiful dog cat bird man woman child people car bus train bike street "
    "road beach mountain river lake tree flower house building city sky sunset night snow table food pizza coffee "
    "cup phone book sitting standing running playing holding eating looking wearing shirt hat dress photo picture "
    "image illustration vector icon logo stock background texture pattern painting render hd wallpaper design"
).split()
_SYL = "ka to ri mu sen bel dor fa lin gro ve stu pha que nox el ar in ti zo ber mon wy chi ck ly ous"
_UNICODE = [
    "café", "naïve", "résumé", "Straße", "São Paulo", "Łódź", "日本語の写真", "可爱的小狗", "고양이 사진", "Привет мир",
    "фотография", "صورة قطة", "ΟΔΟΣ", "😀", "🐶🐱", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵", "“quoted”", "it’s", "—", "…",
]
_ENTITIES = ["&amp;", "&quot;", "&#39;", "&lt;3", "&nbsp;"]
_PUNCT = [",", ".", "!", "?", ":", ";", "-", "(", ")", "'s", "#", "@", "...", "!!", "/", "%", "&"]


def make_captions(n: int, seed: int = 0) -> list[str]:
    """n deterministic synthetic captions with a realistic (heavy-tailed) vocabulary."""
    rng = random.Random(seed)
    syl = _SYL.split()
    rare = list(dict.fromkeys("".join(rng.choice(syl) for _ in range(rng.randint(2, 4))) for _ in range(60_000)))
    weights = [1.0 / (i + 10) for i in range(len(rare))]  # Zipf-like
    rare_draw = rng.choices(rare, weights, k=n * 4)
    out, k = [], 0
    for _ in range(n):
        words = []
        for _ in range(rng.randint(3, 22)):
            r = rng.random()
            if r < 0.55:
                w = rng.choice(_COMMON)
            elif r < 0.80:
                w, k = rare_draw[k % len(rare_draw)], k + 1
            elif r < 0.85:
                w = str(rng.randrange(10 ** rng.randint(1, 6)))
            elif r < 0.92:
                w = rng.choice(_PUNCT)
            elif r < 0.925:
                w = rng.choice(["http://example.com/" + rng.choice(rare), "#" + rng.choice(rare), "@" + rng.choice(rare)])
            else:
                w = None
            if w is not None:
                words.append(w.capitalize() if rng.random() < 0.1 else w)
        text = " ".join(words)
        r = rng.random()
        if r < 0.13:
            text += " " + " ".join(rng.choice(_UNICODE) for _ in range(rng.randint(1, 3)))
        elif r < 0.17:
            text += " " + rng.choice(_ENTITIES) + " " + rng.choice(_COMMON)
        out.append(text)
    return out


def _time_fast(captions: list[str], batch: int, memo_size: int | None, parallel: bool = False) -> dict:
    from trainer.clip.tokenizer import FastTokenizer, tokenize

    t0 = time.perf_counter()
    kw = {} if memo_size is None else {"memo_size": memo_size}
    tok = FastTokenizer(parallel_misses=parallel, **kw)
    tok.hf  # build the Rust tokenizer (parses merges) before timing
    build_s = time.perf_counter() - t0
    cpu0, t0 = time.process_time(), time.perf_counter()
    for i in range(0, len(captions), batch):
        tokenize(captions[i : i + batch], 77, tokenizer=tok)
    wall = time.perf_counter() - t0
    st = tok.stats
    return {
        "seconds": wall, "cpu_seconds": time.process_time() - cpu0, "captions_per_s": len(captions) / wall,
        "build_s": build_s, "memo_miss_rate": st["misses"] / max(st["chunks"], 1),
    }


def _child(args) -> None:
    captions = make_captions(args.n, args.seed)
    r = _time_fast(captions, args.batch, None if args.memo_size < 0 else args.memo_size, args.parallel)
    print("RESULT " + json.dumps(r))


def _fast_in_subprocess(n: int, seed: int, batch: int, threads: int | None, memo_size: int = -1) -> dict:
    env = dict(os.environ)
    if threads == 1:
        env.update(RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    else:
        env.pop("RAYON_NUM_THREADS", None)
        env["TOKENIZERS_PARALLELISM"] = "true"
    cmd = [sys.executable, __file__, "--child", "--n", str(n), "--seed", str(seed), "--batch", str(batch),
           "--memo-size", str(memo_size)] + ([] if threads == 1 else ["--parallel"])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _fast_in_process(captions: list[str], batch: int, threads: int | None, memo_size: int | None = None) -> dict:
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false" if threads == 1 else "true"
    try:
        return _time_fast(captions, batch, memo_size, parallel=threads != 1)
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def run(n: int = 1_000_000, open_clip_n: int = 20_000, batch: int = 10_000, seed: int = 0,
        subprocess_threads: bool = True, no_memo_variant: bool = False, verbose: bool = True) -> dict:
    """Benchmark at n captions; subprocess_threads=False runs the fast variants in this process (for tests)."""
    import open_clip
    import torch

    from trainer.clip.tokenizer import tokenize

    t0 = time.perf_counter()
    captions = make_captions(n, seed)
    gen_s = time.perf_counter() - t0
    res: dict = {"n": n, "gen_s": gen_s, "cpu_count": os.cpu_count()}
    if subprocess_threads:
        res["fast_1thread"] = _fast_in_subprocess(n, seed, batch, threads=1)
        res["fast_all_threads"] = _fast_in_subprocess(n, seed, batch, threads=None)
        if no_memo_variant:
            res["fast_no_memo_1thread"] = _fast_in_subprocess(n, seed, batch, threads=1, memo_size=0)
    else:
        res["fast_1thread"] = _fast_in_process(captions, batch, threads=1)
        res["fast_all_threads"] = _fast_in_process(captions, batch, threads=None)
        if no_memo_variant:
            res["fast_no_memo_1thread"] = _fast_in_process(captions, batch, threads=1, memo_size=0)

    sub = captions[: min(open_clip_n, n)]
    oc = open_clip.get_tokenizer("ViT-B-32")
    oc(["warm up"])
    t0 = time.perf_counter()
    want = torch.cat([oc(sub[i : i + batch], context_length=77) for i in range(0, len(sub), batch)])
    oc_s = time.perf_counter() - t0
    res["open_clip"] = {"subset": len(sub), "seconds_subset": oc_s, "captions_per_s": len(sub) / oc_s,
                        "seconds_extrapolated": oc_s * n / len(sub)}
    res["parity_ok"] = bool(torch.equal(tokenize(sub, 77), want))
    res["ratio_1thread"] = res["fast_1thread"]["captions_per_s"] / res["open_clip"]["captions_per_s"]
    res["ratio_all_threads"] = res["fast_all_threads"]["captions_per_s"] / res["open_clip"]["captions_per_s"]
    if verbose:
        _report(res)
    return res


def _report(r: dict) -> None:
    n = r["n"]
    print(f"{n:,} synthetic captions (generated in {r['gen_s']:.1f}s), context 77, {r['cpu_count']} CPUs")
    rows = [("clipforge fast, 1 thread", r["fast_1thread"]), ("clipforge fast, all threads", r["fast_all_threads"])]
    if "fast_no_memo_1thread" in r:
        rows.append(("clipforge fast, no memo, 1 thread", r["fast_no_memo_1thread"]))
    for name, v in rows:
        print(f"  {name:36s} {v['seconds']:8.2f} s  {v['captions_per_s']:>10,.0f} captions/s  "
              f"(cpu {v['cpu_seconds']:.2f} s, tokenizer build {v['build_s']:.2f} s, memo miss rate {v['memo_miss_rate']:.1%})")
    o = r["open_clip"]
    print(f"  {'open_clip SimpleTokenizer':36s} {o['seconds_extrapolated']:8.2f} s  {o['captions_per_s']:>10,.0f} captions/s  "
          f"(EXTRAPOLATED from {o['subset']:,} captions in {o['seconds_subset']:.2f} s)")
    print(f"  speed-up vs open_clip: {r['ratio_1thread']:.1f}x (1 thread), {r['ratio_all_threads']:.1f}x (all threads); "
          f"ids identical on the open_clip subset: {r['parity_ok']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--open-clip-n", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-memo-variant", action="store_true", help="also time memo_size=0 (Rust BPE for every chunk)")
    ap.add_argument("--json", action="store_true", help="print the result dict as JSON too")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--memo-size", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--parallel", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    r = run(args.n, args.open_clip_n, args.batch, args.seed, no_memo_variant=args.no_memo_variant)
    if args.json:
        print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
