"""trainer.ray_launch: trainer.train on Ray Train workers (ray.train.torch.TorchTrainer).

The fast tests check the command line and the errors raised before Ray is touched; the slow ones run the real
launcher, which starts its own in-process Ray on 127.0.0.1 (temp dir under $RAY_TMPDIR, dashboard on a free port)
with 2 CPUs: 2 workers x 1 CPU, gloo."""

import json
import shutil
import uuid
from pathlib import Path

import pytest

from helpers import write_shards
from trainer import ray_launch

TRAIN_FLAGS = ["--model", "tiny", "--steps", "3", "--batch-size", "4", "--warmup", "1", "--log-every", "1",
               "--shuffle-buffer", "8", "--precision", "fp32"]


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the launcher gets as far as connecting to / starting Ray."""
    def refuse(args):
        raise AssertionError("Ray must not be started for a bad command line")
    monkeypatch.setattr(ray_launch, "_init_ray", refuse)


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path / "shards", n_shards=2, per_shard=16, size=32)


# ------------------------------------------------------------------------------------------------ fast
def test_bad_trainer_flags_exit_2_before_ray(no_ray, shards, tmp_path, capsys):
    assert ray_launch.main(["--num-workers", "2", "--", "--shards", str(shards), "--out", str(tmp_path / "r"),
                            "--steps", "three"]) == 2
    assert "invalid int value" in capsys.readouterr().err
    assert ray_launch.main(["--num-workers", "2", "--", "--shards", str(shards)]) == 2  # --out missing
    assert ray_launch.main(["--num-workers", "2", "--", "--shards", str(shards), "--out", str(tmp_path / "r"),
                            "--model", "no-such-model"]) == 2
    assert not (tmp_path / "r").exists()


def test_unusable_input_exits_2_before_ray(no_ray, shards, tmp_path, capsys):
    out = str(tmp_path / "r")
    assert ray_launch.main(["--num-workers", "2", "--", "--shards", str(tmp_path / "nope"), "--out", out]) == 2
    assert "shard dir not found" in capsys.readouterr().err
    assert ray_launch.main(["--num-workers", "2", "--", "--shards", str(shards), "--out", out, "--nproc", "2"]) == 2
    assert "--num-workers" in capsys.readouterr().err


def test_launcher_usage_errors(no_ray, shards, tmp_path, capsys):
    train = ["--shards", str(shards), "--out", str(tmp_path / "r")]
    assert ray_launch.main(["--num-workers", "2"]) == 2  # no `--` and no trainer flags
    assert "after `--`" in capsys.readouterr().err
    assert ray_launch.main(["--", *train]) == 2  # --num-workers is required
    assert ray_launch.main(["--num-workers", "0", "--", *train]) == 2
    assert ray_launch.main(["--num-workers", "2", *train]) == 2  # trainer flags without `--`
    assert ray_launch.main(["--num-work", "2", "--", *train]) == 2  # no abbreviations
    assert ray_launch.main(["--help"]) == 0
    assert "--num-workers" in capsys.readouterr().out
    assert ray_launch.main(["--num-workers", "2", "--", "--help"]) == 0  # the trainer's own help
    assert "--shards" in capsys.readouterr().out


def test_paths_are_pinned_for_the_workers(shards, tmp_path, monkeypatch):
    from trainer.train import parse_args

    monkeypatch.chdir(tmp_path)
    argv = ["--shards", "shards", "--out", "run", "--model", "tiny"]
    pinned = ray_launch._absolute_paths(parse_args(argv), argv)
    cfg = parse_args(pinned)  # what every worker parses: the appended absolute paths win
    assert cfg.data.shards == [str(shards)] and cfg.out == str(tmp_path / "run") and cfg.model.name == "tiny"
    inside_job_copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "run"
    with pytest.raises(ValueError, match="temporary copy"):
        ray_launch._absolute_paths(parse_args(["--shards", "shards", "--out", str(inside_job_copy)]), [])


def test_worker_env(monkeypatch):
    monkeypatch.setenv("CLIPFORGE_DS_LOG_LEVEL", "INFO")
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PRINT_PATCH", raising=False)
    env = ray_launch._worker_env(use_gpu=False)
    assert env["CLIPFORGE_DS_LOG_LEVEL"] == "INFO" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
    assert "CUDA_VISIBLE_DEVICES" not in ray_launch._worker_env(use_gpu=True)


def test_failure_summary_names_every_failed_rank():
    class WorkerGroupError(Exception):
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors")
            self.worker_failures = failures

    e = WorkerGroupError({1: RuntimeError("Traceback ...\n  File x\nRuntimeError: trainer.train exited with status 2"),
                          0: ConnectionError("Connection reset by peer")})
    assert ray_launch._failure_summary(e).splitlines() == [
        "  rank 0: ConnectionError: Connection reset by peer",
        "  rank 1: RuntimeError: trainer.train exited with status 2"]


# ------------------------------------------------------------------------------------------------ slow
@pytest.fixture
def ray_tmpdir(monkeypatch):
    """The launcher's in-process Ray gets its own temp dir (short: Ray's unix socket paths have a length limit)."""
    path = Path("/tmp") / f"cf-rt-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    monkeypatch.setenv("RAY_TMPDIR", str(path))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_ray_train_two_workers(ray_tmpdir, shards, tmp_path):
    from trainer.clip.checkpoint import load_model

    out = tmp_path / "run"
    rc = ray_launch.main(["--num-workers", "2", "--cpus-per-worker", "1", "--num-cpus", "2",
                          "--storage-path", str(tmp_path / "ray_results"),
                          "--", "--shards", str(shards), "--out", str(out), *TRAIN_FLAGS])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert json.loads((out / "train_config.json").read_text())["world_size"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # rank 0 alone writes RUN_DIR
    model = load_model(out / "checkpoint")
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.slow
def test_ray_train_failure_exits_1(ray_tmpdir, shards, tmp_path, monkeypatch, capsys):
    from trainer.loop import fault_injection  # noqa: F401 (the CLIPFORGE_FAULT_STEP hook this test uses)

    # rank 1 is SIGKILLed after step 1 (a preempted node); CLIPFORGE_* is forwarded to the workers. Rank 0's next
    # collective fails, Ray Train ends the run (--max-failures 0) and the launcher exits 1 naming both ranks.
    monkeypatch.setenv("CLIPFORGE_FAULT_STEP", "1")
    out = tmp_path / "run"
    rc = ray_launch.main(["--num-workers", "2", "--num-cpus", "2", "--storage-path", str(tmp_path / "ray_results"),
                          "--", "--shards", str(shards), "--out", str(out), *TRAIN_FLAGS])
    assert rc == 1
    err = capsys.readouterr().err
    assert "[ray_launch] error: training on Ray failed (WorkerGroupError)" in err
    assert "  rank 1: " in err
    assert not (out / "summary.json").exists()
