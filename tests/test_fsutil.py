"""One home for file safety (covfeat.core.fsutil): a file or folder under a final name is
whole and durable, a failed writer leaves nothing, and the leftovers of a killed writer are
swept while a live writer's are kept.  Run folders, the head template and the backbone graph
cache all go through the one atomic folder."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fit
from typer.testing import CliRunner

from covfeat.cli import app
from covfeat.core.fsutil import HOST, OWNER, AtomicDir, atomic_file, remove_stale

runner = CliRunner()


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


@pytest.fixture
def synced(monkeypatch):
    """Every path os.fsync is called on, in order (read from the descriptor when it is called)."""
    calls = []
    real = os.fsync

    def record(fd):
        calls.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return calls


class Boom(Exception):
    pass


def test_an_interrupted_atomic_file_leaves_the_old_file_and_no_temporary(tmp_path):
    f = tmp_path / "audit.json"
    with pytest.raises(Boom), atomic_file(f) as tmp:
        tmp.write_text("half")
        raise Boom
    assert not f.exists() and not temps(tmp_path)
    f.write_text("old")
    with pytest.raises(Boom), atomic_file(f) as tmp:
        tmp.write_text("half")
        raise Boom
    assert f.read_text() == "old" and not temps(tmp_path)


def test_an_atomic_file_is_fsynced_before_its_rename_and_its_folder_after(tmp_path, synced):
    f = tmp_path / "x.json"
    with atomic_file(f) as tmp:
        tmp.write_text("whole")
    assert f.read_text() == "whole" and not temps(tmp_path)
    assert synced == [tmp.resolve(), tmp_path.resolve()]


@pytest.mark.parametrize("taken", ["next", "keep"])
def test_an_interrupted_atomic_folder_leaves_nothing(tmp_path, taken):
    with pytest.raises(Boom), AtomicDir(tmp_path, "run", taken=taken) as d:
        (d.path / "metrics.json").write_text("{}")
        raise Boom
    assert list(tmp_path.iterdir()) == [] and d.final is None


def test_a_taken_name_is_numbered_for_runs_and_kept_for_cache_entries(tmp_path):
    for k in range(3):
        with AtomicDir(tmp_path / "runs", "run") as d:
            (d.path / "n").write_text(str(k))
    assert [(p.name, (p / "n").read_text()) for p in sorted((tmp_path / "runs").iterdir())] == \
        [("run", "0"), ("run-2", "1"), ("run-3", "2")]
    for k in range(2):
        with AtomicDir(tmp_path / "cache", "key", taken="keep") as d:
            (d.path / "n").write_text(str(k))
        assert d.final == tmp_path / "cache" / "key"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["key"]
    assert (tmp_path / "cache" / "key" / "n").read_text() == "0"  # the first entry made stays
    assert not (tmp_path / "cache" / "key" / OWNER).exists()


def test_stale_temporaries_of_dead_writers_are_swept_and_live_ones_kept(tmp_path):
    dead = dead_pid()
    gone = [tmp_path / f".x.h5.{HOST}.{dead}.0123abcd.tmp", tmp_path / f".run.{HOST}.{dead}.89abcdef.tmp",
            tmp_path / f".shard-1.h5.{HOST}.{dead}.tmp"]  # a shard file of an earlier covfeat (no random part)
    gone[0].write_text("half an index")
    gone[1].mkdir()
    gone[2].write_text("half a shard")
    legacy = tmp_path / ".inception_v3-20200101-000000.tmp"  # a run folder of an earlier covfeat: owner file only
    legacy.mkdir()
    (legacy / OWNER).write_text(f"{socket.gethostname()} {dead}")
    kept = [tmp_path / f".y.h5.{HOST}.{os.getpid()}.0123abcd.tmp",  # a live writer (this process)
            tmp_path / f".z.h5.another-host.{dead}.0123abcd.tmp",  # its pid means nothing here
            tmp_path / ".not-covfeat.tmp"]
    for p in kept:
        p.write_text("")
    assert remove_stale(tmp_path) == sorted(gone + [legacy])
    assert temps(tmp_path) == sorted(kept)


def test_clean_sweeps_dead_writers_index_and_shard_temporaries(tmp_path):
    c = tmp_path / "c"
    shards = c / "inception_v3-none-0123456789abcdef.h5.shards"
    shards.mkdir(parents=True)
    (c / "inception_v3-none-0123456789abcdef.h5").write_text("an index, so its shards folder stays")
    dead = dead_pid()
    index_tmp = c / f".inception_v3-none-0123456789abcdef.h5.{HOST}.{dead}.0123abcd.tmp"
    shard_tmp = shards / f".shard-00.h5.{HOST}.{dead}.0123abcd.tmp"
    live = shards / f".shard-01.h5.{HOST}.{os.getpid()}.0123abcd.tmp"
    for p in (index_tmp, shard_tmp, live):
        p.write_text("half")
    r = runner.invoke(app, ["clean", "--cache-dir", str(c), "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    assert not index_tmp.exists() and not shard_tmp.exists() and live.exists() and shards.is_dir()
    assert "2 leftover(s) removed" in r.stdout


def _run_folder(request, tmp_path, monkeypatch):
    from covfeat.head.fit import fit_head

    mini_cache = request.getfixturevalue("mini_cache")
    parent = tmp_path / "runs"
    parent.mkdir()
    return parent, lambda: fit_head(mini_cache, fit(1), parent, name="r", progress=False)


def _head_template(request, tmp_path, monkeypatch):
    from covfeat.head.config import HeadConfig
    from covfeat.head.template import cache_root, head_template

    monkeypatch.setenv("COVFEAT_HEAD_CACHE", str(tmp_path / "heads"))
    parent = cache_root()
    parent.mkdir()
    cfg, shape = HeadConfig(dropout=0.2, seed=3, dense_units=8), (2, 2, 6)
    return parent, lambda: head_template(shape, cfg).folder


def _graph_cache(request, tmp_path, monkeypatch):
    from test_backbones import _tiny_build

    from covfeat.extraction.backbones import Backbone, Scaling, resolve_weights
    from covfeat.extraction.graphfile import backbone_forward, cache_root

    monkeypatch.setenv("COVFEAT_GRAPH_CACHE", str(tmp_path / "graphs"))
    parent = cache_root()
    parent.mkdir()
    bb = Backbone("tiny", _tiny_build, Scaling("tiny", 255.0), (7, 7, 8), 0.3)

    def write():
        assert backbone_forward(bb, resolve_weights(bb, "none"), seed=0).source == "keras"
        (made,) = (p for p in parent.iterdir() if not p.name.startswith("."))
        return made

    return parent, write


@pytest.mark.parametrize("writer", [_run_folder, _head_template, _graph_cache], ids=["run", "template", "graph"])
def test_runs_templates_and_graphs_are_atomic_folders(writer, request, tmp_path, monkeypatch, synced):
    """Each writes through the one atomic folder: a dead writer's leftover beside it is swept,
    a live one's kept, and every file of the new folder is fsynced (under its temporary name),
    then the folder, then, after the rename, the parent."""
    parent, write = writer(request, tmp_path, monkeypatch)
    stale = parent / f".old.{HOST}.{dead_pid()}.0123abcd.tmp"
    live = parent / f".busy.{HOST}.{os.getpid()}.0123abcd.tmp"
    stale.mkdir()
    live.mkdir()
    synced.clear()
    final = Path(write()).resolve()
    parent = parent.resolve()
    assert final.parent == parent and not stale.exists() and live.exists() and not (final / OWNER).exists()
    (tmp,) = {p.parent for p in synced if p.parent.parent == parent and p.parent.name.startswith(f".{final.name}.")}
    assert {p.name for p in synced if p.parent == tmp} == {p.name for p in final.iterdir()}
    assert synced.index(tmp) > max(synced.index(tmp / p.name) for p in final.iterdir())
    assert parent in synced[synced.index(tmp):]
