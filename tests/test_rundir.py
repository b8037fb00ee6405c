"""Run directories (distill.rundir): an existing run is refused unless resumed or overwritten; --overwrite deletes
only a run's own files; one training process per directory (RUN/.lock); a resume must be the run its directory
describes (the resume contract)."""
import shutil
import subprocess
import sys

import pytest
import yaml

from distill.cli import main
from distill.errors import RunLockedError
from distill.runlock import RunLock
from distill.trainer import RunExistsError, latest_checkpoint, list_checkpoints, train

from .conftest import fmnist_recipe, rgb_recipe


def _yaml(tmp_path, recipe):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    return str(path)


def test_existing_run_is_refused(trained_run, fmnist_dir):
    run, _ = trained_run
    with pytest.raises(RunExistsError, match=r"pass resume=True .* overwrite=True .* output_dir\."):
        train(fmnist_recipe(fmnist_dir), str(run), progress=False)


# ----------------------------------------------------------------------------------------------- overwrite
def test_overwrite_refuses_a_directory_that_is_not_a_distill_run(rgb_folder, tmp_path):
    """A project folder with a config.yaml of its own (and src/) is not a run: --overwrite deletes nothing."""
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "main.py").write_text("print('mine')\n")
    (proj / "config.yaml").write_text("learning_rate: 3\n")
    with pytest.raises(RunExistsError, match="not provably a distill run.*src") as e:
        train(rgb_recipe(rgb_folder, steps=2), str(proj), overwrite=True, progress=False)
    assert "Nothing was deleted" in str(e.value)
    assert (proj / "src" / "main.py").read_text() == "print('mine')\n" and (proj / "config.yaml").exists()
    only_cfg = tmp_path / "only_cfg"
    only_cfg.mkdir()
    (only_cfg / "config.yaml").write_text("learning_rate: 3\n")
    with pytest.raises(RunExistsError, match="config.yaml is not a distill recipe"):
        train(rgb_recipe(rgb_folder, steps=2), str(only_cfg), overwrite=True, progress=False)
    assert (only_cfg / "config.yaml").read_text() == "learning_rate: 3\n"


def test_overwrite_and_resume_refuse_checkpoints_without_a_distill_config(rgb_folder, tmp_path):
    """A Hugging Face Trainer output (checkpoint-500/ with its own files, no config.yaml) is not a distill run."""
    hf = tmp_path / "hf"
    (hf / "checkpoint-500").mkdir(parents=True)
    (hf / "checkpoint-500" / "trainer_state.json").write_text("{}")
    with pytest.raises(RunExistsError, match="not provably a distill run"):
        train(rgb_recipe(rgb_folder, steps=2), str(hf), overwrite=True, progress=False)
    with pytest.raises(RunExistsError, match="no config.yaml"):
        train(rgb_recipe(rgb_folder, steps=2), str(hf), resume=True, progress=False)
    assert (hf / "checkpoint-500" / "trainer_state.json").exists()
    assert sorted(p.name for p in hf.iterdir()) == ["checkpoint-500"]  # no .lock left behind either


def test_a_non_empty_folder_that_is_not_a_run_is_refused(rgb_folder, tmp_path):
    misc = tmp_path / "misc"
    misc.mkdir()
    (misc / "notes.txt").write_text("mine")
    with pytest.raises(RunExistsError, match="not empty and holds no distill run.*notes.txt"):
        train(rgb_recipe(rgb_folder, steps=2), str(misc), progress=False)
    assert sorted(p.name for p in misc.iterdir()) == ["notes.txt"]
    with pytest.raises(ValueError, match=r"allow_changes=True applies to a resume only .* add resume=True"):
        train(rgb_recipe(rgb_folder, steps=2), str(tmp_path / "new"), allow_changes=True, progress=False)
    assert not (tmp_path / "new").exists()
    # resume: nothing to continue there; it trained from step 0 into the folder, beside notes.txt
    with pytest.raises(RunExistsError, match=r"resume=True: output directory .* holds no distill run to continue "
                                             r"\(notes.txt\); a run started there would mix"):
        train(rgb_recipe(rgb_folder, steps=2), str(misc), resume=True, progress=False)
    assert sorted(p.name for p in misc.iterdir()) == ["notes.txt"]


def test_overwrite_replaces_a_run_by_its_own_files(rgb_folder, tmp_path):
    run = tmp_path / "run"
    train(rgb_recipe(rgb_folder, steps=2), str(run), progress=False)
    (run / "checkpoint-2" / "extra.txt").write_text("someone's file inside a checkpoint")
    with pytest.raises(RunExistsError, match="checkpoint-2/extra.txt"):
        train(rgb_recipe(rgb_folder, steps=4), str(run), overwrite=True, progress=False)
    (run / "checkpoint-2" / "extra.txt").unlink()
    train(rgb_recipe(rgb_folder, steps=4), str(run), overwrite=True, progress=False)
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    assert yaml.safe_load((run / "config.yaml").read_text())["steps"] == 4
    nested = run / "another_run"  # a directory holding another run is never deleted
    shutil.copytree(run, nested, ignore=shutil.ignore_patterns("another_run"))
    with pytest.raises(RunExistsError, match="another_run"):
        train(rgb_recipe(rgb_folder, steps=2), str(run), overwrite=True, progress=False)
    assert (nested / "config.yaml").exists() and (run / "checkpoint-4").exists()


# ----------------------------------------------------------------------------------------------- lock
def test_a_second_process_in_a_run_directory_is_refused(rgb_folder, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from distill.runlock import RunLock\n"
        f"with RunLock({str(run)!r}):\n    print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for kw in ({}, {"resume": True}, {"overwrite": True}):
            with pytest.raises(RunLockedError, match=f"in use by pid {holder.pid} "):
                train(rgb_recipe(rgb_folder, steps=2), str(run), progress=False, **kw)
        assert main(["train", _yaml(tmp_path, rgb_recipe(rgb_folder, steps=2)), "-o", str(run)]) == 2
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead: its lock is stale and the kernel released it
    assert "pid" in (run / ".lock").read_text()
    train(rgb_recipe(rgb_folder, steps=2), str(run), progress=False)
    assert latest_checkpoint(run).name == "checkpoint-2"


def test_lock_of_a_run_that_wrote_nothing_leaves_no_directory(tmp_path):
    with RunLock(tmp_path / "new"):
        assert (tmp_path / "new" / ".lock").exists()
    assert not (tmp_path / "new").exists()


def test_a_run_that_wrote_nothing_leaves_none_of_the_parent_folders_it_made(tmp_path):
    """-o a/b/run on a refused run (bad data root, ...) left an empty a/b behind: the lock made them, and now removes
    them again, deepest first, each only while empty; a parent that existed before, or that another process wrote
    into meanwhile, is kept."""
    with RunLock(tmp_path / "a" / "b" / "run"):
        assert (tmp_path / "a" / "b" / "run" / ".lock").exists()
    assert list(tmp_path.iterdir()) == []
    with RunLock(tmp_path / "x" / "y" / "run"):
        (tmp_path / "x" / "someone-else.txt").write_text("theirs")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["someone-else.txt"]


# ----------------------------------------------------------------------------------------------- resume contract
@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, rgb_folder):
    """A 4-step run (checkpoints at 2 and 4) to resume from; copied by each test."""
    run = tmp_path_factory.mktemp("resume") / "run"
    train(rgb_recipe(rgb_folder, steps=4), str(run), progress=False)
    return run


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("change, listed", [
    ({"lr": 0.5}, "lr: 0.001 -> 0.5"),
    ({"batch_size": 12}, "batch_size: 6 -> 12"),
    ({"at_weight": 1.0, "mse_weight": 3.0}, "mse_weight: 1.0 -> 3.0; at_weight: 10.0 -> 1.0"),
    ({"timesteps": [50]}, "timesteps: [11] -> [50]"),
    ({"student": "resnet10t"}, "student: 'resnet18' -> 'resnet10t'"),
])
def test_resume_with_another_recipe_is_refused_and_writes_nothing(four_steps, tmp_path, rgb_folder, change, listed):
    run = _copy(four_steps, tmp_path)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="differ from the run's config.yaml") as e:
        train(rgb_recipe(rgb_folder, steps=6, **change), str(run), resume=True, progress=False)
    assert listed in str(e.value) and "allow_changes=True" in str(e.value) and "--" not in str(e.value)
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == {k: v for k, v in before.items() if k.name != ".lock"}


def test_resume_after_the_data_changed_is_refused(tmp_path, rgb_folder):
    data = tmp_path / "data"
    shutil.copytree(rgb_folder, data)
    run = tmp_path / "run"
    train(rgb_recipe(data, steps=2, mean=[0.5] * 3, std=[0.25] * 3), str(run), progress=False)
    img = sorted((data / "train" / "cat").iterdir())[0]
    img.write_bytes((data / "train" / "dog" / "0000.jpg").read_bytes())  # one image replaced by another
    with pytest.raises(ValueError, match="_resolved.data_sha256"):
        train(rgb_recipe(data, steps=4, mean=[0.5] * 3, std=[0.25] * 3), str(run), resume=True, progress=False)


def test_resume_may_extend_steps_and_changes_are_recorded(four_steps, tmp_path, rgb_folder, caplog):
    run = _copy(four_steps, tmp_path)
    with caplog.at_level("WARNING", logger="distill.rundir"):
        train(rgb_recipe(rgb_folder, steps=6), str(run), resume=True, progress=False)
    # a changed length is allowed but said: the schedule is stretched from the checkpoint on
    assert "resume=True: steps 4 -> 6" in caplog.text and "--set steps=4" in caplog.text
    changes = yaml.safe_load((run / "config.yaml").read_text())["_resolved"]["changes"]
    assert changes == [{"step": 4, "key": "steps", "old": 4, "new": 6}]
    with pytest.raises(ValueError, match="steps=6 but the run's newest checkpoint is at step 6"):
        train(rgb_recipe(rgb_folder, steps=6), str(run), resume=True, progress=False)
    train(rgb_recipe(rgb_folder, steps=8, lr=5e-4), str(run), resume=True, progress=False, allow_changes=True)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["lr"] == 5e-4 and cfg["_resolved"]["changes"] == changes + [
        {"step": 6, "key": "steps", "old": 6, "new": 8}, {"step": 6, "key": "lr", "old": 0.001, "new": 0.0005}]
    assert [s for s, _ in list_checkpoints(run)][-1] == 8


def test_a_run_lock_that_cannot_be_created_is_a_write_error(tmp_path, capsys):
    """RUN/.lock under a path that is a file (as a read-only or full directory would): WriteError naming .lock and
    the cause, and `distill train` exits 2 with one line (it was a raw OSError)."""
    from distill.cli import main
    from distill.errors import WriteError
    from distill.runlock import RunLock

    (tmp_path / "file").write_text("x")
    with pytest.raises(WriteError, match=r"could not write the run lock \.lock to '.*file/run/\.lock': '.*file' is a "
                                         r"file, not a directory"):
        with RunLock(tmp_path / "file" / "run"):
            pass
    assert main(["train", "quickstart", "-o", str(tmp_path / "file" / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "could not write the run lock .lock" in err and "Traceback" not in err


@pytest.mark.parametrize("code", ["ENOLCK", "ENOSYS", "EOPNOTSUPP"])
def test_a_file_system_without_locks_is_one_error_not_an_unlocked_run(tmp_path, monkeypatch, capsys, code):
    """Shared storage without flock (Lustre mounted noflock, some FUSE file systems): flock fails with ENOLCK /
    ENOSYS / EOPNOTSUPP. One WriteError naming the directory and the fix, exit 2, nothing left behind (it was a raw
    OSError traceback)."""
    import errno
    import fcntl
    import os

    from distill.cli import main
    from distill.errors import WriteError

    def no_locks(fd, op):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(WriteError, match=r"cannot lock run directory '.*run': the file system refuses file locks"):
        with RunLock(tmp_path / "run"):
            pass
    assert not (tmp_path / "run").exists()
    assert main(["train", "quickstart", "-o", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Lustre mounted with -o flock" in err and "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, where", [("steps: 40\nlr: [0.1\n", "line 3, column 1"),
                                          ("- a list\n", "is not a mapping of recipe keys"),
                                          (b"steps: 4\xff\n", "is not UTF-8 text (invalid start byte at byte offset 8)")])
def test_a_broken_config_yaml_is_named_by_export_and_resume(trained_run, fmnist_dir, tmp_path, capsys, text, where):
    """A run's config.yaml edited into invalid YAML (or not UTF-8, or not a mapping): `export` and `train --resume`
    exit 2 naming the file and the line and column (they crashed with a yaml traceback)."""
    from distill.errors import UnreadableFileError
    from distill.rundir import read_config

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    (run / "config.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UnreadableFileError, match=f"run config '{run / 'config.yaml'}'"):
        read_config(run)
    assert main(["export", str(run), "-o", str(tmp_path / "student")]) == 2
    err = capsys.readouterr().err
    assert f"run config '{run / 'config.yaml'}'" in err and where in err and "Traceback" not in err
    assert main(["train", _yaml(tmp_path, fmnist_recipe(fmnist_dir)), "-o", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"run config '{run / 'config.yaml'}'" in err and where in err
    assert not (tmp_path / "student").exists()
