"""distill.atomic: a write appears complete or not at all, cleans up after itself, is durable (fsync before the
rename), gives files the umask's mode, and a failed write (disk full, read-only, a file in the path) is a WriteError
saying what, where and how much space it needed."""
import errno
import json
import os
import subprocess
import sys

import pytest

from distill.atomic import (TMP_PREFIX, atomic_dir, atomic_file, atomic_write_csv, atomic_write_json,
                            atomic_write_text, commit_dir, current_umask, remove_stale_temps, stale_temps, temp_path,
                            write_error, writing)
from distill.errors import EXIT_CODES, WriteError


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


def test_temporaries_written_on_another_host_are_never_judged_by_a_local_pid(tmp_path):
    """Shared storage (NFS, Lustre): a pid in a temporary's name is checked only on the host that wrote it."""
    import socket

    host_name = socket.gethostname  # plain on this machine (letters, digits, '-')
    final = tmp_path / "cache"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # no such process here; on node-7 it may be a live extraction
    remote = tmp_path / f"{TMP_PREFIX}cache-{dead_pid}-deadbeef@node-7.cluster"
    local = tmp_path / f"{TMP_PREFIX}cache-{dead_pid}-cafecafe@{host_name()}"
    for d in (remote, local):
        d.mkdir()
    assert remove_stale_temps(final) == [local]
    assert remote.exists() and not local.exists()
    assert temp_path(final).name.endswith(f"@{host_name()}")


def test_temp_path_is_a_hidden_sibling(tmp_path):
    p = temp_path(tmp_path / "x.json")
    assert p.parent == tmp_path and p.name.startswith(f"{TMP_PREFIX}x.json-{os.getpid()}-")
    assert temp_path(tmp_path / "x", token="writing").name == f"{TMP_PREFIX}x-writing"


# ----------------------------------------------------------------------------------------------- write failures
def _exit_code(e):
    return next(code for kinds, code in EXIT_CODES if isinstance(e, kinds))


def _disk_full(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_disk_full_is_a_write_error_with_the_space_needed_and_no_temporary(tmp_path, kind):
    target = tmp_path / ("out.bin" if kind == "file" else "out")
    (target.write_bytes(b"old") if kind == "file" else target.mkdir())
    writer = atomic_file(target, what="the weights", needed=3 * 2**20) if kind == "file" else \
        atomic_dir(target, replace=True, what="the weights", needed=3 * 2**20)
    with pytest.raises(WriteError) as info:
        with writer as tmp:
            (tmp if kind == "file" else tmp / "w.bin").write_bytes(b"half")  # a partial write, then the disk is full
            _disk_full()
    e = info.value
    msg = str(e)
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC and _exit_code(e) == 2
    assert "could not write the weights (about 3.0 MiB)" in msg and f"'{target}'" in msg and "disk is full" in msg
    assert "are free there, 3.0 MiB are needed" in msg and "Temporary files were removed" in msg and "Fix:" in msg
    assert _leftovers(tmp_path) == []
    assert (target.read_bytes() == b"old") if kind == "file" else (list(target.iterdir()) == [])


@pytest.mark.parametrize("message,code", [
    ("Error while serializing: I/O error: No space left on device (os error 28)", errno.ENOSPC),  # safetensors
    ("I/O error: Disk quota exceeded (os error 122)", errno.EDQUOT),
    ("I/O error: Read-only file system (os error 30)", errno.EROFS),
    ("I/O error: Permission denied (os error 13)", errno.EACCES),
])
def test_library_write_errors_are_recognised_by_their_message(tmp_path, message, code):
    with pytest.raises(WriteError) as info:
        with atomic_file(tmp_path / "x.safetensors"):
            raise RuntimeError(message)
    assert info.value.errno == code and isinstance(info.value.__cause__, RuntimeError)
    assert _leftovers(tmp_path) == []


def test_torch_writer_failure_is_a_full_disk_when_the_space_is_short(tmp_path):
    e = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    full = write_error(e, "checkpoint-4", tmp_path / "checkpoint-4", needed=2**62)
    assert full.errno == errno.ENOSPC and "disk is full" in str(full) and "torch.save stopped" in str(full)
    other = write_error(e, "checkpoint-4", tmp_path / "checkpoint-4", needed=1)
    assert other.errno is None and "the write failed" in str(other)


def test_errors_that_are_not_failed_writes_pass_unchanged(tmp_path):
    with pytest.raises(KeyError):
        with atomic_file(tmp_path / "a"):
            raise KeyError("x")
    with pytest.raises(PermissionError):  # about a file elsewhere (an input), not the one written
        with atomic_dir(tmp_path / "d"):
            raise PermissionError(errno.EACCES, "Permission denied", "/some/input.png")
    with pytest.raises(FileNotFoundError):
        with writing("x", tmp_path / "x"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "x"))
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_a_path_under_a_file_names_the_file(tmp_path, kind):
    (tmp_path / "notes.txt").write_text("mine")
    target = tmp_path / "notes.txt" / "sub" / "out"
    with pytest.raises(WriteError) as info:
        if kind == "file":
            atomic_write_text(target, "x")
        else:
            with atomic_dir(target):
                pass
    assert f"'{tmp_path / 'notes.txt'}' is a file, not a directory" in str(info.value)
    assert info.value.errno in (errno.ENOTDIR, errno.EEXIST) and _exit_code(info.value) == 2
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_missing_parent_directories_are_created(tmp_path):
    atomic_write_json(tmp_path / "a" / "b" / "c.json", [1])
    with atomic_dir(tmp_path / "x" / "y") as tmp:
        (tmp / "f").write_text("1")
    assert (tmp_path / "a" / "b" / "c.json").is_file() and (tmp_path / "x" / "y" / "f").is_file()


