"""The student EMA (distill.trainer.ema, recipe ema): the EMA saved in each checkpoint follows the update rule
ema_k = d * ema_{k-1} + (1 - d) * w_k computed here from the saved live weights; a resumed run's EMA equals the
uninterrupted run's bitwise; ``distill export --ema`` writes exactly the EMA weights, and refuses a run without one."""
import shutil

import pytest
import torch
from safetensors.torch import load_file

from distill.cli import main
from distill.export import export_student
from distill.trainer import train

from .conftest import rgb_recipe

DECAY = 0.6  # far from 1 so that 4 updates move the EMA visibly


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, rgb_folder):
    run = tmp_path_factory.mktemp("ema") / "run"
    r = rgb_recipe(rgb_folder, steps=4, checkpoint_every=1, keep_checkpoints=5, ema=True, ema_decay=DECAY)
    train(r, str(run), progress=False)
    return run, r


def _live(run, step):
    """The student's live weights of checkpoint ``step`` (keys as in the timm model)."""
    sd = load_file(str(run / f"checkpoint-{step}" / "model.safetensors"))
    return {k[len("student.model."):]: v for k, v in sd.items() if k.startswith("student.model.")}


def _ema(run, step):
    return load_file(str(run / f"checkpoint-{step}" / "ema.safetensors"))


def test_checkpointed_ema_follows_the_update_rule(ema_run):
    run, _ = ema_run
    for step in (2, 3, 4):
        prev, live, ema = _ema(run, step - 1), _live(run, step), _ema(run, step)
        assert set(ema) == set(live)
        for k in ema:
            if ema[k].is_floating_point():  # parameters and BN running statistics
                torch.testing.assert_close(ema[k], DECAY * prev[k] + (1 - DECAY) * live[k], rtol=1e-5, atol=1e-6)
            else:  # num_batches_tracked: copied
                assert torch.equal(ema[k], live[k])
    moved = [k for k in ema if ema[k].is_floating_point() and not torch.allclose(ema[k], live[k])]
    assert len(moved) > len(ema) // 2  # the EMA is not the live weights


def test_resumed_ema_equals_uninterrupted(ema_run, tmp_path):
    run, r = ema_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoint-4")  # killed after checkpoint 3
    (copy / ".lock").unlink(missing_ok=True)
    train(r, str(copy), resume=True, progress=False)
    a, b = _ema(run, 4), _ema(copy, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_ema_writes_the_ema_weights(ema_run, tmp_path, capsys):
    run, _ = ema_run
    assert main(["export", str(run), "--out", str(tmp_path / "ema"), "--ema"]) == 0
    assert "EMA student of" in capsys.readouterr().out
    exported, ema = load_file(str(tmp_path / "ema" / "model.safetensors")), _ema(run, 4)
    assert set(exported) == set(ema) and all(torch.equal(exported[k], ema[k]) for k in ema)
    live = load_file(str(export_student(str(run), str(tmp_path / "live")) / "model.safetensors"))
    assert all(torch.equal(live[k], v) for k, v in _live(run, 4).items())


def test_export_ema_of_a_run_without_ema_exits_2(trained_run, tmp_path, capsys):
    run, _ = trained_run
    assert main(["export", str(run), "--out", str(tmp_path / "x"), "--ema"]) == 2
    err = capsys.readouterr().err
    assert "no ema.safetensors" in err and "trained without an EMA" in err and "ema=true" in err
    assert not (tmp_path / "x").exists()


def test_ema_steps_once_per_optimizer_update_under_gradient_accumulation(rgb_folder, tmp_path, monkeypatch):
    """grad_accum_steps 2, 4 micro-batches: 2 optimizer updates, so 2 EMA steps; the EMA after each equals
    d * ema + (1 - d) * live computed here from the initial weights and each checkpoint's live weights (an EMA
    stepped per micro-batch would decay twice per update)."""
    from distill.trainer.ema import StudentEma

    init, calls = {}, []
    real_init, real_update = StudentEma.__init__, StudentEma.update

    def spy_init(self, model, decay):
        init.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        real_init(self, model, decay)

    def spy_update(self, model):
        calls.append(1)
        real_update(self, model)

    monkeypatch.setattr(StudentEma, "__init__", spy_init)
    monkeypatch.setattr(StudentEma, "update", spy_update)
    run = tmp_path / "run"
    r = rgb_recipe(rgb_folder, steps=2, grad_accum_steps=2, batch_size=3, checkpoint_every=1, keep_checkpoints=5,
                   ema=True, ema_decay=DECAY, warmup_steps=0, lr=1e-2)
    train(r, str(run), progress=False)
    assert len(calls) == 2  # once per update, not once per micro-batch (4)
    ema = {k: v.float() for k, v in init.items()}
    for step in (1, 2):
        live, saved = _live(run, step), _ema(run, step)
        for k in saved:
            if saved[k].is_floating_point():
                ema[k] = DECAY * ema[k] + (1 - DECAY) * live[k].float()
                torch.testing.assert_close(saved[k], ema[k], rtol=1e-5, atol=1e-6, msg=f"step {step} {k}")
            else:  # num_batches_tracked: copied
                assert torch.equal(saved[k], live[k])
    moved = [k for k in saved if saved[k].is_floating_point() and not torch.allclose(saved[k], live[k])]
    assert len(moved) > len(saved) // 2
