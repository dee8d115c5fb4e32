"""infra/: the launch files run (SLURM on 2 nodes, DeepSpeed on 2 hosts, torchrun) or are checked against the CLIs they
call (KubeRay, Ray cluster launcher). Ray Train as a Ray job: tests/test_ray_job.py."""
import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.clip.checkpoint import load_model
from trainer.clip.model import get_config

from helpers import write_shards

ROOT = Path(__file__).resolve().parents[1]

# Stand-ins for the cluster commands the launch files call, so that the files themselves run here with several
# "nodes" on 127.0.0.1. `srun` starts its command once per node of the allocation (SLURM_NNODES) with that node's
# SLURM_NODEID / SLURM_PROCID; `pdsh -w h0,h1 CMD` runs CMD once per host with pdsh's %n replaced by the host's
# index; like --kill-on-bad-exit=1 / pdsh -S both fail (and stop the other nodes) when one node's command fails.
# `scontrol show hostnames` expands a comma-separated node list; `ssh [-o X] [-p N] HOST CMD` runs CMD here.
FAN_OUT = """
pids=()
for ((node = 0; node < NODES; node++)); do
  CMD=${CMD_TEMPLATE//%n/$node}
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 bash -c "$CMD" &
  pids+=($!)
done
rc=0
for _ in "${pids[@]}"; do
  if ! wait -n; then rc=1; kill "${pids[@]}" 2>/dev/null || true; fi
done
exit $rc
"""
STAND_INS = {
    "srun": '#!/usr/bin/env bash\nwhile [[ $# -gt 0 && $1 == -* ]]; do shift; done\n'
            'NODES=$SLURM_NNODES; CMD_TEMPLATE=$(printf "%q " "$@")' + FAN_OUT,
    "pdsh": '#!/usr/bin/env bash\nwhile [[ $# -gt 0 && $1 == -* ]]; do\n'
            '  case $1 in -w) HOSTS=$2; shift 2;; -f) shift 2;; *) shift;; esac\ndone\n'
            'IFS=, read -r -a H <<< "$HOSTS"; NODES=${#H[@]}; CMD_TEMPLATE="$*"' + FAN_OUT,
    "scontrol": '#!/usr/bin/env bash\n[[ $1 == show && $2 == hostnames ]] || { echo "only show hostnames" >&2; exit 2; }\n'
                'tr "," "\\n" <<< "$3"\n',
    "ssh": '#!/usr/bin/env bash\nwhile [[ $# -gt 0 && $1 == -* ]]; do case $1 in -o|-p) shift 2;; *) shift;; esac; done\n'
           'shift\nexec bash -c "$*"\n',
}
TINY = ["--model", "tiny", "--precision", "fp32", "--zero", "1", "--batch-size", "4", "--steps", "2", "--warmup", "1",
        "--shuffle-buffer", "4", "--log-every", "1"]


