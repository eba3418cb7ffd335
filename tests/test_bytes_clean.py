"""Issue 18, items 4, 5, 7, 9 and the lock items: clean deletes by ownership and never a finished
shard, temporary names never shared by two writers of one pid, --rebuild redoes only what is
damaged (--rebuild all everything, never with --shard), locks and temporary files never
follow a planted symlink, a busy or unsupported lock says so in one line, and two runs of one
cache split the shards by claims."""

import errno
import fcntl
import os
import threading
import time
from pathlib import Path

import h5py
import pytest
from conftest import make_mini
from typer.testing import CliRunner

import covfeat.store.shards
from covfeat.cli import app
from covfeat.core.fsutil import HOST, AtomicDir, atomic_file
from covfeat.store.catalog import move_aside
from covfeat.store.claims import Claims

runner = CliRunner()
EX = ["extract", "-b", "inception_v3", "--weights", "none", "--augment", "0"]


@pytest.fixture(autouse=True)
def small_shards(monkeypatch):
    """Shards of 2 images: the 8 images of ``mini`` make 4 shards (in-process runs only)."""
    monkeypatch.setattr(covfeat.store.shards, "SHARD_IMAGES", 2)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return make_mini(tmp_path_factory.mktemp("bytes_clean"), n_covid=4, n_normal=4)


def _ex(mini, c, *more):
    return runner.invoke(app, EX + ["--data", str(mini["cohen"]), "--data", str(mini["normal"]), "--cache-dir", str(c),
                                    *more])


def _err(r) -> str:
    return r.stderr.strip().splitlines()[-1]


def _shards(c: Path) -> list[Path]:
    return sorted(c.glob("*.shards/shard-*.h5"))


def _damage(shard: Path) -> None:
    with h5py.File(shard, "r") as h:
        info = h["features"].id.get_chunk_info(1)
    with open(shard, "r+b") as f:
        f.seek(info.byte_offset + 8)
        f.write(b"\xff\xff\xff\xff")


def _plan(mini, c):
    from covfeat.extraction.config import ExtractConfig
    from covfeat.extraction.plan import plan

    return plan([mini["cohen"], mini["normal"]], ExtractConfig(backbone="inception_v3", weights="none", augment=0), c)


def _target(mini, c) -> Path:
    return _plan(mini, c).target


def _ident(p: Path) -> tuple:
    s = p.stat()
    return s.st_ino, s.st_mtime_ns


