import re

import pytest
import torch

from distill.regressor import FeatureRegressor, default_sources

torch.set_num_threads(1)

CHANNELS = [8, 16, 32, 64]
SIZES = [(16, 16), (8, 8), (4, 4), (2, 2)]


def make_feats(channels=CHANNELS, sizes=SIZES, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, h, w, generator=g) for c, (h, w) in zip(channels, sizes)]


@pytest.mark.parametrize("use_ppm", [False, True])
@pytest.mark.parametrize("channels, sizes, targets, sources", [
    ([64, 128, 256, 512], SIZES, [(64, (8, 8)), (128, (4, 4))], [1, 2]),
    (CHANNELS, SIZES, [(3, (5, 7)), (12, (16, 16)), (5, (1, 1))], [1, 0, 3]),
    (CHANNELS, [(12, 20), (6, 10), (3, 5), (2, 3)], [(4, (6, 10)), (4, (6, 10))], [2, 2]),
    ([16], [(4, 4)], [(7, (8, 8))], [0]),
])
def test_output_shapes(use_ppm, channels, sizes, targets, sources):
    torch.manual_seed(0)
    reg = FeatureRegressor(channels, targets, sources, width=16, use_ppm=use_ppm).eval()
    outs = reg(make_feats(channels, sizes))
    assert [tuple(o.shape) for o in outs] == [(2, c, *size) for c, size in targets]
    assert all(torch.isfinite(o).all() for o in outs)


def test_default_width_and_default_sources_from_level_sizes():
    reg = FeatureRegressor(CHANNELS, [(6, (8, 8)), (4, (2, 2))], level_sizes=SIZES)
    assert reg.sources == (1, 3)
    assert reg.width == 256 and reg.heads[0].in_channels == 256
    outs = reg(make_feats())
    assert [tuple(o.shape) for o in outs] == [(2, 6, 8, 8), (2, 4, 2, 2)]


@pytest.mark.parametrize("targets, levels, expected", [
    ([(8, 8), (2, 2), (16, 16)], SIZES, [1, 3, 0]),      # exact matches
    ([(6, 6), (12, 12), (3, 3)], SIZES, [1, 0, 2]),      # between levels: 8/6 < 6/4, 16/12 < 12/8, 4/3 < 3/2
    ([(64, 64), (1, 1)], SIZES, [0, 3]),                 # beyond the ends
    ([(4, 4)], [(8, 8), (2, 2)], [0]),                   # tie (ratio 2 both ways) -> finer
    ([(8, 8)], [(16, 16), (4, 4)], [0]),                 # tie -> finer
    ([(8, 8)], [(16, 16), (4, 4), (4, 4)], [0]),
    ([(4, 4)], [(8, 8), (4, 4), (4, 4)], [1]),           # identical levels -> the finer one
    ([(8, 16), (4, 8)], [(16, 32), (8, 16), (4, 8)], [1, 2]),  # rectangular
    ([(7, 9)], [(14, 18), (7, 9), (4, 5)], [1]),
])
def test_default_sources_picks_closest_level(targets, levels, expected):
    assert default_sources(len(levels), targets, levels) == expected


def test_default_sources_rejects_mismatched_levels():
    with pytest.raises(ValueError, match="num_levels=3"):
        default_sources(3, [(4, 4)], [(8, 8), (4, 4)])
    with pytest.raises(ValueError, match=re.escape("(0, 4)")):
        default_sources(1, [(0, 4)], [(4, 4)])


@pytest.mark.parametrize("use_ppm", [False, True])
@pytest.mark.parametrize("sources", [[1, 2], [2], [3, 1]])
def test_sources_honoured(use_ppm, sources):
    torch.manual_seed(0)
    targets = [(5, (4, 4))] * len(sources)
    reg = FeatureRegressor(CHANNELS, targets, sources, width=16, use_ppm=use_ppm).eval()
    feats = make_feats()
    with torch.no_grad():
        ref = reg(feats)
        for level in range(len(CHANNELS)):
            perturbed = [f + 1.0 if l == level else f for l, f in enumerate(feats)]
            outs = reg(perturbed)
            same = [torch.equal(o, r) for o, r in zip(outs, ref)]
            # A level reaches output i iff it is at or coarser than sources[i] (the top-down path).
            assert same == [level < s for s in sources], (level, same)


@pytest.mark.parametrize("use_ppm", [False, True])
def test_gradient_reaches_every_parameter(use_ppm):
    torch.manual_seed(0)
    reg = FeatureRegressor(CHANNELS, [(4, (8, 8)), (6, (4, 4))], [1, 2], width=16, use_ppm=use_ppm).train()
    feats = [f.requires_grad_() for f in make_feats()]
    sum(o.sum() for o in reg(feats)).backward()
    for name, p in reg.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    for head in reg.heads:
        assert head.weight.grad.abs().sum() > 0 and head.bias.grad.abs().sum() > 0
    # Level 0 is finer than every source: not read (and no modules built for it).
    assert feats[0].grad is None
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats[1:])
    assert "0" not in reg.laterals and sorted(reg.smooth) == ["1", "2"]


def test_train_mode_with_ppm_batch_of_two():
    torch.manual_seed(0)
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1)]  # coarsest level 1x1: BN still fine with batch 2
    reg = FeatureRegressor(CHANNELS, [(4, (4, 4)), (3, (1, 1))], [1, 3], width=16, use_ppm=True).train()
    outs = reg(make_feats(sizes=sizes, batch=2))
    assert [tuple(o.shape) for o in outs] == [(2, 4, 4, 4), (2, 3, 1, 1)]
    assert all(torch.isfinite(o).all() for o in outs)
    sum(o.sum() for o in outs).backward()
    assert reg.laterals["3"].bottleneck[0].weight.grad is not None


def test_wrong_number_of_levels():
    reg = FeatureRegressor(CHANNELS, [(4, (4, 4))], [2], width=16)
    with pytest.raises(ValueError, match=re.escape("[8, 16, 32]")) as info:
        reg(make_feats(CHANNELS[:3], SIZES[:3]))
    assert "[8, 16, 32, 64]" in str(info.value)


def test_wrong_channels():
    reg = FeatureRegressor(CHANNELS, [(4, (4, 4))], [2], width=16)
    with pytest.raises(ValueError, match=re.escape("[8, 17, 32, 64]")):
        reg(make_feats([8, 17, 32, 64]))
    with pytest.raises(ValueError, match=re.escape("(2, 8, 16)")):
        reg([torch.zeros(2, 8, 16), *make_feats()[1:]])


@pytest.mark.parametrize("bad", [4, -1, 7])
def test_bad_source_index(bad):
    with pytest.raises(ValueError, match=rf"source {bad} .*0\.\.3"):
        FeatureRegressor(CHANNELS, [(4, (4, 4)), (4, (2, 2))], [0, bad], width=16)


def test_sources_and_targets_must_match():
    with pytest.raises(ValueError, match=re.escape("[0, 1, 2]")):
        FeatureRegressor(CHANNELS, [(4, (4, 4))], [0, 1, 2])


def test_missing_sources_and_level_sizes():
    with pytest.raises(ValueError, match="level_sizes"):
        FeatureRegressor(CHANNELS, [(4, (4, 4))])


def test_empty_targets():
    with pytest.raises(ValueError, match=re.escape("targets=[]")):
        FeatureRegressor(CHANNELS, [], [])