def test_permission_denied_is_a_write_error(tmp_path, monkeypatch):
    """The read-only case where chmod cannot make one (running as root): mkdir refused by the OS."""
    from pathlib import Path

    real = Path.mkdir

    def refuse(self, *a, **k):
        if self.name.startswith(TMP_PREFIX):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(WriteError, match="permission denied.*Fix: choose a directory you can write to") as info:
        with atomic_dir(tmp_path / "out"):
            pass
    assert info.value.errno == errno.EACCES and not (tmp_path / "out").exists()


def test_read_only_directory_is_a_write_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("chmod does not make a directory read-only for this user (root)")
        with pytest.raises(WriteError, match="permission denied") as info:
            atomic_write_json(ro / "result.json", {})
        assert f"'{ro / 'result.json'}'" in str(info.value)
        with pytest.raises(WriteError, match="permission denied"):
            with atomic_dir(ro / "student"):
                pass
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_commit_dir_puts_the_old_directory_back_when_the_rename_fails(tmp_path, monkeypatch):
    import distill.atomic as atomic

    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("keep")
    tmp = temp_path(final, token="writing")
    tmp.mkdir()
    (tmp / "new").write_text("1")
    real = os.replace

    def fail_on_tmp(src, dst):
        if str(src) == str(tmp):
            raise OSError(errno.EROFS, "Read-only file system", str(dst))
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", fail_on_tmp)
    with pytest.raises(WriteError, match="read-only"):
        commit_dir(tmp, final)
    assert (final / "old").read_text() == "keep"


# ----------------------------------------------------------------------------------------------- durability, modes
def test_commit_dir_fsyncs_every_file_and_directory_before_the_rename(tmp_path, monkeypatch):
    import distill.atomic as atomic

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    final = tmp_path / "checkpoint-4"
    with atomic_dir(final) as tmp:
        (tmp / "model.safetensors").write_bytes(b"m")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "optimizer.bin").write_bytes(b"o")
    rename = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(final))
    synced = {e[1] for e in events[:rename] if e[0] == "fsync"}
    assert {str(tmp / "model.safetensors"), str(tmp / "sub" / "optimizer.bin"), str(tmp / "sub"), str(tmp)} <= synced
    assert ("fsync", str(tmp_path)) in events[rename:]  # the rename itself is made durable


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_respect_the_umask(tmp_path, umask):
    """Some writers create 0600 files whatever the umask (safetensors does): the helper gives every file the
    mode the umask allows."""
    import torch
    from safetensors.torch import save_file

    old = os.umask(umask)
    try:
        assert current_umask() == umask
        with atomic_file(tmp_path / "w.safetensors") as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp))
        with atomic_dir(tmp_path / "d") as tmp:
            fd = os.open(tmp / "private.bin", os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
        atomic_write_text(tmp_path / "t.txt", "x")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for p in (tmp_path / "w.safetensors", tmp_path / "d" / "private.bin", tmp_path / "t.txt"):
        assert p.stat().st_mode & 0o777 == want, p
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask
