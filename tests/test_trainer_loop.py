"""The training loop (distill.trainer.loop) on real Fashion-MNIST images with a tiny teacher: the loss goes down,
the same seed gives the same curve, a non-finite loss stops the run or skips the batch, gradient accumulation makes
exact updates, per-process seeds, SIGTERM/SIGINT end a run with a checkpoint."""
import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill.config import make_recipe
from distill.trainer import NonFiniteLossError, latest_checkpoint, list_checkpoints, train

from .conftest import fmnist_recipe, rgb_recipe


def _losses(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [(int(r["step"]), float(r["total"])) for r in csv.DictReader(f)]


def test_loss_goes_down_and_checkpoints_appear(trained_run):
    run, summary = trained_run
    losses = _losses(run)
    assert [s for s, _ in losses][-1] == 40
    first, last = losses[0][1], sum(v for _, v in losses[-3:]) / 3
    assert last < 0.8 * first, losses
    assert [s for s, _ in list_checkpoints(run)] == [20, 40]
    assert (latest_checkpoint(run) / "model.safetensors").is_file()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["steps"] == 40 and cfg["_resolved"]["teacher_features"][0]["block"] == "up_blocks.0"
    assert summary["final_losses"]["total"] == pytest.approx(losses[-1][1], rel=1e-4)


def test_same_seed_same_loss_curve(fmnist_dir, tmp_path):
    r = fmnist_recipe(fmnist_dir, steps=6, checkpoint_every=6, log_every=1)
    train(r, str(tmp_path / "a"), progress=False)
    train(r, str(tmp_path / "b"), progress=False)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    train(make_recipe({**r.to_dict(), "seed": 1}), str(tmp_path / "c"), progress=False)
    assert _losses(tmp_path / "c") != _losses(tmp_path / "a")


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(rgb_folder, tmp_path, nan_at_call):
    nan_at_call(5)
    with pytest.raises(NonFiniteLossError) as e:
        train(rgb_recipe(rgb_folder), str(tmp_path / "run"), progress=False)
    msg = str(e.value)
    assert "step 5" in msg and "at" in msg and "total" in msg and "checkpoint-4" in msg
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-4"
    weights = load_file(str(tmp_path / "run" / "checkpoint-4" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_nonfinite_batches_can_be_skipped(rgb_folder, tmp_path, nan_at_call):
    nan_at_call(3)
    summary = train(rgb_recipe(rgb_folder, on_nonfinite="skip"), str(tmp_path / "run"), progress=False)
    assert summary["skipped_steps"] == 1
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[-1] == "skipped" and rows[-1].split(",")[-1] == "1"
    weights = load_file(str(latest_checkpoint(tmp_path / "run") / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


# ----------------------------------------------------------------------------------------------- accumulation
def test_grad_accum_each_step_is_one_update_of_exactly_n_micro_batches(rgb_folder, tmp_path, monkeypatch):
    """36 images, batch 6: 6 micro-batches per epoch; grad_accum_steps 4 does not divide it, so 5 steps cross three
    epoch ends. Each step must be one optimizer update of exactly 4 micro-batches (Accelerate's default would also
    sync at every epoch end: 6 updates, some of 2 micro-batches, and steps without an update)."""
    import distill.trainer.loop as loop

    calls, real = [], loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: calls.append(a[3].sync_gradients) or real(*a, **k))
    run = tmp_path / "run"
    train(rgb_recipe(rgb_folder, grad_accum_steps=4, steps=5, checkpoint_every=5, warmup_steps=0),
          str(run), progress=False)
    assert calls == [False, False, False, True] * 5  # a sync (an update) on every 4th micro-batch, and only there
    opt = torch.load(run / "checkpoint-5" / "optimizer.bin", weights_only=True)
    assert {int(s["step"]) for s in opt["state"].values()} == {5}  # AdamW made exactly 5 updates
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["grad_norm"] != "" for r in rows] == [True] * 5


def _count_host_conversions(monkeypatch) -> list:
    """Count every tensor -> host conversion that distill's own code makes inside ``optimizer_step`` (the step
    path): the returned list gets one name (``'tolist'``, ``'item'``, ...) per conversion. Conversions of CPU
    tensors by libraries (AdamW's step counts, the DataLoader's indices) and by the datasets (``distill.data``, in
    the loader) are not device syncs and are not counted."""
    import sys

    import distill
    import distill.data
    import distill.trainer.loop as loop

    ours, data = os.path.dirname(distill.__file__), os.path.dirname(distill.data.__file__)
    counting, syncs = [False], []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"):
        def wrapped(self, *a, _real=getattr(torch.Tensor, name), _name=name, **k):
            where = sys._getframe(1).f_code.co_filename
            if counting[0] and where.startswith(ours) and not where.startswith(data):
                syncs.append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, wrapped)
    real_step = loop.optimizer_step

    def counted(*a, **k):
        counting[0] = True
        try:
            return real_step(*a, **k)
        finally:
            counting[0] = False

    monkeypatch.setattr(loop, "optimizer_step", counted)
    return syncs


@pytest.mark.parametrize("timesteps", [[11], "policy"])
def test_one_host_sync_per_update_not_per_micro_batch(rgb_folder, tmp_path, monkeypatch, timesteps):
    """distill's step path waits for the device once per optimizer update (the non-finite check), not once or twice
    per micro-batch as it did (`_count_host_conversions`), 4 micro-batches per update, 3 updates (log steps'
    reduce is in ``log_step``, outside). With a timestep policy the teacher read each micro-batch's sampled
    timesteps to the host to check them (``tolist()``): now checked on the device."""
    syncs = _count_host_conversions(monkeypatch)
    train(rgb_recipe(rgb_folder, grad_accum_steps=4, steps=3, checkpoint_every=3, log_every=100, warmup_steps=0,
                     timesteps=timesteps, timestep_candidates=[1, 11, 50]), str(tmp_path / "run"), progress=False)
    assert syncs == ["tolist"] * 3


def test_a_nonfinite_micro_batch_skips_its_whole_update(rgb_folder, tmp_path, nan_at_call):
    """A NaN in the 2nd of 4 micro-batches (checked once, at the update): the update is skipped, named, counted."""
    nan_at_call(6)  # step 2, micro-batch 2
    run = tmp_path / "run"
    summary = train(rgb_recipe(rgb_folder, grad_accum_steps=4, steps=3, checkpoint_every=1, warmup_steps=0,
                               on_nonfinite="skip"), str(run), progress=False)
    assert summary["skipped_steps"] == 1
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["step"] for r in rows] == ["1", "3"] and rows[-1]["skipped"] == "1"
    opt = torch.load(run / "checkpoint-3" / "optimizer.bin", weights_only=True)
    assert {int(s["step"]) for s in opt["state"].values()} == {2}  # 2 updates applied of 3 steps
    a = load_file(str(run / "checkpoint-1" / "model.safetensors"))
    b = load_file(str(run / "checkpoint-2" / "model.safetensors"))
    weights = [k for k in a if "running_" not in k and "num_batches" not in k]  # batch-norm statistics move in
    assert len(weights) > 10 and all(torch.equal(a[k], b[k]) for k in weights)  # the forward; no weight did


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_a_stream_resumed_after_an_epoch_boundary_sees_the_same_batches_with_persistent_workers(rgb_folder):
    """``epoch_batches`` with 2 persistent workers (kept across epochs): started at step 0 and read for 3 epochs, and
    started at step 8 (epoch 1, batch 2: a resume after the first epoch boundary), the batches from there on are
    equal. Shared with the sampler, the workers' seed draw (once for a persistent iterator, at every epoch for a fresh
    one) shifted every later epoch's permutation."""
    from accelerate import Accelerator

    from distill.build import build_train_data
    from distill.trainer.batches import epoch_batches

    r = rgb_recipe(rgb_folder, num_workers=2)  # 36 images, batch 6: 6 batches per epoch
    ds = build_train_data(r)[0]
    acc = Accelerator(cpu=True)
    full = epoch_batches(ds, r, acc, 0)
    first = [next(full) for _ in range(18)]
    loader = full.gi_frame.f_locals["loader"]
    assert loader.base_dataloader.persistent_workers and loader.base_dataloader.num_workers == 2
    resumed = epoch_batches(ds, r, acc, 8)
    for a, b in zip(first[8:], [next(resumed) for _ in range(10)]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first[:6], first[6:12]))  # epochs are reshuffled