def test_clean_keeps_finished_shards_and_what_is_not_covfeats(mini, tmp_path):
    c = tmp_path / "c"
    r = _ex(mini, c, "--shard", "0/2")
    assert r.exit_code == 0, r.output
    finished = _shards(c)
    assert len(finished) == 2 and not list(c.glob("*.h5"))  # the index waits for slice 1/2
    folder = finished[0].parent
    dead = 2**22 + 12345  # above pid_max's default: no such process
    stale = folder / f".shard-x.h5.{HOST}.{dead}.0123abcd.tmp"
    stale.write_text("half a shard of a dead writer")
    foreign = c / "x.shards"
    foreign.mkdir()
    (foreign / "data.bin").write_text("another tool's")
    partial, h5tmp = c / "x.partial", c / "y.h5.tmp"
    partial.write_text("another tool's")
    h5tmp.write_text("another tool's")
    gone = "inception_v3-none-0123456789abcdef.h5"  # a lock file left by a cache that no longer exists
    (c / f"{gone}.lock").write_text("")
    r = runner.invoke(app, ["clean", "--cache-dir", str(c), "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    assert _shards(c) == finished and not stale.exists()
    assert foreign.is_dir() and partial.exists() and h5tmp.exists() and not (c / f"{gone}.lock").exists()
    assert f"removed {stale}" in r.stdout
    assert f"kept {folder} (2 finished shard(s) of an extraction whose index is not written yet" in r.stdout
    for p in (foreign, partial, h5tmp):
        assert f"kept {p} (left alone: not covfeat's or not provably stale" in r.stdout
    assert r.stdout.strip().endswith("2 leftover(s) removed")
    r = _ex(mini, c, "--shard", "1/2")  # nothing lost: the other slice completes the cache
    assert r.exit_code == 0, r.output
    assert "Resuming: 2 of 4 shards already extracted; computing 2." in r.stderr
    assert runner.invoke(app, ["verify", r.stdout.strip().splitlines()[-1]]).exit_code == 0


def test_rebuild_redoes_only_the_damaged_shard_and_rebuild_all_everything(mini, tmp_path):
    c = tmp_path / "c"
    assert _ex(mini, c).exit_code == 0
    shards = _shards(c)
    index = next(c.glob("*.h5"))
    before = {p: _ident(p) for p in shards}
    _damage(shards[2])
    r = _ex(mini, c, "--rebuild")
    assert r.exit_code == 0, r.output
    assert f"Moved aside: {shards[2]}.damaged-" in r.stderr and "(a damaged shard, computed again: shard " in r.stderr
    assert "computing 1." in r.stderr
    assert {p: _ident(p) for p in shards if p != shards[2]} == {p: before[p] for p in shards if p != shards[2]}
    assert _ident(shards[2]) != before[shards[2]]
    assert len(list(shards[2].parent.glob("shard-*.h5.damaged-*"))) == 1  # kept, not deleted
    assert len(list(c.glob(f"{index.name}.damaged-*"))) == 1  # the old index, moved aside and written again
    assert runner.invoke(app, ["verify", str(index)]).exit_code == 0
    now = {p: _ident(p) for p in shards}
    r = _ex(mini, c, "--rebuild", "all")
    assert r.exit_code == 0, r.output
    assert len(list(c.glob("*.shards.damaged-*"))) == 1 and "computing" not in r.stderr
    assert all(_ident(p) != now[p] for p in shards)  # every shard computed again
    assert runner.invoke(app, ["verify", str(index)]).exit_code == 0


def test_rebuild_all_with_shard_is_refused(mini, tmp_path):
    r = _ex(mini, tmp_path / "c", "--shard", "0/2", "--rebuild", "all")
    assert r.exit_code == 1
    assert _err(r).startswith("error: --rebuild all cannot go with --shard i/N: each array task would move the others' "
                              "shards aside.")
    assert not (tmp_path / "c").exists()


def test_two_moves_aside_in_one_second_keep_both(tmp_path):
    target = tmp_path / "x.h5"
    moved = []
    for k in range(2):  # in one second (the names do not depend on it)
        target.write_text(f"cache {k}")
        target.with_name("x.h5.shards").mkdir()
        moved += move_aside(target)
    assert len(set(moved)) == 4 and sorted(p.read_text() for p in moved if p.is_file()) == ["cache 0", "cache 1"]


def test_a_symlink_planted_at_the_lock_is_never_followed(mini, tmp_path):
    c = tmp_path / "c"
    target = _target(mini, c)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    c.mkdir()
    lock = target.with_name(target.name + ".lock")
    lock.symlink_to(victim)
    r = _ex(mini, c)
    assert r.exit_code == 1
    assert _err(r) == (f"error: the lock file {lock} is a symlink; covfeat never writes through one there (it could "
                       "point at any file you can write): remove it and run again")
    assert victim.read_text() == "precious" and not _shards(c)


def test_a_temporary_file_is_created_exclusively(tmp_path, monkeypatch):
    """A symlink planted at the temporary name (here: the name made predictable) is not followed."""
    import covfeat.core.fsutil as fsutil

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    planted = tmp_path / ".out.json.planted.tmp"
    planted.symlink_to(victim)
    monkeypatch.setattr(fsutil, "temp_path", lambda final: planted)
    with pytest.raises(FileExistsError), atomic_file(tmp_path / "out.json") as tmp:
        tmp.write_text("attacker's choice")
    assert victim.read_text() == "precious"


def test_a_busy_lock_names_host_and_pid_and_no_locking_is_one_line(mini, tmp_path, monkeypatch):
    from covfeat.store.lock import CacheLock

    c = tmp_path / "c"
    target = _target(mini, c)
    with CacheLock(target):
        r = _ex(mini, c)
    assert r.exit_code == 1
    assert f"Another covfeat process (pid {os.getpid()} on {HOST}) is writing {target.name}" in _err(r)

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    r = _ex(mini, c)
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) >= 1 and "Traceback" not in r.output
    assert _err(r).startswith(f"error: the file system of {c} does not support file locks (")
    assert "use a --cache-dir on a local disk" in _err(r)


def test_two_writers_of_one_pid_never_share_a_temporary_name(tmp_path):
    barrier = threading.Barrier(2)
    temps, finals, errors = [], [], []

    def write(k):
        try:
            with atomic_file(tmp_path / "same.json") as tmp:
                temps.append(tmp)
                tmp.write_text(f"writer {k}")
                barrier.wait(timeout=10)  # both temporaries exist at once
            with AtomicDir(tmp_path, "run") as d:
                (d.path / "who").write_text(f"writer {k}")
                barrier.wait(timeout=10)
            finals.append(d.final)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(temps)) == 2
    assert (tmp_path / "same.json").read_text() in ("writer 0", "writer 1")
    assert sorted(p.name for p in finals) == ["run", "run-2"]
    assert sorted((p / "who").read_text() for p in finals) == ["writer 0", "writer 1"]
    assert sorted(os.listdir(finals[0])) == ["who"]


