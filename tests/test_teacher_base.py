"""DiffusionTeacher on a pixel-space UNet or any module: features against independent hooks, batched and per-image
timesteps, seedable noise, early exit, frozen weights, and the errors for bad blocks, timesteps and inputs."""
import pytest
import torch
import torch.nn as nn
from diffusers import DDPMScheduler

from distill.teacher.base import DiffusionTeacher
from distill.teacher.loading import load_teacher


BLOCKS = ["down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]


def _manual_features(unet, x_t, t, blocks):
    """Independent extraction: plain hooks around the full forward, no early exit."""
    out = {}
    hs = [dict(unet.named_modules())[b].register_forward_hook(
        lambda m, i, o, b=b: out.__setitem__(b, o[0] if isinstance(o, tuple) else o)) for b in blocks]
    with torch.no_grad():
        unet(x_t, t)
    for h in hs:
        h.remove()
    return out


def test_feature_info_matches_forward(unet_config):
    teacher = load_teacher(unet_config, BLOCKS, [11, 50])
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    feats = teacher(x)
    assert list(feats) == [f.key for f in teacher.feature_info]
    for info in teacher.feature_info:
        f = feats[info.key]
        assert f.shape == (3, info.num_chs, *info.size)
        assert info.reduction == 32 // f.shape[-1]
    # down block returns (hidden, residuals): the hidden state is taken
    assert feats["down_blocks.1@t11"].shape == (3, 16, 8, 8)


def test_features_equal_independent_extraction(unet_config):
    teacher = load_teacher(unet_config, BLOCKS, [11, 50])
    x0 = torch.rand(2, 1, 32, 32) * 2 - 1
    feats = teacher(x0, generator=torch.Generator().manual_seed(3))
    # same noise, drawn the same way: one (K*B) draw, timestep-major
    eps = torch.randn((4, 1, 32, 32), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([11, 11, 50, 50])
    x_t = DDPMScheduler(num_train_timesteps=1000).add_noise(x0.repeat(2, 1, 1, 1), eps, t)
    ref = _manual_features(teacher.model, x_t, t, BLOCKS)
    for b in BLOCKS:
        torch.testing.assert_close(feats[f"{b}@t11"], ref[b][:2])
        torch.testing.assert_close(feats[f"{b}@t50"], ref[b][2:])


def test_batched_timesteps_equal_separate_calls(unet_config):
    teacher = load_teacher(unet_config, ["up_blocks.0"], [5, 11, 50])
    x0 = torch.rand(2, 1, 32, 32) * 2 - 1
    batched = teacher(x0, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # sequential draws of B continue the same stream
    for t in (5, 11, 50):
        single = teacher(x0, timesteps=[t], generator=g)
        torch.testing.assert_close(batched[f"up_blocks.0@t{t}"], single[f"up_blocks.0@t{t}"], rtol=1e-4, atol=1e-5)


def test_noise_is_fresh_and_seedable(unet_config):
    teacher = load_teacher(unet_config, ["mid_block"], [500])
    x0 = torch.zeros(2, 1, 32, 32)
    a, b = teacher(x0)["mid_block@t500"], teacher(x0)["mid_block@t500"]
    assert not torch.allclose(a, b)
    c = teacher(x0, generator=torch.Generator().manual_seed(1))["mid_block@t500"]
    d = teacher(x0, generator=torch.Generator().manual_seed(1))["mid_block@t500"]
    torch.testing.assert_close(c, d)


def test_early_exit_skips_later_modules(unet_config):
    teacher = load_teacher(unet_config, ["mid_block", "down_blocks.1"], [11])
    assert teacher._stop_block == "mid_block"  # deepest in execution order, whatever the list order
    called = []
    hooks = [teacher.model.up_blocks[0].register_forward_hook(lambda *a: called.append("up0")),
             teacher.model.conv_out.register_forward_hook(lambda *a: called.append("conv_out")),
             teacher.model.mid_block.register_forward_hook(lambda *a: called.append("mid"))]
    teacher(torch.zeros(1, 1, 32, 32))
    for h in hooks:
        h.remove()
    assert called == ["mid"]


def test_teacher_is_frozen(unet_config):
    teacher = load_teacher(unet_config, ["mid_block"])
    teacher.train()
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.zeros(1, 1, 32, 32, requires_grad=True)
    assert not teacher(x)["mid_block@t11"].requires_grad


def test_misspelled_block_lists_valid_names(unet_config):
    with pytest.raises(ValueError) as e:
        load_teacher(unet_config, ["up_block.1"])
    msg = str(e.value)
    assert "'up_block.1'" in msg and "up_blocks.1" in msg and "mid_block" in msg and "Did you mean" in msg


@pytest.mark.parametrize("bad", [[1000], [-1], [11, 2000], []])
def test_timestep_out_of_range(unet_config, bad):
    with pytest.raises(ValueError) as e:
        load_teacher(unet_config, ["mid_block"], bad)
    assert "[0, 1000)" in str(e.value)


def test_per_image_timesteps(unet_config):
    teacher = load_teacher(unet_config, ["mid_block"], [11])
    x0 = torch.rand(3, 1, 32, 32) * 2 - 1
    t = torch.tensor([1, 100, 999])
    feats = teacher(x0, timesteps=t, generator=torch.Generator().manual_seed(0))
    eps = torch.randn((3, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    x_t = DDPMScheduler(num_train_timesteps=1000).add_noise(x0, eps, t)
    torch.testing.assert_close(feats["mid_block@t*"], _manual_features(teacher.model, x_t, t, ["mid_block"])["mid_block"])
    with pytest.raises(ValueError, match=r"timesteps \[1000\] are outside \[0, 1000\)"):
        teacher(x0, timesteps=torch.tensor([1, 2, 1000]))
    with pytest.raises(ValueError, match=r"timesteps \[-1\] are outside"):
        teacher(x0, timesteps=torch.tensor([1, -1, 5]))
    with pytest.raises(ValueError, match="per-image timesteps must be an integer tensor, got dtype torch.float32"):
        teacher(x0, timesteps=torch.tensor([1.0, 2.0, 3.0]))  # was: "timesteps [1.0, 2.0, 3.0] are outside [0, 1000)"


def test_wrong_input_shape_is_clear(unet_config):
    teacher = load_teacher(unet_config, ["mid_block"])
    with pytest.raises(ValueError, match=r"\[B, 1, 32, 32\]"):
        teacher(torch.zeros(2, 3, 32, 32))


def test_any_module_taking_noisy_image_and_timestep():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.dec = nn.Conv2d(8, 3, 3, padding=1)

        def forward(self, x, t):
            return self.dec(self.enc(x) + t.float().view(-1, 1, 1, 1) / 1000)

    teacher = DiffusionTeacher(Net(), ["enc"], [3], in_channels=3, sample_size=16)
    assert teacher.feature_info[0].num_chs == 8 and teacher.feature_info[0].reduction == 2
    assert teacher(torch.zeros(2, 3, 16, 16))["enc@t3"].shape == (2, 8, 8, 8)
    with pytest.raises(ValueError, match="in_channels"):
        DiffusionTeacher(Net(), ["enc"], [3])


@pytest.mark.parametrize("block,timestep", [("mid_block", 11), ("up_blocks.0", 0), ("a.b@tx", 999), ("m", None)])
def test_feature_key_round_trip(block, timestep):
    from distill.teacher import feature_key, parse_feature_key

    key = feature_key(block, timestep)
    assert key == f"{block}@t{'*' if timestep is None else timestep}"
    assert parse_feature_key(key) == (block, timestep)


@pytest.mark.parametrize("key", ["mid_block", "mid_block@t", "@t11", "mid_block@t1.5", "mid_block@t-3"])
def test_parse_feature_key_rejects_other_strings(key):
    from distill.teacher import parse_feature_key

    with pytest.raises(ValueError, match="not of the form"):
        parse_feature_key(key)
