"""Learning quality at equal wall-clock: clipforge's defaults vs open_clip's trainer, both trained on the sample web
(OpenMoji's drawings), both evaluated with the same code on a style neither saw (Google's Noto Color Emoji).

    python bench/bench_quality.py --minutes 8 --seeds 3 --out bench/results/quality-DATE.json \
        --plot docs/img/quality-curves.png
    python bench/bench_quality.py --minutes 0.2 --seeds 1 --max-emoji 40 --heldout-max 40 --points 2 \
        --probe-steps 6 --batch 8                                                  # smoke (the test)
    python bench/bench_quality.py --sides clipforge --steps 500 --clipforge-args="--loss siglip" ...  # an ablation arm

What runs, one process at a time on the same cores:
 1. Data. The sample web (pipeline.sampleweb: every OpenMoji picture emoji x --variants, on its backgrounds, with its
    caption phrasings) written straight into clipforge shards -- no crawl: this measures trainers -- and the held-out
    set (pipeline.heldout: one Noto image per emoji, its name as caption, its Unicode group as label) at the model's
    resolution. No held-out image, caption or label is training data: the trainers read only the shard dir.
 2. A probe per side: --probe-steps steps for its steady-state steps/s (the first third excluded). Each side then
    gets steps = its rate x --minutes, so both run their whole schedule (warmup, cosine decay) in the same minutes.
    (--steps N instead gives every side N steps and skips the probe: ablation arms at equal compute.)
 3. Per seed and side, the training run, and the same evaluation (trainer.evaluate.evaluate) at --points evenly
    spaced points and at the end:
      clipforge  --eval-every steps/points inside the run (the time it spends evaluating is taken off its clock);
                 the end: its export run/checkpoint, through trainer.evaluate.run
      open_clip  --epochs points, one checkpoint per epoch (epoch_K.pt), each through trainer.evaluate.run
Equal on both sides: the architecture (open_clip registers clipforge's config via add_model_config), shards, batch,
lr, weight decay, warmup fraction, AdamW betas / eps, grad clip 1.0, fp32, processes, threads, dataloader workers,
seeds. What differs is each tool's own: clipforge's defaults (data pipeline, augmentation, anything --clipforge-args
adds) vs open_clip_train's. Train time is wall-clock from the end of the first step (start-up excluded on both).
Metrics on the held-out set: text->image and image->text R@1/5/10, zero-shot group top-1 and mean per-class recall
(prompt ensemble of pipeline.heldout.TEMPLATES; chance 1/9). Mean +- std over seeds; ratio = clipforge's mean /
open_clip's. Training curves (loss and held-out R@10 over train minutes, every seed) go to --plot.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import bench_train_cpu as cpu  # noqa: E402  (the open_clip wrapper, the model-config export, step timing)

SIDES = ("clipforge", "open_clip")
# short name -> key in trainer.evaluate.flatten_metrics(result, prefix="")
METRICS = {"t2i_R@1": "retrieval/text_to_image_R@1", "t2i_R@5": "retrieval/text_to_image_R@5",
           "t2i_R@10": "retrieval/text_to_image_R@10", "i2t_R@1": "retrieval/image_to_text_R@1",
           "i2t_R@5": "retrieval/image_to_text_R@5", "i2t_R@10": "retrieval/image_to_text_R@10",
           "zs_top1": "zeroshot/top1", "zs_mean_per_class": "zeroshot/mean_per_class_recall"}
HEADLINE = "t2i_R@10"


@dataclass
class QualityConfig:
    minutes: float = 8.0            # train minutes per run, each side
    seeds: int = 3
    sides: tuple[str, ...] = SIDES
    model: str = "tiny"
    batch: int = 64                 # per process, both sides
    lr: float = 2e-3
    weight_decay: float = 0.2
    warmup_frac: float = 0.05       # of each side's steps
    nproc: int = 1
    workers: int = 0
    threads: int = 0                # OMP_NUM_THREADS per process (0: cores // nproc)
    points: int = 8                 # evaluations along each run (curves)
    probe_steps: int = 30
    steps: int = 0                  # > 0: this many steps for every side, no probe (ablations at equal compute)
    max_emoji: int = 0              # sample web concepts (0: every OpenMoji picture emoji)
    variants: int = 2               # training images per concept
    heldout_max: int = 0            # held-out emoji (0: all Noto draws)
    clipforge_args: list[str] = field(default_factory=list)  # extra trainer flags (an ablation arm)

    def __post_init__(self):
        bad = [s for s in self.sides if s not in SIDES]
        if bad or not self.sides:
            raise ValueError(f"--sides: choose from {', '.join(SIDES)}, got {list(self.sides)}")
        if self.minutes <= 0 or self.seeds < 1 or self.points < 1 or self.probe_steps < 3:
            raise ValueError("need --minutes > 0, --seeds >= 1, --points >= 1, --probe-steps >= 3")

    def runner(self, timeout_s: float) -> cpu.BenchConfig:
        """bench_train_cpu's run settings (environment, threads, timeout) for one subprocess."""
        return cpu.BenchConfig(model=self.model, batch=self.batch, nproc=self.nproc, workers=self.workers,
                               threads=self.threads, timeout_s=timeout_s)


# ------------------------------------------------------------------------------------------------------ data
def build_data(work: Path, cfg: QualityConfig, image_size: int) -> dict:
    """The training shards (the sample web's good images) and the held-out set; -> paths and counts."""
    import pyarrow.parquet as pq

    from pipeline import heldout, sampleweb
    from trainer.clip.formats.shards import write_shard_dir

    web = work / "web"
    sampleweb.build(web, sampleweb.SampleWebConfig(max_emoji=cfg.max_emoji, variants=cfg.variants, n_tiny=0,
                                                   n_duplicates=0, n_short_captions=0))
    rows = [r for r in pq.read_table(web / "urls.parquet").to_pylist() if r["kind"] == "ok"]
    rows.sort(key=lambda r: r["url"])

    def sample(i: int, r: dict) -> dict:
        rel = r["url"].split("/", 3)[3]
        ext = rel.rsplit(".", 1)[1]
        return {"__key__": f"{i:09d}", ext: (web / "www" / rel).read_bytes(), "txt": r["caption"],
                "json": {"key": f"{i:09d}", "caption": r["caption"], "url": r["url"]}}

    per = 512
    write_shard_dir(work / "shards", ([sample(i, r) for i, r in enumerate(rows[s:s + per], s)]
                                      for s in range(0, len(rows), per)))
    held = heldout.build(heldout.HeldoutConfig(out=str(work / "heldout"), image_size=image_size,
                                               max_emoji=cfg.heldout_max))
    return {"shards": str(work / "shards"), "train_samples": len(rows), "heldout": str(work / "heldout"),
            "heldout_samples": held["num_samples"], "heldout_groups": held["groups"], "classes": held["classes"]}


# ------------------------------------------------------------------------------------------------------ sides
def clipforge_cmd(cfg: QualityConfig, data: dict, run_dir: Path, steps: int, seed: int, evals: bool) -> list[str]:
    warmup = max(1, int(cfg.warmup_frac * steps))
    cmd = [sys.executable, "-m", "trainer.train", "--shards", data["shards"], "--out", str(run_dir),
           "--model", cfg.model, "--steps", str(steps), "--batch-size", str(cfg.batch), "--nproc", str(cfg.nproc),
           "--zero", "2", "--precision", "fp32", "--workers", str(cfg.workers), "--lr", str(cfg.lr),
           "--warmup", str(warmup), "--weight-decay", str(cfg.weight_decay), "--grad-clip", "1.0",
           "--seed", str(seed), "--log-every", "1", "--no-grad-checkpointing"]
    if evals:
        cmd += ["--eval-retrieval", data["heldout"], "--eval-zeroshot", data["heldout"], "--eval-classes",
                data["classes"], "--eval-every", str(max(1, steps // cfg.points))]
    return cmd + list(cfg.clipforge_args)


def open_clip_argv(cfg: QualityConfig, data: dict, logs: Path, name: str, steps: int, seed: int,
                   epochs: int) -> list[str]:
    per_epoch = max(1, steps // epochs)
    return ["--model", name, "--train-data", cpu.brace_pattern(Path(data["shards"])), "--dataset-type",
            "webdataset", "--dataset-resampled", "--train-num-samples", str(per_epoch * cfg.batch * cfg.nproc),
            "--batch-size", str(cfg.batch), "--epochs", str(epochs), "--workers", str(cfg.workers),
            "--precision", "fp32", "--lr", str(cfg.lr), "--warmup", str(max(1, int(cfg.warmup_frac * steps))),
            "--wd", str(cfg.weight_decay), "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
            "--grad-clip-norm", "1.0", "--seed", str(seed), "--log-every-n-steps", "1",
            "--save-frequency", "1", "--val-frequency", "0", "--zeroshot-frequency", "0", "--report-to", "",
            "--logs", str(logs), "--name", "run", "--dist-backend", "gloo"]


def _train(side: str, cfg: QualityConfig, data: dict, oc: tuple[Path, str], run_dir: Path, steps: int, seed: int,
           evals: bool, timeout_s: float) -> dict[int, dict]:
    """One training run -> {step: {"t": seconds since step 1 (evaluation excluded), "loss"}}. Raises RuntimeError."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    log = run_dir / "stdout.log"
    runner = cfg.runner(timeout_s)
    if side == "clipforge":
        cmd = clipforge_cmd(cfg, data, run_dir / "run", steps, seed, evals)
        rc, _ = cpu._run(cmd, runner, log)
    else:
        times = run_dir / "step_times.jsonl"
        argv = open_clip_argv(cfg, data, run_dir / "logs", oc[1], steps, seed, cfg.points if evals else 1)
        cmd = cpu.open_clip_cmd(runner, oc[0], argv)
        with cpu.env_var(cpu.TIMES_ENV, str(times)):
            rc, _ = cpu._run(cmd, runner, log)
    if rc != 0:
        raise RuntimeError(f"{side} exited {rc}: {cpu._tail(log, 1500)}")
    return clipforge_steps(run_dir / "run") if side == "clipforge" else open_clip_steps(times)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def clipforge_steps(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl elapsed_s minus the evaluation seconds logged before each step, from the end of step 1."""
    evals = sorted((int(r["step"]), float(r.get("seconds", 0.0))) for r in _jsonl(run_dir / "eval.jsonl"))
    out = {}
    for r in _jsonl(run_dir / "metrics.jsonl"):
        s = int(r["step"])
        out[s] = {"t": float(r["elapsed_s"]) - sum(sec for e, sec in evals if e < s), "loss": r.get("loss")}
    return _from_step_one(out)


def open_clip_steps(path: Path) -> dict[int, dict]:
    return _from_step_one({int(r["step"]): {"t": float(r["t"]), "loss": r.get("loss")} for r in _jsonl(path)})


def _from_step_one(rows: dict[int, dict]) -> dict[int, dict]:
    if 1 not in rows:
        raise RuntimeError(f"no time for step 1 (have {len(rows)} steps)")
    t1 = rows[1]["t"]
    return {s: {**r, "t": r["t"] - t1} for s, r in sorted(rows.items())}


def probe(side: str, cfg: QualityConfig, data: dict, oc: tuple[Path, str], work: Path, timeout_s: float) -> float:
    """Steady-state steps/s of one side (the first third of --probe-steps excluded)."""
    steps = _train(side, cfg, data, oc, work / f"probe-{side}", cfg.probe_steps, 0, False, timeout_s)
    warm = max(1, cfg.probe_steps // 3)
    n = max(steps)
    return (n - warm) / max(steps[n]["t"] - steps[warm]["t"], 1e-6)


# ------------------------------------------------------------------------------------------------------ eval
def evaluate_checkpoint(path: Path, data: dict) -> dict[str, float]:
    """The held-out metrics of a checkpoint (clipforge export or open_clip epoch_K.pt), trainer.evaluate's code."""
    import logging

    from trainer.evaluate import EvalRunConfig, flatten_metrics, run

    # open_clip's epoch_K.pt records no activation; its config (clipforge's, exported) has plain GELU, the default
    logging.getLogger("trainer.clip.checkpoint").setLevel(logging.ERROR)
    return _pick(flatten_metrics(run(EvalRunConfig(checkpoint=str(path), retrieval=data["heldout"],
                                                   zeroshot=data["heldout"], classes=data["classes"],
                                                   device="cpu", workers=0)), prefix=""))


def _pick(flat: dict) -> dict[str, float]:
    return {k: float(flat[v]) for k, v in METRICS.items() if v in flat}


def run_one(side: str, cfg: QualityConfig, data: dict, oc, work: Path, steps: int, seed: int, timeout_s: float) -> dict:
    """One seed of one side: the run, its curve points, the final metrics."""
    run_dir = work / f"{side}-seed{seed}"
    t0 = time.perf_counter()
    times = _train(side, cfg, data, oc, run_dir, steps, seed, True, timeout_s)
    wall = time.perf_counter() - t0
    last = max(times)
    curve = []
    if side == "clipforge":
        for r in _jsonl(run_dir / "run" / "eval.jsonl"):
            s = int(r["step"])
            curve.append({"step": s, "train_s": times[s]["t"], **_pick(r)})
        final = evaluate_checkpoint(run_dir / "run" / "checkpoint", data)
    else:
        ckpts = sorted((run_dir / "logs" / "run" / "checkpoints").glob("epoch_*.pt"),
                       key=lambda p: int(p.stem.split("_")[1]))
        per_epoch = max(1, steps // cfg.points)
        for k, p in ((int(p.stem.split("_")[1]), p) for p in ckpts):
            s = min(k * per_epoch, last)
            curve.append({"step": s, "train_s": times[s]["t"], **evaluate_checkpoint(p, data)})
            if k != cfg.points:
                p.unlink()  # ~4x the weights each (optimizer state); the last one is kept
        final = {k: v for k, v in curve[-1].items() if k in METRICS} if curve else {}
    loss = [{"step": s, "train_s": r["t"], "loss": r["loss"]} for s, r in times.items() if r["loss"] is not None]
    return {"side": side, "seed": seed, "steps": last, "train_s": times[last]["t"], "process_wall_s": wall,
            "final": final, "curve": curve, "loss": loss[:: max(1, len(loss) // 400)]}


# ------------------------------------------------------------------------------------------------------ report
def summarize(runs: list[dict], sides: tuple[str, ...]) -> dict:
    out = {}
    for side in sides:
        rs = [r for r in runs if r["side"] == side]
        out[side] = {"seeds": len(rs), "train_s": statistics.mean(r["train_s"] for r in rs),
                     "steps": statistics.mean(r["steps"] for r in rs)}
        for k in METRICS:
            vals = [r["final"][k] for r in rs]
            out[side][k] = {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    return out


def ratios(summary: dict) -> dict[str, float | None]:
    if not all(s in summary for s in SIDES):
        return {}
    a, b = summary["clipforge"], summary["open_clip"]
    return {k: (a[k]["mean"] / b[k]["mean"] if b[k]["mean"] > 0 else None) for k in METRICS}


def table(summary: dict, rat: dict) -> list[str]:
    cols = list(METRICS)
    lines = [f"  {'side':<10} {'steps':>6} {'train s':>8}  " + " ".join(f"{c:>15}" for c in cols)]
    for side, s in summary.items():
        lines.append(f"  {side:<10} {s['steps']:>6.0f} {s['train_s']:>8.1f}  " + " ".join(
            f"{s[c]['mean']:>8.4f}+-{s[c]['std']:.3f}" for c in cols))
    if rat:
        lines.append(f"  {'ratio':<10} {'':>6} {'':>8}  " + " ".join(
            f"{(f'{rat[c]:.2f}x' if rat[c] is not None else 'n/a'):>15}" for c in cols))
    return lines


def markdown_rows(paths: list[str]) -> list[str]:
    """A markdown table of result JSONs (ablation arms): per side, mean +- std over the seeds of each headline
    metric."""
    keys = ("t2i_R@1", "t2i_R@10", "i2t_R@10", "zs_top1", "zs_mean_per_class")
    lines = ["| arm | side | seeds | steps | " + " | ".join(keys) + " |", "|---" * (4 + len(keys)) + "|"]
    for p in paths:
        r = json.loads(Path(p).read_text())
        arm = " ".join(r["config"].get("clipforge_args") or []) or "defaults"
        for side, s in r["summary"].items():
            lines.append(f"| `{arm}` | {side} | {s['seeds']} | {s['steps']:.0f} | " + " | ".join(
                f"{s[k]['mean']:.4f} ± {s[k]['std']:.4f}" for k in keys) + " |")
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"clipforge": "tab:blue", "open_clip": "tab:orange"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in result["runs"]:
        c, lab = colours[r["side"]], f"{r['side']} seed {r['seed']}"
        axes[0].plot([p["train_s"] / 60 for p in r["loss"]], [p["loss"] for p in r["loss"]], color=c, alpha=0.6,
                     lw=0.8, label=lab)
        for ax, key in ((axes[1], "t2i_R@10"), (axes[2], "zs_top1")):
            ax.plot([p["train_s"] / 60 for p in r["curve"]], [p[key] for p in r["curve"]], "o-", color=c,
                    alpha=0.7, ms=3, label=lab)
    chance = 1 / max(1, len(result["data"]["heldout_groups"]))
    axes[2].axhline(chance, color="grey", ls=":", lw=1, label=f"chance {chance:.2f}")
    titles = ("training loss", "held-out (Noto) text->image R@10", "held-out zero-shot group top-1")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("train minutes")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"clipforge vs open_clip at equal wall-clock ({result['config']['model']}, "
                 f"{result['machine']['cores']} cores, {result['date']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ run
def _image_size(model: str) -> int:
    import torch

    from trainer.clip.model import get_config

    with torch.device("meta"):
        return get_config(model).vision.image_size


def run(cfg: QualityConfig, out: str | None = None, plot_path: str | None = None, workdir: str | None = None,
        log=print) -> dict:
    own = tempfile.mkdtemp(prefix="bench_quality_") if workdir is None else None
    work = Path(workdir or own)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = cpu.machine_info()
    log(f"machine: {info['cpu']}, {info['cores']} cores; " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    data = build_data(work, cfg, _image_size(cfg.model))
    log(f"data: {data['train_samples']} training samples (OpenMoji sample web), held-out {data['heldout_samples']} "
        f"Noto images in {len(data['heldout_groups'])} groups")
    oc_json = work / "open_clip_config" / f"clipforge-{cfg.model}.json"
    oc = (oc_json, cpu.write_open_clip_config(cfg.model, oc_json))
    budget = cfg.minutes * 60
    timeout = max(600.0, 4 * budget + 300)
    # step counts are whole multiples of --points: evaluations at k * steps / points, the last one at the end
    if cfg.steps:
        rates, steps = {}, {s: max(cfg.points, cfg.steps // cfg.points * cfg.points) for s in cfg.sides}
        log(f"fixed: {cfg.steps} steps per side (no probe, --minutes unused)")
    else:
        rates = {s: probe(s, cfg, data, oc, work, timeout) for s in cfg.sides}
        steps = {s: max(2 * cfg.points, int(rates[s] * budget) // cfg.points * cfg.points) for s in cfg.sides}
        log("probe: " + ", ".join(f"{s} {rates[s]:.2f} steps/s -> {steps[s]} steps" for s in cfg.sides))
    runs = []
    for seed in range(cfg.seeds):
        for side in (cfg.sides if seed % 2 == 0 else cfg.sides[::-1]):
            r = run_one(side, cfg, data, oc, work, steps[side], seed, timeout)
            runs.append(r)
            log(f"  seed {seed} {side}: {r['steps']} steps in {r['train_s']:.0f} s; " + ", ".join(
                f"{k} {v:.4f}" for k, v in r["final"].items() if k in (HEADLINE, "i2t_R@10", "zs_top1")))
    summary = summarize(runs, cfg.sides)
    rat = ratios(summary)
    log("")
    for line in table(summary, rat):
        log(line)
    if rat.get(HEADLINE) is not None:
        log(f"ratio clipforge/open_clip held-out text->image R@10 = {rat[HEADLINE]:.2f} (target >= 2.0); "
            f"zero-shot top-1 clipforge {summary['clipforge']['zs_top1']['mean']:.3f} vs chance "
            f"{1 / len(data['heldout_groups']):.3f}")
    result = {"date": time.strftime("%Y-%m-%d"), "machine": info, "config": asdict(cfg), "data": data,
              "probe_steps_per_s": rates, "steps": steps, "runs": runs, "summary": summary, "ratios": rat,
              "headline": HEADLINE, "target_ratio": 2.0, "total_wall_s": time.perf_counter() - t0,
              "command": "python bench/bench_quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    if plot_path:
        plot(result, Path(plot_path))
        log(f"wrote {plot_path}")
    if out:
        from trainer.clip.formats.atomic import atomic_write_json

        atomic_write_json(out, result)
        log(f"wrote {out}")
    if own:
        shutil.rmtree(own, ignore_errors=True)
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    d = QualityConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=d.minutes, help="train minutes per run and side")
    p.add_argument("--seeds", type=int, default=d.seeds)
    p.add_argument("--sides", nargs="+", default=list(d.sides), choices=SIDES)
    for name in ("model", "batch", "lr", "weight_decay", "warmup_frac", "nproc", "workers", "threads", "points",
                 "probe_steps", "steps", "max_emoji", "variants", "heldout_max"):
        p.add_argument("--" + name.replace("_", "-"), type=type(getattr(d, name)), default=getattr(d, name))
    p.add_argument("--clipforge-args", default="", help="extra clipforge trainer flags, one string (an ablation)")
    p.add_argument("--workdir", help="keep data, runs and logs here (default: a temp dir, deleted)")
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--plot", help="write the training curves PNG here")
    p.add_argument("--table", nargs="+", metavar="RESULT.json", help="print a markdown table of earlier results "
                                                                     "(ablation arms) and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.table:
        print("\n".join(markdown_rows(a.table)))
        return 0
    try:
        cfg = QualityConfig(minutes=a.minutes, seeds=a.seeds, sides=tuple(a.sides), model=a.model, batch=a.batch,
                            lr=a.lr, weight_decay=a.weight_decay, warmup_frac=a.warmup_frac, nproc=a.nproc,
                            workers=a.workers, threads=a.threads, points=a.points, probe_steps=a.probe_steps,
                            steps=a.steps,
                            max_emoji=a.max_emoji, variants=a.variants, heldout_max=a.heldout_max,
                            clipforge_args=shlex.split(a.clipforge_args))
    except ValueError as e:
        print(f"bench_quality: error: {e}", file=sys.stderr)
        return 2
    run(cfg, out=a.out, plot_path=a.plot, workdir=a.workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
