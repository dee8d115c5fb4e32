"""A checkpoint dir that runs out of space (CPU, 2 gloo ranks): RUN_DIR/checkpoints is a 320 MB tmpfs, mounted
in a mount namespace of the test's own (`unshare`), mostly filled by a filler file. A save fails for real with
ENOSPC; the run goes on (or stops, by flag), `latest` never names a partial checkpoint, and once space is back the
next save and a resume work."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_shards
from trainer import resume
from trainer.train import main

ROOT = Path(__file__).resolve().parents[1]

# $CK: the mount point (RUN/checkpoints); the filler leaves ~70 MB, less than one checkpoint (~128 MB); with
# FREE_AFTER_FAILURE=1 the filler goes once the trainer has reported a failed save (a bounded wait).
SCRIPT = r"""
set -u
mount -t tmpfs -o size=320m clipforge-test "$CK" || exit 97
head -c 250000000 /dev/zero > "$CK/filler" 2>/dev/null
"$PY" -m trainer.train "$@" > "$LOG" 2>&1 &
pid=$!
if [ "$FREE_AFTER_FAILURE" = 1 ]; then
  i=0
  while [ $i -lt 1500 ] && kill -0 $pid 2>/dev/null && ! grep -q "checkpoint save at step" "$LOG"; do
    sleep 0.2; i=$((i + 1))
  done
  rm -f "$CK/filler"
fi
wait $pid
rc=$?
rm -f "$CK/filler"
cp -a "$CK/." "$COPY/"
exit $rc
"""


def _unshare() -> list[str]:
    cmd = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    if not shutil.which("unshare"):
        pytest.skip("util-linux `unshare` is not installed")
    probe = subprocess.run([*cmd, "sh", "-c", "mount -t tmpfs -o size=1m t /mnt || mount -t tmpfs t /tmp"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a mount namespace here: {probe.stderr.strip()}")
    return cmd


def _run_full(tmp_path, args, free_after_failure: bool):
    run, copy, log = tmp_path / "run", tmp_path / "copy", tmp_path / "train.log"
    (run / "checkpoints").mkdir(parents=True)
    copy.mkdir()
    env = {**os.environ, "CLIPFORGE_PROGRESS": "0", "CK": str(run / "checkpoints"), "PY": sys.executable,
           "LOG": str(log), "COPY": str(copy), "FREE_AFTER_FAILURE": "1" if free_after_failure else "0"}
    proc = subprocess.run([*_unshare(), "sh", "-c", SCRIPT, "sh", *args, "--out", str(run)], cwd=ROOT, env=env,
                          timeout=900, capture_output=True, text=True)
    assert proc.returncode != 97, proc.stderr
    (copy / "filler").unlink(missing_ok=True)
    return proc.returncode, log.read_text(), run, copy


def _args(shards, *extra):
    return ["--shards", str(shards), "--preset", "tiny", "--batch-size", "4", "--nproc", "2", "--log-every", "1",
            "--save-every", "2", "--keep-last", "1", "--shuffle-buffer", "10", *extra]


def test_out_of_space_save_continues_and_the_next_save_and_resume_work(tmp_path):
    shards = write_shards(tmp_path / "shards", n_shards=2, per_shard=16, size=32)
    rc, log, run, copy = _run_full(tmp_path, _args(shards, "--steps", "10"), free_after_failure=True)
    assert rc == 0, log[-3000:]
    assert "checkpoint save at step 2 failed (1 in a row)" in log and "No space left on device" in log
    assert "training goes on and the next save tries again" in log
    assert not [p for p in copy.iterdir() if p.name.startswith(resume.TMP_PREFIX)]  # no partial checkpoint left
    latest = resume.find(copy, "latest")
    assert latest is not None and json.loads((latest / "meta.json").read_text())["step"] >= 4
    problems, stats = resume.verify(latest)
    assert problems == [] and stats["files"] >= 5 and not stats.get("legacy")

    shutil.rmtree(run / "checkpoints")
    shutil.copytree(copy, run / "checkpoints")  # the tmpfs went with its namespace: its copy is the storage now
    assert main([*_args(shards, "--steps", "12"), "--out", str(run), "--resume", "latest"]) == 0
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == json.loads(
        (latest / "meta.json").read_text())["step"]


def test_out_of_space_save_stops_cleanly_with_save_errors_stop(tmp_path):
    shards = write_shards(tmp_path / "shards", n_shards=2, per_shard=16, size=32)
    rc, log, run, copy = _run_full(tmp_path, _args(shards, "--steps", "10", "--save-errors", "stop"),
                                   free_after_failure=False)
    assert rc == 4, log[-3000:]
    assert "checkpoint save at step 2 failed" in log and "(--save-errors stop: the run stops)" in log
    assert "Traceback" not in log
    assert not (copy / "latest").exists() and not list(copy.glob("step_*")) and not list(copy.glob(".tmp-*"))
    assert not (run / "summary.json").exists()
