"""distill.teacher.hub: a hub teacher on a machine that cannot reach the hub fails at once (one short request, not
79 s of retries) with one message naming the endpoint and the fix (a local directory, or HF_HUB_OFFLINE=1 when the
hub cache has the repo); offline mode without a cached copy says so too. The hub is made unreachable by pointing
huggingface_hub's endpoint at a closed local port (http://127.0.0.1:9)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from distill.teacher import load_teacher
from distill.teacher.hub import check_hub_reachable, in_hub_cache, is_hub_id

CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", CLOSED)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def _cache_repo(cache, repo):
    """A repo in the hub cache layout (models--owner--name/snapshots/<commit>, refs/main) with a model_index.json."""
    snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0" * 40)


def test_is_hub_id():
    assert is_hub_id("google/ddpm-cifar10-32")
    for not_hub in ("fashion-mnist-ddpm", "./runs/teacher", "/abs/dir", "python:pkg.mod:make", "a/b/c", "owner/",
                    {"sample_size": 8}):
        assert not is_hub_id(not_hub), not_hub


def test_unreachable_hub_fails_fast_with_the_fix(unreachable_hub):
    t0 = time.monotonic()
    with pytest.raises(ValueError) as e:
        load_teacher("google/ddpm-cifar10-32", ["mid_block"], [11])
    assert time.monotonic() - t0 < 30  # one refused connection, not retries per file (79 s before)
    msg = str(e.value)
    assert msg.startswith(f"teacher 'google/ddpm-cifar10-32' is a hub id: the hub ({CLOSED}) cannot be reached")
    assert "set teacher: DIR" in msg and "HF_HUB_OFFLINE=1" in msg and "\n" not in msg


def test_unreachable_hub_with_a_cached_copy_says_to_go_offline(unreachable_hub):
    _cache_repo(unreachable_hub, "owner/cached")
    assert in_hub_cache("owner/cached") and not in_hub_cache("owner/other")
    with pytest.raises(ValueError, match=r"it is in the hub cache .*: set HF_HUB_OFFLINE=1 to load it from there"):
        check_hub_reachable("owner/cached", timeout=2)


def test_offline_mode_without_a_cached_copy(unreachable_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"HF_HUB_OFFLINE is set and the hub cache .* has no copy of it. Fix: "
                                         r"download it.*'owner/not-downloaded' was meant as a local folder, it does "
                                         r"not exist here"):
        load_teacher("owner/not-downloaded", ["mid_block"], [11])
    _cache_repo(unreachable_hub, "owner/cached")
    check_hub_reachable("owner/cached")  # offline with a copy: nothing to check, diffusers reads the cache


def test_a_missing_local_folder_read_as_a_hub_id_says_so_first(unreachable_hub, tmp_path, monkeypatch):
    """``teacher: runs/teacher`` with ``runs/`` present but no ``teacher`` in it is most likely a wrong local path:
    the message opens with that (and how to train one), then the hub error; a real hub id keeps the hub error first."""
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as e:
        check_hub_reachable("runs/teacher", timeout=2)
    msg = str(e.value)
    assert msg.startswith("teacher 'runs/teacher' is not a folder here: 'runs/' exists but holds no 'teacher'")
    assert "tools/train_teacher.py --dataset DATASET --data-root DIR --out runs/teacher" in msg
    assert "). As a hub id it cannot be loaded either: the hub (" in msg
    assert msg.count("train_teacher.py") == 1 and "was meant as a local folder" not in msg  # said once, first
    with pytest.raises(ValueError) as e:
        check_hub_reachable("owner/model", timeout=2)  # no owner/ folder here: the hub error alone
    assert str(e.value).startswith("teacher 'owner/model' is a hub id: the hub")
    assert "was meant as a local folder, it does not exist here" in str(e.value)


def test_cli_exits_2_without_a_traceback(tmp_path):
    env = dict(os.environ, HF_ENDPOINT=CLOSED, HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    env.pop("HF_HUB_OFFLINE", None)
    r = subprocess.run([sys.executable, "-m", "distill.cli", "probe", "teacher:google/ddpm-cifar10-32", "--blocks",
                        "mid_block"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "cannot be reached" in r.stderr and "config.json" not in r.stderr
