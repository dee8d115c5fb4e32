"""Run `trainer.train` on N Ray Train workers: the same entry point as torchrun / deepspeed / srun.

    python -m trainer.ray_launch --num-workers 2 [--use-gpu] [--address auto] -- --shards D --out R --model tiny ...
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m trainer.ray_launch --num-workers 8 --use-gpu -- --shards /data/shards --out /data/runs/b32

Everything after `--` is the usual `python -m trainer.train` command line. The driver checks it (a usage error or a
missing shard dir exits 2 before Ray is touched), connects to Ray (`--address`, else `$RAY_ADDRESS` as set inside
`ray job submit`, else an in-process Ray on 127.0.0.1), and runs `ray.train.torch.TorchTrainer` with one worker per
rank. Ray Train gives every worker what torchrun gives a rank: `RANK`, `LOCAL_RANK`, `WORLD_SIZE`,
`LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, and an initialised torch.distributed process group (gloo, or nccl
with `--use-gpu`). Each worker then calls `trainer.train.main(argv)`, which sees a launched rank and trains;
`deepspeed.init_distributed` finds the process group Ray created and reuses it, and `main` tears it down at the end.
Rank 0 writes RUN_DIR exactly as under torchrun.

Shards and RUN_DIR must be on a filesystem that the driver and every worker see under the same path (on a
multi-node cluster: shared storage such as NFS or a PVC mounted on every pod). Relative paths are made absolute on
the driver; a path inside the temporary copy that `ray job submit --working-dir` makes is refused, since what is
written there is deleted with the job.

Exit status: 0 on success, 2 on a bad command line or unusable input, 1 if Ray or the training fails (the workers'
tracebacks are printed).

This module is the only trainer module that imports ray (lazily, inside main); nothing else imports it.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.clip.flags import CLI, opt, require, with_flags
from trainer.lifeline import NO_LIFELINE_ENV

PREFIX = "[ray_launch]"
# Driver environment passed on to the workers (a Ray worker does not inherit the shell of `ray job submit`).
FORWARD_ENV_PREFIXES = ("CLIPFORGE_", "DEEPSPEED_", "NCCL_")


def _err(msg: str) -> None:
    print(f"{PREFIX} error: {msg}", file=sys.stderr, flush=True)


@dataclass
class RayLaunchConfig:
    """Ray Train workers (everything after `--` is the trainer's own command line)."""
    num_workers: int = opt(1, required=True, help="ranks = Ray Train workers (world size)")
    use_gpu: bool = opt(False, help="one GPU per worker (= per rank, cuda:LOCAL_RANK), nccl (default: CPU workers, "
                                    "gloo)")
    cpus_per_worker: float = opt(1.0, help="CPUs reserved per worker (also its OMP_NUM_THREADS)")
    address: str | None = opt(None, help="Ray cluster to join ('auto', ray://..., host:port); default $RAY_ADDRESS "
                                         "(set by `ray job submit`), else an in-process Ray on 127.0.0.1")
    num_cpus: int | None = opt(None, help="CPUs of the in-process Ray (no cluster only)")
    storage_path: str | None = opt(None, help="Ray Train's run storage (its own run metadata only; clipforge writes "
                                              "RUN_DIR); default ~/ray_results; shared storage on a multi-node cluster")
    name: str | None = opt(None, help="Ray Train run name (default clipforge-train-<time>)")
    placement_strategy: str = opt("PACK", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
                                  help="how the workers are placed on the nodes")
    max_failures: int = opt(0, help="worker-group restarts Ray Train may make after a failure; combine with the "
                                    "trainer's `--resume latest --save-every N` so a restart continues from the last "
                                    "checkpoint")

    def __post_init__(self):
        require(self, "num_workers", self.num_workers >= 1, "must be >= 1")
        require(self, "cpus_per_worker", self.cpus_per_worker > 0, "must be > 0")
        require(self, "max_failures", self.max_failures >= 0, "must be >= 0")


def parse_launch_args(argv: list[str]) -> tuple[RayLaunchConfig, list[str]]:
    """Split `LAUNCH_FLAGS -- TRAIN_FLAGS`. SystemExit(2) on a usage error, SystemExit(0) on --help."""
    if "--" in argv:
        i = argv.index("--")
        launch_argv, train_argv = argv[:i], argv[i + 1:]
    else:
        launch_argv, train_argv = argv, []
    cli = CLI(RayLaunchConfig, prog="python -m trainer.ray_launch",
              description="Run trainer.train on N Ray Train workers (TorchTrainer). TRAINER_FLAGS are the flags of "
                          "`python -m trainer.train` (--shards, --out, --model, ...); --nproc is not used here.",
              epilog="usage: python -m trainer.ray_launch --num-workers N [options] -- TRAINER_FLAGS")
    args = cli.parse(launch_argv)
    if not train_argv:
        cli.parser.error("missing trainer flags: put them after `--` (e.g. -- --shards D --out R)")
    return args, train_argv


def _absolute_paths(cfg, train_argv: list[str]) -> list[str]:
    """The driver's cwd is not the workers' (under `ray job submit` each one is a temporary copy of the working
    dir): pin the path flags to absolute paths, appended after the user's (argparse keeps the last value)."""
    pinned = [("--shards", [os.path.abspath(s) for s in cfg.data.shards]), ("--out", [os.path.abspath(cfg.out)])]
    resume = cfg.save.resume
    if resume and resume != "latest":
        pinned.append(("--resume", [os.path.abspath(resume)]))
    if cfg.model.name.endswith(".json") and Path(cfg.model.name).is_file():
        pinned.append(("--model", [os.path.abspath(cfg.model.name)]))
    extra = []
    for flag, paths in pinned:
        for path in paths:
            if f"{os.sep}runtime_resources{os.sep}" in path:
                raise ValueError(f"{flag} {path} is inside Ray's temporary copy of the job's working dir, which is "
                                 f"deleted with the job: give an absolute path on storage every worker sees")
        extra += [flag, *paths]
    return list(train_argv) + extra


def _worker_env(use_gpu: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    # Ray Train's print patch tees print() to stdout and to its logger: every [trainer] line would show twice.
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if not use_gpu:
        # Ray leaves CUDA_VISIBLE_DEVICES alone for a worker with no GPU: hide the node's GPUs, so the trainer's
        # device and backend choice (cuda + nccl iff CUDA is available) matches the gloo group Ray creates.
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker: the body of one torchrun rank."""
    import torch.distributed as dist

    import ray.train

    ctx = ray.train.get_context()
    # Ray Train (TorchConfig, init_method="env") has set these and initialised the process group; set the rank
    # variables again from the context so the trainer sees exactly what torchrun would give it.
    os.environ.update(RANK=str(ctx.get_world_rank()), LOCAL_RANK=str(ctx.get_local_rank()),
                      WORLD_SIZE=str(ctx.get_world_size()), LOCAL_WORLD_SIZE=str(ctx.get_local_world_size()),
                      NODE_RANK=str(ctx.get_node_rank()))
    # a Ray worker's parent is the raylet, and Ray kills the workers of a dead driver itself (fate sharing): no
    # parent-death signal here (trainer.lifeline)
    os.environ[NO_LIFELINE_ENV] = "1"
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"Ray Train did not set {missing} on rank {ctx.get_world_rank()}")
    if not dist.is_initialized() or dist.get_world_size() != ctx.get_world_size():
        raise RuntimeError("Ray Train did not set up the torch.distributed process group")

    from trainer import train as trainer_train

    # With LOCAL_RANK and WORLD_SIZE set, main() runs as a launched rank (as under torchrun): train(cfg), then it
    # destroys the process group through DeepSpeed. Ray's own shutdown then finds no group left to destroy.
    rc = trainer_train.main(list(config["argv"]))
    if rc != 0:
        raise RuntimeError(f"trainer.train exited with status {rc} on rank {ctx.get_world_rank()} "
                           f"(its error is printed above)")


def _init_ray(args) -> bool:
    """Connect to / start Ray. Returns True if this call started it (then main shuts it down)."""
    import ray

    from trainer.clip.ports import free_port

    if ray.is_initialized():
        return False
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # The dashboard serves the state API that Ray Train's placement-group cleaner polls (without it, it logs
        # a warning every second); bound to 127.0.0.1 on a free port.
        ray.init(num_cpus=args.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=free_port(), _node_ip_address="127.0.0.1", log_to_driver=True)
    return True


def _failure_summary(e: BaseException) -> str:
    """One line per failed rank (its final exception line), from a ray.train.WorkerGroupError; else e's last line."""
    def gist(exc: BaseException) -> str:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        errors = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b", line)]
        if errors:
            return errors[-1][:400]
        return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:400]

    failures = getattr(e, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        return "\n".join(f"  rank {rank}: {gist(exc)}" for rank, exc in sorted(failures.items()))
    return f"  {gist(e)}"


def run(args: RayLaunchConfig, train_argv: list[str]):
    """Build and fit the TorchTrainer. Raises ray.train.TrainingFailedError if a worker fails."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": args.cpus_per_worker, **({"GPU": 1} if args.use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"argv": train_argv},
        torch_config=TorchConfig(backend="nccl" if args.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu,
                                     resources_per_worker=resources, placement_strategy=args.placement_strategy),
        run_config=RunConfig(
            name=args.name or f"clipforge-train-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=args.storage_path,
            # a restart reruns the same argv on a new worker group: from step 0, or from the newest checkpoint
            # with `--resume latest --save-every N`
            failure_config=FailureConfig(max_failures=args.max_failures),
            worker_runtime_env={"env_vars": _worker_env(args.use_gpu)},
        ),
    )
    return trainer.fit()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, train_argv = parse_launch_args(argv)
    except SystemExit as e:
        return int(e.code or 0)

    from trainer import train as trainer_train
    from trainer.data import DataError

    try:
        cfg = trainer_train.parse_args(train_argv)
    except SystemExit as e:  # the trainer's own usage error (2) or --help (0)
        return int(e.code or 0)
    try:
        if cfg.nproc != 1:
            raise ValueError("--nproc is for local launches; with Ray the world size is --num-workers")
        # The driver may have no GPU (a CPU-only head node): leave fp16/bf16 support to the GPU workers.
        trainer_train.validate(with_flags(cfg, precision="fp32") if args.use_gpu else cfg)
        train_argv = _absolute_paths(cfg, train_argv)
    except (DataError, ValueError, KeyError, FileNotFoundError) as e:
        _err(str(e))
        return 2

    try:
        import ray  # noqa: F401
        import ray.train.torch  # noqa: F401
    except ImportError as e:
        _err(f"Ray Train is not installed ({e}); pip install 'ray[train]'")
        return 1

    import ray

    out = Path(os.path.abspath(cfg.out))
    started = False
    try:
        started = _init_ray(args)
        print(f"{PREFIX} {args.num_workers} Ray Train workers ({'GPU, nccl' if args.use_gpu else 'CPU, gloo'}) "
              f"-> {out}", flush=True)
        t0 = time.time()
        run(args, train_argv)
    except Exception as e:  # TrainingFailedError (Ray has logged the worker tracebacks), connection errors, ...
        _err(f"training on Ray failed ({type(e).__name__}); the full tracebacks are above\n{_failure_summary(e)}")
        return 1
    finally:
        if started:
            ray.shutdown()

    summary_path = out / "summary.json"
    if not summary_path.is_file():
        _err(f"the workers finished but {summary_path} is not visible here: RUN_DIR must be on storage shared by "
             f"the driver and rank 0")
        return 1
    summary = json.loads(summary_path.read_text())
    print(f"{PREFIX} done in {time.time() - t0:.1f} s: world_size={summary.get('world_size')} "
          f"final_loss={summary.get('final_loss')} checkpoint={summary.get('checkpoint')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
