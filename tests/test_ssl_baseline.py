"""bench/ssl_baseline.py: the SimCLR baseline's missing-extra message, its time-budgeted schedule and its export,
which distill's own probe must load as it loads a distilled student."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from bench import ssl_baseline as sb


def test_missing_lightly_names_the_ssl_extra(monkeypatch):
    for name in ("lightly", "lightly.loss", "lightly.models", "lightly.models.modules"):
        monkeypatch.setitem(sys.modules, name, None)  # import of a None entry raises ImportError
    from distill.errors import MissingDependencyError

    with pytest.raises(MissingDependencyError) as e:
        sb.require_lightly()
    assert "diffusion-distill[ssl]" in str(e.value) and "lightly" in str(e.value)


def test_missing_lightly_fails_before_any_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "lightly", None)
    monkeypatch.setitem(sys.modules, "lightly.loss", None)
    out = tmp_path / "run"
    assert sb.main(["--steps", "2", "-o", str(out)]) == 2  # one line, as distill reports a missing extra
    err = capsys.readouterr().err
    assert "distill[ssl]" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_lr_warmup_then_cosine_over_the_budget_share():
    base, warm = 2e-3, 10
    assert [sb.lr_at(s, 0.0, base, warm) for s in (1, 5, 10)] == pytest.approx([2e-4, 1e-3, 2e-3])
    for p in (0.0, 0.25, 0.5, 0.9, 1.0):  # diffusers' cosine schedule with 0.5 cycles, written independently
        assert sb.lr_at(warm + 1, p, base, warm) == pytest.approx(base * (1 + math.cos(math.pi * p)) / 2)
    assert sb.lr_at(warm + 1, 1.7, base, warm) == pytest.approx(0.0)  # a last step past the budget: lr 0, not < 0


@pytest.mark.parametrize("steps", [67, None])
def test_cosine_starts_after_warmup_and_ends_at_the_budget(steps):
    """The cosine spans the budget left after warmup, as distill train's scheduler: no drop at the end of warmup
    (a cosine over the whole budget would start at cos(pi * 31/67) = 0.56 of the peak), lr 0 at the end."""
    base, warm = 2e-3, 30
    n = 67
    # wall-time budget: step k ends at the share k / n of the seconds (constant step time)
    lrs = [sb.lr_at(k, sb.budget_progress(k, (k - 1) / n, (warm) / n, steps, warm), base, warm) for k in range(1, n + 1)]
    assert lrs[warm - 1] == pytest.approx(base)
    assert lrs[warm] > 0.99 * base  # first step after warmup
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # decreasing after warmup
    assert lrs[-1] < 0.01 * base
    assert sb.budget_progress(n, 1.0, warm / n, None, warm) == pytest.approx(1.0)


def test_simclr_augment_keeps_shape_and_range_and_makes_two_different_views():
    pytest.importorskip("kornia")
    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28)
    aug = sb.simclr_augment(28)
    a, b = aug(x), aug(x)
    assert a.shape == x.shape and b.shape == x.shape
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert not torch.allclose(a, b)


def test_export_is_probed_like_a_distilled_student(tmp_path):
    """The export loads through distill's probe path with its input size and mean/std, gives the backbone's own
    features, names the dataset for ``distill probe`` and keeps none of timm's supervised-weights provenance."""
    import timm

    from distill.evaluate import backbone_fn
    from distill.export import load_exported, read_export
    from distill.recipes import load_recipe

    recipe = load_recipe("recipes/quickstart.yaml", {"student_size": 32})
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", num_classes=0).eval()
    out = sb.export_ssl(backbone, tmp_path / "student", recipe, [0.3] * 3, [0.35] * 3, 1, 7, {"seconds": 1.0})
    cfg = read_export(str(out))
    assert cfg["distill"]["dataset"] == "fashion-mnist" and cfg["distill"]["data_channels"] == 1
    assert cfg["distill"]["method"] == "simclr" and cfg["distill"]["weights"] == "live"
    assert "license" not in cfg["pretrained_cfg"] and cfg["pretrained_cfg"]["input_size"] == [3, 32, 32]
    loaded = load_exported(str(out))
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    c = loaded.pretrained_cfg
    got = backbone_fn(loaded, c["input_size"][-1], c["mean"], c["std"])(images)
    want = backbone_fn(backbone, 32, [0.3] * 3, [0.35] * 3)(images)
    torch.testing.assert_close(got, want)
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["tag"] == "simclr"
    card = (out / "README.md").read_text()  # a card as distill export writes, saying what it is: not distilled
    assert "# resnet18 pretrained with SimCLR" in card and "distilled from" not in card and "teacher" not in card
    assert "| method | SimCLR, two augmented views per image, 1 s of training |" in card
    assert "| data | `fashion-mnist` (images only, labels unused) |" in card and "| steps x batch x processes | 7 x" in card


def test_export_refuses_an_existing_directory(tmp_path):
    import timm

    from distill.recipes import load_recipe

    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        sb.export_ssl(timm.create_model("resnet18", num_classes=0), tmp_path / "student",
                      load_recipe("recipes/quickstart.yaml", {}), [0.3] * 3, [0.35] * 3, 1, 1, {})
    assert (tmp_path / "student" / "keep.txt").read_text() == "mine"


def test_simclr_step_is_lightlys_ntxent_and_trains():
    pytest.importorskip("lightly")
    import timm
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    from distill.recipes import load_recipe

    recipe = load_recipe("recipes/quickstart.yaml", {"student_size": 32})
    torch.manual_seed(0)
    model = sb.SimCLR(timm.create_model("resnet18", num_classes=0), SimCLRProjectionHead).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    step = sb.ssl_step_fn(model, NTXentLoss(temperature=0.5), opt, torch.nn.Identity(), recipe, [0.3] * 3,
                          [0.35] * 3)
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    loss = step(images, 1e-3)
    # identical views (identity augmentation): NT-Xent of 2N=16 samples is above 0 and below log(2N - 1)
    assert 0.0 < loss < math.log(15)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_rgb_views_get_lightlys_colour_steps_and_grey_views_keep_one_channel():
    """RGB data (CamVid) gets saturation/hue jitter and random grayscale (p 0.2: among 64 views some are grey,
    R == G == B, with probability 1 - 0.8**64); one-channel data runs without them; the blur kernel is odd and
    about a tenth of the side."""
    pytest.importorskip("kornia")
    import kornia.augmentation as K

    torch.manual_seed(0)
    x = torch.rand(64, 3, 40, 40)
    x[:, 0] = 1.0  # saturated: a view is grey only if the grayscale step ran
    views = sb.simclr_augment(40, 3)(x)
    grey = ((views[:, 0] - views[:, 1]).abs().amax(dim=(1, 2)) < 1e-6) & \
           ((views[:, 1] - views[:, 2]).abs().amax(dim=(1, 2)) < 1e-6)
    assert 1 <= int(grey.sum()) < 40
    assert views.shape == x.shape and float(views.min()) >= 0.0 and float(views.max()) <= 1.0
    one = sb.simclr_augment(28, 1)
    assert not any(isinstance(m, K.RandomGrayscale) for m in one.children())
    assert one(torch.rand(4, 1, 28, 28)).shape == (4, 1, 28, 28)
    blur = [m for m in sb.simclr_augment(240, 3).children() if isinstance(m, K.RandomGaussianBlur)][0]
    assert blur.flags["kernel_size"] in ((23, 23), (25, 25), 23, 25)


@pytest.mark.parametrize("args, named", [
    (["--steps", "0"], "--steps"), (["--seconds", "0"], "--seconds"), (["--seconds", "nan"], "--seconds"),
    (["--ratio", "0"], "--ratio"), (["--steps", "3", "--set", "stepz=4"], "stepz"),
    (["--steps", "3", "--recipe", "no-such-recipe"], "no-such-recipe"),
    (["--steps", "3", "--distill-run", "no-such-run"], "--distill-run"),
])
def test_bad_input_is_one_error_exit_2_and_writes_nothing(args, named, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        sb.main(args + ["-o", str(out)])
    assert e.value.code == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_an_existing_output_dir_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        sb.main(["--steps", "3", "-o", str(out)])
    err = capsys.readouterr().err  # one line, as distill reports bad input (no usage block)
    assert e.value.code == 2 and "exists" in err and err.startswith("ssl_baseline.py: error:") and err.count("\n") == 1
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_a_run_that_fails_leaves_no_half_directory_and_set_reaches_the_recipe(tmp_path, monkeypatch):
    """--set overrides reach the recipe the loop trains on; a failure inside training removes the directory this
    run created (it was refused above if it existed)."""
    pytest.importorskip("lightly")
    seen = {}

    def boom(args, recipe, out, *rest):
        out.mkdir()
        (out / "log.csv").write_text("step\n")
        seen["recipe"] = recipe
        raise RuntimeError("disk full")

    monkeypatch.setattr(sb, "train", boom)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="disk full"):
        sb.main(["--steps", "3", "--set", "student_size=32", "batch_size=16", "-o", str(out)])
    assert not out.exists()
    assert seen["recipe"].student_size == 32 and seen["recipe"].batch_size == 16


def test_a_missing_dataset_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    pytest.importorskip("lightly")
    out = tmp_path / "run"
    assert sb.main(["--steps", "3", "--set", f"data_root={tmp_path / 'none'}", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ssl_baseline.py: error:") and "Traceback" not in err
    assert not out.exists()


def test_ctrl_c_during_training_stops_at_once_removes_the_half_run_and_its_loader_workers(tmp_path, monkeypatch,
                                                                                          capsys):
    """The loader's workers ignore SIGINT/SIGTERM (distill's loader): left to exit they kept the process alive after
    a Ctrl-C. Now: exit 130, one line, the half-written directory removed, no worker process left."""
    pytest.importorskip("lightly")
    import multiprocessing

    real = sb.ssl_step_fn

    def interrupted_after_one(*a, **k):
        step, calls = real(*a, **k), []

        def s(images, lr):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return step(images, lr)
        return s

    monkeypatch.setattr(sb, "ssl_step_fn", interrupted_after_one)
    out = tmp_path / "run"
    code = sb.main(["--steps", "5", "--set", "student_size=32", "batch_size=4", "num_workers=1", "-o", str(out)])
    assert code == 130
    err = capsys.readouterr().err
    assert "stopped by SIGINT" in err and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]
