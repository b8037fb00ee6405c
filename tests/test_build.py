"""Recipe wiring (distill.build): a batch larger than the dataset and a teacher whose channels do not match the
data are refused; the regressor's sources are the closest student levels and its FPN matches a hand-written
one (a wiring test, 2 below).

Wiring tests (setup and shared runs in tests/_wiring.py). What each test compares with, and the
bug injected into ``distill/`` to check that it fails (each one made the listed test(s) fail at the
assertion meant for it; reverted with ``git checkout distill/``):

2. ``test_regressor_sources_are_the_closest_student_level_and_fpn_matches_hand_written``: config.yaml
   ``_resolved.sources`` of a real run vs the closest level computed here from timm feature sizes and UNet block
   sizes (expected [2, 1]; neither "finest", "coarsest" nor "same index"); the trained regressor (PPM on, eval
   BN statistics) vs a hand-written top-down pass with its weights. Injected, caught: sources = coarsest level;
   nearest instead of bilinear resize; top-down path not added (``x + 0 * up(merged)``).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from distill.config import make_recipe
from distill.rundir import load_trained
from distill.trainer import check_channels, train

from ._wiring import BLOCKS, IMG, MEAN, STD, TEACHER_PX, _dataset_images, _unet_and_scheduler, _unet_blocks
from ._wiring import _one_thread, base_run, folder, teacher_dir  # noqa: F401 (fixtures)
from .conftest import tiny_unet_config


def test_batch_larger_than_dataset(tmp_path, rgb_folder):
    r = make_recipe(dict(teacher=tiny_unet_config(3), teacher_blocks=["mid_block"], dataset="image-folder",
                         data_root=str(rgb_folder), student_size=32, regressor_width=16, steps=2, batch_size=1000))
    with pytest.raises(ValueError, match="batch_size=1000 is larger than the dataset \\(36 images\\)"):
        train(r, str(tmp_path / "run"), progress=False)


def test_teacher_channels_must_match_data(tmp_path, rgb_folder):
    r = make_recipe(dict(teacher=tiny_unet_config(1), teacher_blocks=["mid_block"], dataset="image-folder",
                         data_root=str(rgb_folder), student_size=32, steps=2, batch_size=4))
    with pytest.raises(ValueError) as e:
        train(r, str(tmp_path / "run"), progress=False)
    assert "in_channels=1" in str(e.value) and "3 channel" in str(e.value) and "Fix:" in str(e.value)
    check_channels(1, 3, "x")  # grayscale data feeds an RGB teacher
    with pytest.raises(ValueError):
        check_channels(3, 4, "x")


# ----------------------------------------------------------------------------------------------- 2. regressor
def _conv_bn_relu(block, x):
    """A conv + BatchNorm (eval: running statistics) + ReLU block, computed from the module's own weights."""
    conv = next(m for m in block.modules() if isinstance(m, nn.Conv2d))
    bn = next(m for m in block.modules() if isinstance(m, nn.BatchNorm2d))
    y = F.conv2d(x, conv.weight, conv.bias, padding=conv.kernel_size[0] // 2)
    v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    y = (y - v(bn.running_mean)) / torch.sqrt(v(bn.running_var) + bn.eps) * v(bn.weight) + v(bn.bias)
    return y.clamp_min(0)


def _up(x, size):
    size = tuple(size)
    return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _ppm(ppm, x, scales):
    branches = [_up(_conv_bn_relu(br, F.adaptive_avg_pool2d(x, s)), x.shape[-2:])
                for s, br in zip(scales, ppm.branches)]
    return _conv_bn_relu(ppm.bottleneck, torch.cat([x, *branches], dim=1))


def _hand_fpn(reg, feats, sources, target_sizes, use_ppm, scales):
    """Top-down FPN written out: lateral 1x1 (PPM on the coarsest level), m_l = lat_l + up(m_{l+1}),
    p_l = 3x3 on m_l, head 1x1 on p_{source}, resized to the target."""
    L, first = len(feats), min(sources)
    merged, pyramid = None, {}
    for level in range(L - 1, first - 1, -1):
        lat_mod = reg.laterals[str(level)]
        if use_ppm and level == L - 1:
            lat = _ppm(lat_mod, feats[level], scales)
        else:
            lat = _conv_bn_relu(lat_mod, feats[level])
        merged = lat if merged is None else lat + _up(merged, lat.shape[-2:])
        if level in sources:
            pyramid[level] = _conv_bn_relu(reg.smooth[str(level)], merged)
    return [_up(F.conv2d(pyramid[s], head.weight, head.bias), size)
            for head, s, size in zip(reg.heads, sources, target_sizes)]


def test_regressor_sources_are_the_closest_student_level_and_fpn_matches_hand_written(base_run, teacher_dir):
    """config.yaml's _resolved.sources of a real run = for each teacher target the student level of closest
    spatial size (sizes measured here: timm features of the student, UNet hooks of the teacher); the trained
    regressor's outputs (PPM on) = a hand-written top-down pass with its own weights and BN statistics."""
    import timm

    res = yaml.safe_load((base_run.path / "config.yaml").read_text())["_resolved"]
    # student levels: the last 4 feature levels of the timm model at the student size
    net = timm.create_model("test_resnet", num_classes=0).eval()
    n = len(net.feature_info)
    with torch.no_grad():
        maps = net.forward_intermediates(torch.zeros(1, 3, IMG, IMG), indices=list(range(n - 4, n)),
                                         intermediates_only=True)
    level_sizes = [tuple(m.shape[-2:]) for m in maps]
    assert [tuple(f["size"]) for f in res["student_features"]] == level_sizes
    # teacher targets: block outputs of the UNet at its sample size, in recipe order
    unet, _ = _unet_and_scheduler(teacher_dir)
    outs = _unet_blocks(unet, torch.zeros(1, 3, TEACHER_PX, TEACHER_PX), 11)
    target_sizes = [tuple(outs[b].shape[-2:]) for b in BLOCKS]

    def dist(level, target):
        return abs(math.log(level[0] / target[0])) + abs(math.log(level[1] / target[1]))

    expected = [min(range(len(level_sizes)), key=lambda i: (round(dist(level_sizes[i], t), 9), i))
                for t in target_sizes]  # ties: the finer level
    assert level_sizes == [(16, 16), (8, 8), (4, 4), (2, 2)] and target_sizes == [(4, 4), (8, 8)]  # the setup
    assert expected == [2, 1]
    assert list(res["sources"]) == expected

    model, recipe, resolved = load_trained(str(base_run.path))
    reg = model.regressor
    assert list(reg.sources) == expected
    bn = [m for m in reg.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn and any(float(m.running_mean.abs().sum()) > 0 for m in bn)  # trained statistics, not the init
    images = _dataset_images(Path(recipe.data_root))[:3]
    x = (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = model.student(x)
        got = model(x)
        want = _hand_fpn(reg, feats, expected, target_sizes, use_ppm=True, scales=(1, 2, 3, 6))
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- loader workers
@pytest.mark.parametrize("cpus, processes, expected", [(1, 1, 0), (2, 1, 1), (16, 1, 8), (16, 2, 7), (16, 8, 1),
                                                       (8, 16, 0), (64, 4, 8)])
def test_auto_workers_are_cpus_per_process_minus_one_at_most_8(cpus, processes, expected):
    from distill.build import loader_workers

    assert loader_workers("auto", processes, cpus) == expected
    assert loader_workers(3, processes, cpus) == 3  # a number is taken as given


@pytest.mark.filterwarnings("ignore:.pin_memory. argument is set as true")
def test_workers_and_pinned_memory_do_not_change_the_batches(rgb_folder):
    """The same generator seed gives the same batches in the same order with 0 workers and with 2 (images are only
    decoded in the workers); pin_memory is passed to the DataLoader."""
    from distill.build import build_loader, build_train_data

    def batches(num_workers, pin):
        r = make_recipe(dict(dataset="image-folder", data_root=str(rgb_folder), batch_size=5,
                             num_workers=num_workers))
        g = torch.Generator().manual_seed(3)
        loader = build_loader(build_train_data(r)[0], r, g, pin_memory=pin)
        assert loader.pin_memory is pin
        return list(loader)

    plain, workers = batches(0, False), batches(2, True)
    assert len(plain) == len(workers) == 36 // 5
    for (xa, ya), (xb, yb) in zip(plain, workers):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
