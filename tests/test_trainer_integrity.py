"""The fault-handling parts on their own, fast: checksums and manifests, the run-dir lock, the parent-death
lifeline (real processes, really killed)."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import process_alive
from trainer.clip.formats import checksum
from trainer.runlock import RunLock, RunLocked, held_above

ROOT = Path(__file__).resolve().parents[1]


def test_digest_is_chunked_and_sensitive_to_every_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(checksum, "CHUNK", 1000)
    data = bytes(range(256)) * 40  # 10,240 bytes: 11 chunks
    (tmp_path / "a").write_bytes(data)
    size, digest = checksum.file_digest(tmp_path / "a")
    assert size == len(data) and digest.startswith("sha256c:")
    import hashlib
    chunks = b"".join(hashlib.sha256(data[i:i + 1000]).digest() for i in range(0, len(data), 1000))
    assert digest == "sha256c:" + hashlib.sha256(chunks).hexdigest()
    flipped = bytearray(data)
    flipped[5000] ^= 1
    (tmp_path / "b").write_bytes(bytes(flipped))
    assert checksum.file_digest(tmp_path / "b")[1] != digest
    (tmp_path / "empty").write_bytes(b"")
    assert checksum.file_digest(tmp_path / "empty") == (0, "sha256c:" + hashlib.sha256(b"").hexdigest())


def test_manifest_verify_names_every_kind_of_damage(tmp_path):
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    for name, n in (("big", 5000), ("mid", 3000), ("sub/small", 10), ("gone", 7)):
        (d / name).write_bytes(os.urandom(n))
    files = checksum.entries_for(d, checksum.unlisted(d, {}))
    checksum.write_manifest(d, files, step=3)
    assert checksum.verify(d)[0] == [] and checksum.read_manifest(d)["step"] == 3
    assert checksum.unlisted(d, files) == []  # the manifest does not list itself

    with open(d / "big", "r+b") as f:
        f.truncate(100)
    raw = bytearray((d / "mid").read_bytes())
    raw[10] ^= 0x80
    (d / "mid").write_bytes(bytes(raw))
    (d / "gone").unlink()
    problems, stats = checksum.verify(d)
    assert stats["files"] == 4
    assert sorted(p.split(":")[0] for p in problems) == ["big", "gone", "mid"]
    assert any("truncated" in p for p in problems) and any("checksum mismatch" in p for p in problems)
    assert any("missing" in p for p in problems)
    # shares: two callers check disjoint halves that cover the manifest
    a, b = checksum.verify(d, (0, 2)), checksum.verify(d, (1, 2))
    assert sorted(a[0] + b[0]) == sorted(problems) and a[1]["files"] + b[1]["files"] == 4
    assert checksum.assign(files, 2)[0][0] == "big"  # the largest first
    (d / checksum.MANIFEST).write_text("{not json")
    with pytest.raises(checksum.ManifestError):
        checksum.verify(d)


def test_run_lock_is_exclusive_names_its_holder_and_dies_with_it(tmp_path):
    run = tmp_path / "run"
    lock = RunLock(run).acquire()
    with pytest.raises(RunLocked, match=rf"in use by another trainer \(pid {os.getpid()} on host"):
        RunLock(run).acquire()  # another open file description: refused even in the same process
    assert not held_above(run)
    os.environ.update(lock.child_env())
    try:
        assert held_above(run) and not held_above(tmp_path / "other")
    finally:
        os.environ.pop("CLIPFORGE_RUN_LOCK_HELD")
    lock.release()
    RunLock(run).acquire().release()

    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from trainer.runlock import RunLock
        RunLock({str(run)!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
        RunLock(run).acquire()
    holder.kill()  # SIGKILL: no cleanup, the lock file stays, the lock does not
    holder.wait()
    assert (run / ".lock").exists()
    RunLock(run).acquire().release()


def test_lifeline_kills_the_child_when_its_parent_is_killed(tmp_path):
    """A parent starts a child that arms die_with_parent and sleeps; SIGKILL of the parent kills the child."""
    pidfile = tmp_path / "child.pid"
    child = textwrap.dedent(f"""
        import os, time
        from trainer.lifeline import die_with_parent
        die_with_parent()
        open({str(pidfile)!r}, "w").write(str(os.getpid()))
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time\n"
                               f"subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True)\n"
                               f"time.sleep(600)"], cwd=ROOT)
    deadline = time.time() + 60
    while not (pidfile.is_file() and pidfile.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    pid = int(pidfile.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 5
    while time.time() < deadline and process_alive(pid):
        time.sleep(0.05)
    assert not process_alive(pid)


def test_lifeline_exec_wrapper_refuses_an_orphan_and_bad_usage():
    from trainer.lifeline import main
    assert main(["notapid", "--", "true"]) == 2
    assert main([str(os.getppid() + 999999), "--", "true"]) == 1  # "parent" is not ours: nothing is started
