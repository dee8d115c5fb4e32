"""The trainer under real faults (CPU, 2 gloo ranks): kill -9 of the launcher's process group, two trainers on
one run dir, damaged checkpoints, non-finite steps. No fault is mocked: processes are really killed, files really
truncated and bit-flipped, NaNs really flow through the model. (Out-of-space saves: test_trainer_nospace.py.)"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import free_port, process_alive, write_shards
from trainer import resume
from trainer.clip.checkpoint import load_model
from trainer.clip.formats import checksum
from trainer.train import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CLIPFORGE_PROGRESS": "0"}


def _losses(run):
    path = run / "metrics.jsonl"
    rows = map(json.loads, path.read_text().splitlines()) if path.is_file() else []
    return {r["step"]: r["loss"] for r in rows}


def _args(shards, *extra):
    return ["--shards", str(shards), "--preset", "tiny", "--batch-size", "4", "--nproc", "2", "--log-every", "1",
            "--shuffle-buffer", "10", *extra]


def _descendants(pid: int) -> set[int]:
    """Every live descendant of pid (from /proc; ranks sit in sessions of their own but keep their parent)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _start(args, out, log):
    return subprocess.Popen([sys.executable, "-m", "trainer.train", *args, "--out", str(out)], cwd=ROOT, env=ENV,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(cond, proc, timeout=300, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        assert proc.poll() is None, f"the trainer ended before {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _kill_group(proc) -> set[int]:
    """SIGKILL the launcher's whole process group (what a scheduler does); -> the run's processes just before."""
    family = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return family


def test_kill9_of_the_launcher_group_leaves_no_rank_and_resume_is_exact(tmp_path):
    shards = write_shards(tmp_path / "shards", n_shards=3, per_shard=12, size=32)
    args = _args(shards, "--steps", "24", "--save-every", "3", "--keep-last", "2", "--workers", "1")
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main([*args, "--out", str(ref)]) == 0

    with open(tmp_path / "killed.log", "w") as log:
        proc = _start(args, run, log)
        _wait_for(lambda: len(_losses(run)) >= 7, proc, what="step 7")
        family = _kill_group(proc)
    assert len(family) >= 5, family  # torchrun (under trainer.lifeline), 2 ranks, their data-loader workers
    deadline = time.time() + 10
    while time.time() < deadline and any(map(process_alive, family)):
        time.sleep(0.2)
    assert not [p for p in family if process_alive(p)], "processes of the killed run are still alive 10 s later"
    killed_at = max(_losses(run))
    assert 7 <= killed_at < 24

    assert main([*args, "--out", str(run), "--resume", "latest"]) == 0  # the lock died with its holder
    expected, got = _losses(ref), _losses(run)
    assert sorted(got) == list(range(1, 25))
    start = json.loads((run / "summary.json").read_text())["resumed_from_step"]
    assert start >= 6 and start % 3 == 0
    for step in range(start + 1, 25):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_kill9_of_other_launchers_leaves_no_rank(tmp_path, launcher):
    """Launched by torchrun or DeepSpeed's runner directly (ranks in sessions of their own under torchrun): a kill -9
    of the launcher's process group takes every rank and data-loader worker with it."""
    shards = write_shards(tmp_path / "shards", n_shards=2, per_shard=8, size=32)
    run = tmp_path / "run"
    head = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
            if launcher == "torchrun" else
            [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_addr", "127.0.0.1",
             f"--master_port={free_port()}", "--no_local_rank", "--module"])
    cmd = [*head, "-m" if launcher == "torchrun" else "", "trainer.train", "--shards", str(shards), "--preset",
           "tiny", "--steps", "100000", "--batch-size", "4", "--log-every", "1", "--workers", "1", "--out", str(run)]
    with open(tmp_path / "launcher.log", "w") as log:
        proc = subprocess.Popen([c for c in cmd if c], cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        _wait_for(lambda: len(_losses(run)) >= 2, proc, what="step 2")
        family = _kill_group(proc)
    assert len(family) >= 4, family  # 2 ranks + 2 workers at least
    deadline = time.time() + 10
    while time.time() < deadline and any(map(process_alive, family)):
        time.sleep(0.2)
    assert not [p for p in family if process_alive(p)], f"{launcher}: ranks outlived their launcher"


def test_one_trainer_per_run_dir(tmp_path, capfd):
    shards = write_shards(tmp_path / "shards", n_shards=2, per_shard=8, size=32)
    run = tmp_path / "run"
    with open(tmp_path / "first.log", "w") as log:
        first = _start(_args(shards, "--steps", "100000"), run, log)
        try:
            _wait_for(lambda: len(_losses(run)) >= 1, first, what="the first trainer's first step")
            t0 = time.time()
            assert main([*_args(shards, "--steps", "2"), "--out", str(run)]) == 2
            assert time.time() - t0 < 30  # refused at once, before any rank starts
            err = capfd.readouterr().err
            assert f"in use by another trainer (pid {first.pid} on host" in err and "started 20" in err

            # a second launch that bypasses clipforge's launcher (plain torchrun): rank 0 refuses, both ranks stop
            direct = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                     f"--master_port={free_port()}", "-m", "trainer.train",
                                     *_args(shards, "--steps", "2")[:6], "--steps", "2", "--out", str(run)],
                                    cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
            assert direct.returncode != 0 and f"pid {first.pid}" in direct.stderr, direct.stderr[-3000:]
            assert first.poll() is None
        finally:
            _kill_group(first)
    assert main([*_args(shards, "--steps", "2"), "--out", str(run)]) == 0  # taken over after the kill -9
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _flip_bit(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size * 2 // 3)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x10]))


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    """One uninterrupted 8-step run with checkpoints at steps 3, 6 and 8 (shared by the damage cases)."""
    root = tmp_path_factory.mktemp("checkpointed")
    shards = write_shards(root / "shards", n_shards=3, per_shard=12, size=32)
    args = _args(shards, "--steps", "8", "--save-every", "3", "--keep-last", "5", "--zero", "2")
    assert main([*args, "--out", str(root / "ref")]) == 0
    return args, root / "ref"


@pytest.mark.parametrize("damage", [_truncate, _flip_bit], ids=["truncated", "bit-flipped"])
def test_damaged_newest_checkpoint_falls_back(tmp_path, capfd, damage, checkpointed_run):
    args, ref = checkpointed_run
    assert [p.name for p in resume.complete(ref / "checkpoints")] == [resume.step_name(s) for s in (3, 6, 8)]
    manifest = checksum.read_manifest(ref / "checkpoints" / resume.step_name(6))
    assert manifest["checksum_seconds"] <= manifest["save_seconds"]
    assert set(manifest["files"]) >= {"meta.json", "rank_00000.pt", "rank_00001.pt", "mp_rank_00_model_states.pt"}

    run = tmp_path / "run"  # a run killed after step 7: its checkpoints are 3 and 6, `latest` names 6
    shutil.copytree(ref, run)
    shutil.rmtree(run / "checkpoints" / resume.step_name(8))
    (run / "checkpoints" / "latest").write_text(resume.step_name(6))
    newest = run / "checkpoints" / resume.step_name(6)
    victim = max((p for p in newest.iterdir() if p.name.endswith("optim_states.pt")), key=lambda p: p.stat().st_size)
    damage(victim)
    capfd.readouterr()

    assert main([*args, "--out", str(run), "--resume", str(newest)]) == 2  # an explicit damaged dir: exit 2
    err = capfd.readouterr().err
    assert victim.name in err and "Traceback" not in err

    assert main([*args, "--out", str(run), "--resume", "latest"]) == 0
    captured = capfd.readouterr()
    assert f"skipping damaged checkpoint {newest}: {victim.name}" in captured.err
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == 3
    expected, got = _losses(ref), _losses(run)
    assert sorted(got) == list(range(1, 9))
    for step in range(4, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


@pytest.mark.parametrize("zero,precision,clip", [(0, "fp32", "1.0"), (0, "fp32", "0"), (2, "bf16", "1.0")])
def test_nonfinite_step_is_skipped_and_counted(tmp_path, capfd, monkeypatch, zero, precision, clip):
    """ZeRO 0 fp32 (clipforge's guard, with the clipping's norm or its own) and ZeRO 2 bf16 (DeepSpeed's check)."""
    shards = write_shards(tmp_path / "shards", n_shards=2, per_shard=16, size=32)
    args = _args(shards, "--steps", "6", "--zero", str(zero), "--precision", precision, "--grad-clip", clip)
    monkeypatch.setenv("CLIPFORGE_NAN_STEPS", "3")
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    assert "step 3: the loss or a gradient is not finite; step skipped" in capfd.readouterr().err
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in rows] == [0, 0, 1, 1, 1, 1]
    assert all(r["loss"] == r["loss"] for r in rows if r["step"] != 3)  # every applied step's loss is finite
    weights = load_model(tmp_path / "run" / "checkpoint").state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_a_run_of_nonfinite_steps_stops_with_a_usable_checkpoint(tmp_path, capfd, monkeypatch):
    shards = write_shards(tmp_path / "shards", n_shards=2, per_shard=16, size=32)
    run = tmp_path / "run"
    args = _args(shards, "--steps", "12", "--zero", "0", "--save-every", "2", "--max-nonfinite-steps", "3",
                 "--out", str(run))
    monkeypatch.setenv("CLIPFORGE_NAN_STEPS", "5,6,7,8")
    assert main(args) == 3
    err = capfd.readouterr().err
    assert "3 consecutive steps (5-7) had a non-finite loss or gradient" in err
    assert resume.find(run / "checkpoints", "latest").name == resume.step_name(4)  # no checkpoint of step 6
    monkeypatch.delenv("CLIPFORGE_NAN_STEPS")
    assert main([*args, "--resume", "latest"]) == 0
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == 4