def test_a_second_run_computes_only_unclaimed_shards_and_waits_for_the_others(mini, tmp_path):
    c = tmp_path / "c"
    target = _target(mini, c)
    shards = [target.with_name(target.name + ".shards") / s.name for s in _plan(mini, c).shards]
    shards[0].parent.mkdir(parents=True)
    claims = Claims()
    claims.take([shards[1]])  # another run is computing shard 1
    r = _ex(mini, c, "--shard", "0/1")  # a slice leaves it to the other run
    assert r.exit_code == 0, r.output
    assert (f"1 shard(s) are being computed by another run (pid {os.getpid()} on {HOST}); left to it: "
            f"{shards[1].name}") in r.stderr
    assert [p.exists() for p in shards] == [True, False, True, True]
    shards[0].unlink()
    claims.release()
    claims.take([shards[1]])
    out = {}
    run = threading.Thread(target=lambda: out.update(r=_ex(mini, c)))
    run.start()  # a run without --shard waits for the other's shard
    deadline = time.time() + 120
    while time.time() < deadline and not shards[0].exists():
        time.sleep(0.05)
    time.sleep(0.5)
    assert run.is_alive() and not shards[1].exists()
    claims.release()  # the other run died without writing it: this run computes it
    run.join(120)
    r = out["r"]
    assert r.exit_code == 0, r.output
    assert "Waiting for the other run's shards" in r.stderr and all(p.exists() for p in shards)
    assert runner.invoke(app, ["verify", r.stdout.strip().splitlines()[-1]]).exit_code == 0


def test_array_tasks_that_see_different_data_are_warned(mini, tmp_path):
    """Two --shard tasks of N slices that planned different caches of one backbone: the second
    names both caches (one array job whose tasks saw different files), and neither exits silently."""
    c = tmp_path / "c"
    other = make_mini(tmp_path / "other", n_covid=3, n_normal=3)  # as if a node saw other files
    r = _ex(mini, c, "--shard", "0/2")
    assert r.exit_code == 0 and "WARNING" not in r.stderr, r.output
    first = _target(mini, c).name
    r = runner.invoke(app, EX + ["--data", str(other["cohen"]), "--data", str(other["normal"]), "--cache-dir", str(c),
                                 "--shard", "1/2"])
    assert r.exit_code == 0, r.output
    second = _target(other, c).name
    assert first != second
    assert (f"WARNING: another cache of inception_v3-none got --shard slices of 2 in the last hours: {first} ("
            in r.stderr)
    assert f"this one is {second}. If they are one array job, its tasks saw different data" in r.stderr
