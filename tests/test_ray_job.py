"""Real Ray jobs: `ray start --head` on 127.0.0.1 (own temp dir, ports and auth token), then `ray job submit --
python -m pipeline.crawl ...` against the sample web, and infra/ray/train_job.sh (Ray Train), exactly as a cluster
user would."""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import sampleweb
from trainer.clip.formats.crawl import CRAWL_MANIFEST

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ray_cluster(tmp_path, free_port):
    bin_dir = Path(sys.executable).parent
    # The cluster's own token (Ray >= 2.60, token auth): `ray start` does not create one, and the job CLI needs it.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    gcs, dash = free_port(), free_port()
    temp = Path("/tmp") / f"cf-ray-{os.getpid()}-{gcs}"  # short: Ray's unix socket paths have a length limit
    cmd = [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--temp-dir", str(temp),
           "--num-cpus", "2", "--disable-usage-stats", "--include-dashboard", "true"]
    # Ray's fixed default ports (agent 52365, client 10001, ...) clash with any other Ray on the machine.
    for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                 "--ray-client-server-port", "--runtime-env-agent-port"):
        cmd += [flag, str(free_port())]
    head = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "ray-head.log", "w"))
    api = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        probe = subprocess.run([str(bin_dir / "ray"), "job", "list", "--address", api], env=env,
                               capture_output=True, text=True)
        if probe.returncode == 0:
            break
        assert head.poll() is None, (tmp_path / "ray-head.log").read_text()[-3000:]
        time.sleep(2)
    else:
        pytest.fail("ray head did not come up in 120 s")
    try:
        yield api, env, bin_dir, gcs
    finally:  # stop only this cluster: its whole process group, never a machine-wide `ray stop`
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_crawl_runs_as_a_ray_job(ray_cluster, tmp_path, free_port):
    api, env, bin_dir, gcs = ray_cluster
    cfg = sampleweb.SampleWebConfig.tiny()
    cfg.port = free_port()
    summary = sampleweb.build(tmp_path / "web", cfg)
    server = sampleweb.serve(tmp_path / "web", cfg.port)
    try:
        out = tmp_path / "crawl"
        cmd = [str(bin_dir / "ray"), "job", "submit", "--address", api, "--submission-id", f"crawl-{cfg.port}",
               "--working-dir", str(ROOT), "--", "python", "-m", "pipeline.crawl",
               str(tmp_path / "web" / "urls.parquet"), str(out), "--samples-per-shard", "100",
               "--allow-private-addresses"]
        for _ in range(30):  # the job API answers before the head's agent has registered: retry that case only
            job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            if "No available agent" not in job.stderr + job.stdout:
                break
            time.sleep(2)
    finally:
        server.shutdown()
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout + job.stderr
    m = json.loads((out / CRAWL_MANIFEST).read_text())
    assert m["complete"] and m["totals"]["rows"] == summary["rows"]
    assert m["totals"]["success"] == summary["rows"] - 4  # 404, not an image, truncated, opt-out


def _start_worker_node(head_gcs: int, env: dict, bin_dir: Path, log: Path, free_port) -> subprocess.Popen:
    """A second Ray node on this machine (its own ports), joined to the head; its own process group."""
    cmd = [str(bin_dir / "ray"), "start", "--address", f"127.0.0.1:{head_gcs}", "--node-ip-address", "127.0.0.1",
           "--num-cpus", "2", "--block", "--disable-usage-stats"]
    for flag in ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                 "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"):
        cmd += [flag, str(free_port())]
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def _raylet(pid: int):
    import psutil

    kids = psutil.Process(pid).children(recursive=True)
    return next((k for k in kids if k.name() == "raylet" or "raylet" in " ".join(k.cmdline()[:1])), None)