@pytest.mark.parametrize("workers", [0, 2])
def test_grad_accum_resume_across_an_epoch_boundary_equals_uninterrupted(rgb_folder, tmp_path, workers):
    r = rgb_recipe(rgb_folder, grad_accum_steps=4, steps=4, checkpoint_every=1, warmup_steps=0, augment="crop-flip",
                   num_workers=workers)
    train(r, str(tmp_path / "full"), progress=False)
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for s in (2, 3, 4):  # resume from step 1 (4 of 6 micro-batches of epoch 1 used)
        shutil.rmtree(tmp_path / "cut" / f"checkpoint-{s}")
    train(r, str(tmp_path / "cut"), resume=True, progress=False)
    a = load_file(str(tmp_path / "full" / "checkpoint-4" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoint-4" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_process_seed_is_the_seed_on_the_main_process_and_distinct_elsewhere():
    from distill.trainer.loop import process_seed

    assert process_seed(7, 0) == 7
    seeds = {process_seed(7, i) for i in range(64)}
    assert len(seeds) == 64 and all(0 <= s < 2**32 for s in seeds)
    assert process_seed(2**32 - 1, 3) < 2**32


# ----------------------------------------------------------------------------------------------- signals
def _signal_run(tmp_path, recipe_path, out, sig, times=1):
    """Start `distill train` in a subprocess, send ``sig`` once step 3 is logged (``times`` times, 0.2 s apart);
    returns (return code, stderr)."""
    p = subprocess.Popen([sys.executable, "-m", "distill.cli", "train", recipe_path, "-o", str(out), "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        rows = (out / "metrics.csv").read_text().splitlines() if (out / "metrics.csv").exists() else []
        if len(rows) > 3:
            for _ in range(times):
                p.send_signal(sig)
                time.sleep(0.2)
            break
        time.sleep(0.05)
    _, err = p.communicate(timeout=300)
    return p.returncode, err


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_says_how_to_continue(rgb_folder, tmp_path, sig, code):
    recipe = rgb_recipe(rgb_folder, steps=60, checkpoint_every=50, log_every=1, warmup_steps=2)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    rc, err = _signal_run(tmp_path, str(path), tmp_path / "run", sig)
    assert rc == code, err[-2000:]
    assert "Traceback" not in err and "--resume" in err
    # the exact command to continue, with this run's recipe file and directory (not a generic RECIPE placeholder)
    assert f"to continue: distill train {path} -o {tmp_path / 'run'} --resume" in err, err[-2000:]
    assert "RECIPE" not in err and err.count("--resume") == 2  # the stop line says --resume, the next the command
    last = int((tmp_path / "run" / "metrics.csv").read_text().splitlines()[-1].split(",")[0])
    assert 3 <= last < 60 and latest_checkpoint(tmp_path / "run").name == f"checkpoint-{last}"
    if sig == signal.SIGTERM:  # resuming the interrupted run gives the uninterrupted run's weights
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the 1-thread subprocess: bitwise equality needs the same thread count
        try:
            train(recipe, str(tmp_path / "run"), resume=True, progress=False)
            train(recipe, str(tmp_path / "full"), progress=False)
        finally:
            torch.set_num_threads(threads)
        a = load_file(str(tmp_path / "full" / "checkpoint-60" / "model.safetensors"))
        b = load_file(str(tmp_path / "run" / "checkpoint-60" / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_aborts_at_once_without_a_traceback(rgb_folder, tmp_path):
    recipe = rgb_recipe(rgb_folder, steps=400, checkpoint_every=400, log_every=1)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    rc, err = _signal_run(tmp_path, str(path), tmp_path / "run", signal.SIGINT, times=2)
    assert rc == 130 and "Traceback" not in err, err[-2000:]


@pytest.mark.parametrize("seconds, due, signal_at, checks, stop", [
    # fast steps: after the first two checks (the second measures the step time) one every 10 steps
    ((0.01, 0.02), (), 14, [1, 2, 12, 22], 22),
    ((0.01, 0.02), (15,), 14, [1, 2, 12, 15], 15),  # a due step (a checkpoint) is always checked
    ((0.01, 0.4), (), 5, [1, 2, 4, 6], 6),  # 0.4 s per step on the slower process: every 2 steps (about 1 s)
    ((1.5, 0.01), (), 3, [1, 2, 3], 3),  # steps over 1 s: every step
])
def test_several_processes_agree_on_a_stop_without_a_collective_every_step(monkeypatch, seconds, due, signal_at,
                                                                           checks, stop):
    """With several processes StopOnSignal.requested all-reduced its flag after every step (a collective and a host
    sync per step). Two processes (threads whose ``reduce`` is a real rendezvous: a step reduced by one process
    only would time out) with their own step times: the all-reduce runs at the same few steps on both, about once a
    second of the slower one's training and at least every 10 steps, plus the due steps; the signal, received by
    process 1 only, stops both after the same step."""
    import threading

    from distill import signals
    from distill.signals import StopOnSignal

    clock = threading.local()
    monkeypatch.setattr(signals, "_now", lambda: clock.t)
    barrier, slots = threading.Barrier(2, timeout=20), [None, None]
    reduced, stopped, errors = {0: [], 1: []}, {}, []

    class FakeAccelerator:
        num_processes, device = 2, torch.device("cpu")

        def __init__(self, rank):
            self.rank = rank

        def reduce(self, t, op):
            assert op == "max"
            reduced[self.rank].append(step_of[self.rank])
            slots[self.rank] = t.clone()
            barrier.wait()
            out = torch.maximum(slots[0], slots[1])
            barrier.wait()
            return out

    step_of = {}

    def process(rank):
        try:
            stop, acc = StopOnSignal(), FakeAccelerator(rank)
            for step in range(1, 40):
                step_of[rank], clock.t = step, step * seconds[rank]
                if rank == 1 and step == signal_at:
                    stop.signum = signal.SIGTERM  # what the handler records (it also prints)
                if stop.requested(acc, step, due=step in due):
                    stopped[rank] = (step, stop.signum)
                    return
        except Exception as e:  # noqa: BLE001 (re-raised in the test's thread)
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=process, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert reduced == {0: checks, 1: checks}
    assert stopped == {0: (stop, signal.SIGTERM), 1: (stop, signal.SIGTERM)}


def test_the_signal_message_says_how_late_several_processes_stop():
    """One process stops after this step; several after the step where they next agree, which may be up to 9
    steps later (the message said 'finishing this step' there too)."""
    from distill.signals import StopOnSignal

    one, two = StopOnSignal(), StopOnSignal(every=10, seconds=1.0, processes=2)
    assert one.when() == "finishing this step"
    assert two.when() == ("finishing the steps until all 2 processes agree to stop (about 1 s of training, at most "
                          "9 more steps)")


# ----------------------------------------------------------------------------------------------- knobs
def _final(run):
    return load_file(str(run / "checkpoint-2" / "model.safetensors"))


def test_channels_last_and_compile_train_the_same_model(rgb_folder, tmp_path, monkeypatch):
    """channels_last and compile change how the student runs, not what it learns: 2 steps of a tiny student give
    the eager run's losses and weights (float tolerance) under the same state-dict keys, and torch.compile was
    called with the recipe's backend. The suite uses the aot_eager backend (dynamo graph capture + AOT autograd,
    no code generation): inductor compiled this student for 225 s on the project's loaded 2-core CPU
    (``compile: true``, measured once), too slow for a unit test."""
    import torch._dynamo

    backends = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **kw: backends.append(kw.get("backend")) or real(*a, **kw))
    kw = dict(student="test_resnet", steps=2, checkpoint_every=2, warmup_steps=1)
    train(rgb_recipe(rgb_folder, **kw), str(tmp_path / "eager"), progress=False)
    assert backends == []
    train(rgb_recipe(rgb_folder, channels_last=True, compile="aot_eager", **kw), str(tmp_path / "knobs"),
          progress=False)
    torch._dynamo.reset()
    assert backends == ["aot_eager"]
    a, b = _final(tmp_path / "eager"), _final(tmp_path / "knobs")
    assert list(a) == list(b)  # nn.Module.compile in place: no _orig_mod. prefix in checkpoints
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    la, lb = (_losses(tmp_path / d) for d in ("eager", "knobs"))
    assert [s for s, _ in la] == [s for s, _ in lb]
    assert [v for _, v in lb] == pytest.approx([v for _, v in la], rel=1e-5)


def test_an_unknown_compile_backend_is_refused_before_training(rgb_folder, tmp_path):
    with pytest.raises(ValueError, match="compile 'inductr' is not a torch.compile backend; valid: true"):
        train(rgb_recipe(rgb_folder, compile="inductr"), str(tmp_path / "run"), progress=False)
    assert not list((tmp_path / "run").glob("checkpoint-*"))


@pytest.mark.parametrize("when", ["start-up", "after the loop"])
def test_sigterm_outside_the_loop_ends_with_a_line_saying_what_was_kept(rgb_folder, tmp_path, monkeypatch, capsys,
                                                                      when):
    """SIGTERM during start-up (before the loop) killed the process without a word (the default handler); after the
    loop likewise. Now: exit 143, one line naming the signal and what was kept, no traceback; the handler the CLI
    installed is removed again."""
    from distill.cli import main
    from distill.trainer import loop

    def sigterm(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(loop, "setup" if when == "start-up" else "finish", sigterm)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rgb_recipe(rgb_folder, steps=2, checkpoint_every=2).to_dict()))
    before = signal.getsignal(signal.SIGTERM)
    assert main(["train", str(path), "-o", str(tmp_path / "run"), "--no-progress"]) == 143
    err = capsys.readouterr().err
    assert "Traceback" not in err and "SIGTERM did not stop" not in err
    if when == "start-up":
        assert f"distill train: stopped by SIGTERM; nothing was written to '{tmp_path / 'run'}'." in err
        assert not (tmp_path / "run").exists()
    else:
        assert (f"distill train: stopped by SIGTERM; what is complete in '{tmp_path / 'run'}' is kept, unfinished "
                f"files were removed; its newest checkpoint is checkpoint-2") in err
    assert signal.getsignal(signal.SIGTERM) == before


def test_sigterm_to_the_whole_process_group_with_loader_workers_finishes_the_step(rgb_folder, tmp_path):
    """`kill -TERM -- -PGID` (as SLURM / systemd stop a job: every process, the loader's workers too) with 2
    workers: the workers ignore it, the main process finishes the step, writes its checkpoint, exits 143 without a
    traceback and leaves no worker behind (before: 'DataLoader worker ... is killed by signal: Terminated' raised
    inside save_checkpoint, exit 1, the checkpoint lost)."""
    recipe = rgb_recipe(rgb_folder, steps=60, checkpoint_every=50, log_every=1, warmup_steps=2, num_workers=2)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "distill.cli", "train", str(path), "-o", str(out), "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if (out / "metrics.csv").exists() and len((out / "metrics.csv").read_text().splitlines()) > 3:
            os.killpg(p.pid, signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "killed by signal" not in err
    last = int((out / "metrics.csv").read_text().splitlines()[-1].split(",")[0])
    assert latest_checkpoint(out).name == f"checkpoint-{last}"
    time.sleep(1)
    with pytest.raises(ProcessLookupError):  # the group is gone: no worker was left behind
        os.killpg(p.pid, 0)
