"""distill.atomic: a write appears complete or not at all, and cleans up after itself."""
import json
import os
import subprocess
import sys

import pytest

from distill.atomic import (TMP_PREFIX, atomic_dir, atomic_file, atomic_write_csv, atomic_write_json,
                            atomic_write_text, commit_dir, remove_stale_temps, stale_temps, temp_path)


def _leftovers(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith(TMP_PREFIX))


def test_text_json_csv_round_trip(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "héllo\n")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic_write_json(tmp_path / "a.json", {"x": [1, 2.5, None]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2.5, None]}
    atomic_write_csv(tmp_path / "a.csv", ["step", "loss"], [[1, 0.5], [2, "x,y"]])
    assert (tmp_path / "a.csv").read_text().splitlines() == ["step,loss", "1,0.5", "2,\"x,y\""]
    assert _leftovers(tmp_path) == []


def test_failed_file_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_json(target, {"not serialisable": object()})
    assert target.read_text() == "old"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and _leftovers(tmp_path) == []


def test_atomic_dir_is_complete_or_absent(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "a").write_text("1")
            raise RuntimeError("interrupted")
    assert not final.exists() and _leftovers(tmp_path) == []
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
        assert not final.exists()  # nothing visible before the end
    assert (final / "a").read_text() == "1"


def test_atomic_dir_replaces_only_when_allowed(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("x")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        with atomic_dir(final) as tmp:
            pass
    assert (final / "old").exists() and _leftovers(tmp_path) == []
    with atomic_dir(final, replace=True) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in final.iterdir()) == ["new"] and _leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty) as tmp:  # an empty directory is no data: replaced without asking
        (tmp / "z").write_text("z")
    assert (empty / "z").exists()


def test_commit_dir_replaces_a_file_too(tmp_path):
    final = tmp_path / "out"
    final.write_text("a file")
    tmp = temp_path(final, token="writing")
    tmp.mkdir()
    (tmp / "m").write_text("1")
    commit_dir(tmp, final)
    assert (final / "m").read_text() == "1" and _leftovers(tmp_path) == []


def test_stale_temporaries_of_dead_writers_only_are_removed(tmp_path):
    final = tmp_path / "cache"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stale = tmp_path / f"{TMP_PREFIX}cache-{dead_pid}-deadbeef"
        busy = tmp_path / f"{TMP_PREFIX}cache-{live.pid}-cafecafe"
        other = tmp_path / f"{TMP_PREFIX}cache2-{dead_pid}-deadbeef"  # another target's temporary
        for d in (stale, busy, other):
            d.mkdir()
        assert set(stale_temps(final)) == {stale, busy}
        assert remove_stale_temps(final) == [stale]
        assert not stale.exists() and busy.exists() and other.exists()
    finally:
        live.kill()
        live.wait()


def test_temp_path_is_a_hidden_sibling(tmp_path):
    p = temp_path(tmp_path / "x.json")
    assert p.parent == tmp_path and p.name.startswith(f"{TMP_PREFIX}x.json-{os.getpid()}-")
    assert temp_path(tmp_path / "x", token="writing").name == f"{TMP_PREFIX}x-writing"