@pytest.fixture
def stand_ins(tmp_path):
    """A PATH with the stand-ins first, then this venv (torchrun, deepspeed, python)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STAND_INS.items():
        _write_exe(bin_dir / name, text)
    return f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"


def _check_two_rank_run(out: Path) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2, summary
    resolved = json.loads((out / "train_config.json").read_text())
    assert resolved["model"] == "tiny" and resolved["zero"] == 1 and resolved["global_batch_size"] == 8
    assert load_model(out / "checkpoint").config == get_config("tiny")


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _run(cmd, env, timeout=600):
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "CLIPFORGE_PROGRESS": "0", **env},
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_slurm_sbatch_trains_on_two_nodes(tmp_path, free_port, stand_ins):
    """infra/slurm/train.sbatch as SLURM runs it on a 2-node allocation: one torchrun agent per node (srun), here
    both on 127.0.0.1, meet at the c10d rendezvous on the first node and train one job of world size 2."""
    shards = write_shards(tmp_path / "shards", n_shards=2, per_shard=8, size=32)
    env = {"PATH": stand_ins, "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.1", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "4242", "GPUS_PER_NODE": "1", "RDZV_PORT": str(free_port())}
    _run(["bash", "infra/slurm/train.sbatch", str(shards), str(tmp_path / "run"), *TINY], env)
    _check_two_rank_run(tmp_path / "run")


def test_deepspeed_launch_sh_trains_on_two_hosts(tmp_path, free_port, stand_ins):
    """infra/deepspeed/launch.sh with a 2-host hostfile: DeepSpeed's runner checks ssh, then starts its launcher on
    every host through pdsh with the host's node rank; each launcher starts its rank and they train together."""
    shards = write_shards(tmp_path / "shards", n_shards=2, per_shard=8, size=32)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")  # two names: two hosts for DeepSpeed
    env = {"PATH": stand_ins, "HOSTFILE": str(hostfile), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = _run(["bash", "infra/deepspeed/launch.sh", str(shards), str(tmp_path / "run"), *TINY], env)
    assert "'127.0.0.1': [0], 'localhost': [1]" in proc.stdout + proc.stderr  # DeepSpeed's global rank mapping
    _check_two_rank_run(tmp_path / "run")


def test_torchrun_sh_trains_on_one_node(tmp_path, stand_ins):
    shards = write_shards(tmp_path / "shards", n_shards=2, per_shard=8, size=32)
    _run(["bash", "infra/deepspeed/torchrun.sh", str(shards), str(tmp_path / "run"), "2", *TINY], {"PATH": stand_ins})
    _check_two_rank_run(tmp_path / "run")


@pytest.mark.parametrize("command", ["srun --kill-on-bad-exit=1", "pdsh -S -f 1024 -w h0,h1"])
def test_stand_ins_fail_when_one_node_fails(stand_ins, command):
    """The fan-out stand-ins exit non-zero (and do not hang) when one node's command fails."""
    script = 'if [[ ${SLURM_NODEID} == 1 ]]; then exit 3; fi; exec sleep 60'
    cmd = command.split() + ["bash", "-c", shlex.quote(script) if command.startswith("pdsh") else script]
    proc = subprocess.run(cmd, env={**os.environ, "PATH": stand_ins, "SLURM_NNODES": "2"},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1, proc.stderr


# ------------------------------------------------------------------------------------------------ static checks
class _Parsed(Exception):
    pass


def check_cli(argv: list[str]) -> None:
    """`python -m MODULE ARGS...` as a job would run it: the module's own argparse must accept ARGS (its main() is
    stopped right after parsing, before it does any work)."""
    assert argv[:2] == ["python", "-m"], argv
    module, args = argv[2], argv[3:]
    if module == "trainer.ray_launch":  # launcher flags, then `--`, then the trainer's flags
        from trainer import ray_launch, train

        _, train_argv = ray_launch.parse_launch_args(args)
        train.parse_args(train_argv)
        return
    import argparse
    import importlib

    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, a=None, namespace=None):
        raise _Parsed(real(self, a, namespace))

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        with pytest.raises(_Parsed):
            rc = importlib.import_module(module).main(args)
            raise SystemExit(rc)  # main() returned without a successful parse: it rejected the command line
    finally:
        argparse.ArgumentParser.parse_args = real


def test_check_cli_rejects_a_bad_flag():
    with pytest.raises(SystemExit):
        check_cli(["python", "-m", "pipeline.crawl", "urls.parquet", "out", "--no-such-flag"])
    with pytest.raises(SystemExit):
        check_cli(["python", "-m", "trainer.ray_launch", "--num-workers", "2", "--", "--shards", "s", "--out", "o",
                   "--zero", "5"])


def _kuberay_docs():
    import yaml  # a dependency of ray
    for path in sorted((ROOT / "infra/kuberay").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            yield path.name, doc


def test_kuberay_manifests_are_consistent():
    """What `kubectl apply` and the KubeRay operator check (types, names, references), plus ours: the Ray version
    of the image, token auth, and entrypoints that our CLIs accept."""
    import ray

    docs = list(_kuberay_docs())
    assert {name for name, _ in docs} == {"raycluster.yaml", "rayjob-crawl.yaml", "rayjob-train.yaml",
                                         "rayjob-filter.yaml", "rayjob-shard.yaml", "rayjob-embed.yaml"}
    tag = next(line.split(" -t ")[1].split()[0] for line in (ROOT / "infra/docker/Dockerfile").read_text().splitlines()
               if "docker build" in line)  # the tag the Dockerfile's build line gives the image
    for name, doc in docs:
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob"), name
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec["rayVersion"] == ray.__version__, name  # the Ray the image installs (pyproject's ray)
        assert spec["authOptions"] == {"mode": "token"}, name  # Ray >= 2.60 turns token auth on: a token is needed
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            assert all(isinstance(v, str) for v in group["rayStartParams"].values()), name  # map[string]string
            pod = group["template"]["spec"]
            volumes = {v["name"] for v in pod.get("volumes", [])}
            for c in pod["containers"]:
                assert c["image"].split(":")[0] == tag, name
                assert {m["name"] for m in c.get("volumeMounts", [])} <= volumes, name
                env = {e["name"]: e["value"] for e in c.get("env", [])}
                assert "RAY_AUTH_MODE" not in env and env.get("NO_ALBUMENTATIONS_UPDATE") == "1", name
        for g in spec["workerGroupSpecs"]:
            assert g.get("minReplicas", 0) <= g["replicas"] <= g.get("maxReplicas", g["replicas"]), name
        if doc["kind"] == "RayJob":
            check_cli(shlex.split(doc["spec"]["entrypoint"]))


def test_kuberay_train_job_matches_its_cluster():
    """rayjob-train: as many Ray Train workers as GPUs in the worker group, one GPU each, and the run resumes."""
    (doc,) = [d for name, d in _kuberay_docs() if name == "rayjob-train.yaml"]
    argv = shlex.split(doc["spec"]["entrypoint"])
    from trainer import ray_launch, train

    launch, train_argv = ray_launch.parse_launch_args(argv[3:])
    (group,) = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert launch.use_gpu and launch.num_workers == group["replicas"] * gpus
    cfg = train.parse_args(train_argv)
    assert cfg.save.resume == "latest" and cfg.save.every > 0 and launch.max_failures > 0
    assert all(p.startswith("/data/") for p in (*cfg.data.shards, cfg.out, launch.storage_path))  # the shared PVC


def test_ray_cluster_launcher_config():
    import yaml  # a dependency of ray
    text = (ROOT / "infra/ray/cluster.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert cfg["provider"]["type"] == "local" and cfg["min_workers"] == cfg["max_workers"] == len(
        cfg["provider"]["worker_ips"])
    assert "~/.ray/auth_token" in cfg["file_mounts"]  # every node gets the token before `ray start`
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert cmd.startswith("RAY_AUTH_MODE=token ")
    jobs = [line.split(" -- ", 1)[1] for line in text.splitlines() if line.startswith("#   ray job submit")]
    assert len(jobs) == 3
    for job in jobs:
        check_cli(shlex.split(job))