def test_crawl_job_spans_two_nodes_and_survives_losing_one(ray_cluster, tmp_path, free_port):
    """`ray job submit -- python -m pipeline.crawl` on a head + a worker node: shards land on both nodes; killing
    the worker node's raylet mid-job still ends with every row exactly once (its shards are redone on the head)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from hostile_web import HostileWeb
    from test_crawl import assert_exactly_once

    from trainer.clip.formats.crawl import complete_shards, read_marker

    api, env, bin_dir, gcs = ray_cluster
    worker = _start_worker_node(gcs, env, bin_dir, tmp_path / "worker.log", free_port)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and _raylet(worker.pid) is None:
            time.sleep(1)
        raylet = _raylet(worker.pid)
        assert raylet is not None, (tmp_path / "worker.log").read_text()[-3000:]
        time.sleep(5)  # the node registers with the head
        with HostileWeb() as web:
            urls = [web.url(f"ok.jpg?row={i}") for i in range(400)]
            pq.write_table(pa.table({"url": urls, "caption": [f"row {i}" for i in range(400)]}),
                           tmp_path / "urls.parquet")
            out = tmp_path / "crawl"
            cmd = [str(bin_dir / "ray"), "job", "submit", "--address", api, "--submission-id", f"crawl2-{web.port}",
                   "--working-dir", str(ROOT), "--", "python", "-m", "pipeline.crawl", str(tmp_path / "urls.parquet"),
                   str(out), "--samples-per-shard", "20", "--per-host-rate", "15", "--thread-count", "4",
                   "--retry-backoff-s", "0.5", "--allow-private-addresses"]
            job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            nodes: set = set()
            deadline = time.time() + 240
            while time.time() < deadline and len(nodes) < 2 and job.poll() is None:
                nodes = {read_marker(s.stats)["node_id"] for s in complete_shards(out)} if out.exists() else set()
                time.sleep(0.2)
            assert len(nodes) == 2, "no shard committed on both nodes before the job ended"
            done_before_kill = len(complete_shards(out))
            raylet.kill()  # the worker node is lost mid-job
            log, _ = job.communicate(timeout=300)
        assert job.returncode == 0, log[-4000:]
        assert done_before_kill < 20
        assert_exactly_once(out, urls)
        m = json.loads((out / CRAWL_MANIFEST).read_text())
        assert len({s["node_id"] for s in m["shards"]}) == 2 and len(m["shards"]) == 20
    finally:
        try:
            os.killpg(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_train_job_sh_runs_ray_train_as_a_ray_job(ray_cluster, tmp_path):
    """infra/ray/train_job.sh against the cluster: `ray job submit -- python -m trainer.ray_launch` runs
    trainer.train on 2 Ray Train workers (CPU, gloo) inside the job; rank 0 writes the run dir."""
    from helpers import write_shards
    from trainer.clip.checkpoint import load_model

    api, env, bin_dir, gcs = ray_cluster
    shards = write_shards(tmp_path / "shards", n_shards=2, per_shard=8, size=32)
    out = tmp_path / "run"
    env = {**env, "RAY_API_SERVER_ADDRESS": api, "RAY_LAUNCH_FLAGS": "--cpus-per-worker 1"}
    cmd = ["bash", "infra/ray/train_job.sh", str(shards), str(out), "2", "--model", "tiny", "--precision", "fp32",
           "--batch-size", "4", "--steps", "2", "--warmup", "1", "--shuffle-buffer", "4", "--log-every", "1"]
    for _ in range(30):  # as above: retry only while the head's agent has not registered
        job = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in job.stderr + job.stdout:
            break
        time.sleep(2)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert json.loads((out / "train_config.json").read_text())["zero"] == 2  # the script's default, kept
    assert load_model(out / "checkpoint").config.embed_dim > 0


def _submit(api: str, env: dict, bin_dir: Path, sid: str, argv: list[str], job_env: dict | None = None):
    cmd = [str(bin_dir / "ray"), "job", "submit", "--address", api, "--submission-id", sid, "--working-dir",
           str(ROOT), "--runtime-env-json", json.dumps({"env_vars": job_env or {}}), "--", "python", "-m", *argv]
    for _ in range(30):  # as above: retry only while the head's agent has not registered
        job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in job.stderr + job.stdout:
            break
        time.sleep(2)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    return job


def _alive_nodes(api: str, env: dict, bin_dir: Path) -> int:
    probe = subprocess.run([str(bin_dir / "ray"), "list", "nodes", "--address", api, "--format", "json"], env=env,
                           capture_output=True, text=True)
    try:
        return sum(n.get("state") == "ALIVE" for n in json.loads(probe.stdout))
    except ValueError:
        return 0


def test_filter_and_shard_jobs_span_two_nodes(ray_cluster, tmp_path, free_port):
    """`ray job submit -- python -m pipeline.filter ...` then `... pipeline.shard ...` on a head + a worker node:
    the per-shard tasks of both stages run on both nodes, and the shards hold every kept sample once."""
    import numpy as np
    from crawl_data import jpeg, row, write_crawl_shard
    from PIL import Image

    from trainer.clip.formats.ledger import read_filter_manifest
    from trainer.clip.formats.shards import read_manifest

    api, env, bin_dir, gcs = ray_cluster
    crawl = tmp_path / "crawl"
    rng = np.random.default_rng(0)
    for s in range(12):
        write_crawl_shard(crawl, s, [row(f"{s * 100 + i:09d}", f"a photo of a cat number {s * 100 + i}",
                                         jpeg(Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).resize(
                                             (64, 64))), size=(64, 64)) for i in range(20)])
    # Ray reuses a leased worker for the next task of the same kind: tasks this small would all run on the head's
    # warm workers before the new node's first worker is up. The test hooks make each task last 1 s.
    slow = {"CLIPFORGE_FILTER_FAULT": "sleep:1", "CLIPFORGE_SHARD_FAULT": "sleep:1"}
    worker = _start_worker_node(gcs, env, bin_dir, tmp_path / "worker.log", free_port)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and _alive_nodes(api, env, bin_dir) < 2:
            time.sleep(1)
        assert _alive_nodes(api, env, bin_dir) == 2, (tmp_path / "worker.log").read_text()[-3000:]
        _submit(api, env, bin_dir, f"filter-{gcs}", ["pipeline.filter", str(crawl), str(tmp_path / "f"),
                                                     "--min-image-side", "32", "--near-dup",
                                                     "--progress-interval-s", "0"], slow)
        _submit(api, env, bin_dir, f"shard-{gcs}", ["pipeline.shard", str(tmp_path / "f"), str(tmp_path / "s"),
                                                    "--samples-per-shard", "20", "--progress-interval-s", "0"], slow)
    finally:
        try:
            os.killpg(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    m = read_filter_manifest(tmp_path / "f")
    assert m["input_rows"] == 240 and m["kept"] == 240 and m["complete"]
    nodes = {stage: {p[stage] for p in m["parts"]} for stage in ("node_features", "node_ledger")}
    assert all(len(v) == 2 for v in nodes.values()), nodes
    shards = read_manifest(tmp_path / "s")
    assert shards["num_samples"] == 240 and len(shards["shards"]) == 12
    assert len(set(shards["nodes"].values())) == 2
