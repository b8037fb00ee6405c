"""Tests for distill.student: timm students' multi-scale features, their feature_info, and DistillModel."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

from distill.regressor import FeatureRegressor
from distill.student import DistillModel, Student, check_student_name

torch.set_num_threads(1)

STUDENTS = [
    ("resnet18", 64, {}),
    ("convnext_atto", 64, {}),
    ("vit_tiny_patch16_224", 32, {"patch_size": 4}),
]
IDS = [s[0] for s in STUDENTS]
# Default levels by hand: the last 4 stages of a CNN (timm's ResNet feature_info starts with the stem's act1),
# 4 evenly spaced blocks of a 12-block ViT.
DEFAULT_INDICES = {"resnet18": [1, 2, 3, 4], "convnext_atto": [0, 1, 2, 3], "vit_tiny_patch16_224": [2, 5, 8, 11]}
NUM_FEATURES = {"resnet18": 512, "convnext_atto": 320, "vit_tiny_patch16_224": 192}


@pytest.fixture(scope="module", params=STUDENTS, ids=IDS)
def student(request):
    name, size, kwargs = request.param
    torch.manual_seed(0)
    return Student(name, size, model_kwargs=kwargs).eval()


def images(student: Student, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, student.img_size, student.img_size, generator=g)


def test_default_indices(student):
    assert student.indices == DEFAULT_INDICES[student.name]
    assert [f.index for f in student.feature_info] == student.indices


def test_feature_info_matches_forward(student):
    with torch.no_grad():
        feats = student(images(student, batch=3))
    assert isinstance(feats, list) and len(feats) == len(student.feature_info) == 4
    for f, info in zip(feats, student.feature_info):
        assert f.dim() == 4 and f.shape[0] == 3  # NCHW
        assert f.shape[1] == info.num_chs
        assert tuple(f.shape[-2:]) == info.size
        assert info.reduction == student.img_size // f.shape[-1]
        assert torch.isfinite(f).all()
    assert student.channels == [f.shape[1] for f in feats]
    assert student.sizes == [tuple(f.shape[-2:]) for f in feats]


def test_feature_info_agrees_with_timm(student):
    # timm's own feature_info, per index, is an independent record of channels and stride.
    for info in student.feature_info:
        ref = student.model.feature_info[info.index]
        assert info.num_chs == ref["num_chs"], info
        assert info.reduction == ref["reduction"], info


def test_finest_first(student):
    heights = [s[0] for s in student.sizes]
    widths = [s[1] for s in student.sizes]
    assert heights == sorted(heights, reverse=True)
    assert widths == sorted(widths, reverse=True)


def test_pooled_shape(student):
    with torch.no_grad():
        p = student.pooled(images(student, batch=2))
    assert tuple(p.shape) == (2, NUM_FEATURES[student.name])
    assert p.shape[1] == student.model.num_features


def test_expected_map_shapes(student):
    expected = {
        "resnet18": [(64, 16), (128, 8), (256, 4), (512, 2)],
        "convnext_atto": [(40, 16), (80, 8), (160, 4), (320, 2)],
        "vit_tiny_patch16_224": [(192, 8)] * 4,
    }[student.name]
    with torch.no_grad():
        feats = student(images(student))
    assert [tuple(f.shape) for f in feats] == [(2, c, s, s) for c, s in expected]


def test_vit_maps_equal_manual_block_outputs():
    torch.manual_seed(0)
    st = Student("vit_tiny_patch16_224", 32, model_kwargs={"patch_size": 4}).eval()
    x = images(st)
    m = st.model
    with torch.no_grad():
        feats = st(x)
        t = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))  # (B, 1 + 64, 192)
        manual = {}
        for i, blk in enumerate(m.blocks):
            t = blk(t)
            manual[i] = t[:, m.num_prefix_tokens:].reshape(2, 8, 8, 192).permute(0, 3, 1, 2)  # (B, 192, 8, 8)
    for i, f in zip(st.indices, feats):
        torch.testing.assert_close(f, manual[i], rtol=1e-5, atol=1e-5)


def test_resnet_maps_equal_manual_stage_outputs():
    torch.manual_seed(0)
    st = Student("resnet18", 64).eval()
    x = images(st)
    m = st.model
    with torch.no_grad():
        feats = st(x)
        t = m.maxpool(m.act1(m.bn1(m.conv1(x))))
        manual = []
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            t = layer(t)
            manual.append(t)
    for f, ref in zip(feats, manual):
        torch.testing.assert_close(f, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, size, kwargs, indices, expected", [
    ("resnet18", 64, {}, [2, 4], [2, 4]),
    ("resnet18", 64, {}, [-1], [4]),
    ("resnet18", 64, {}, [0, 1], [0, 1]),
    ("convnext_atto", 64, {}, [1, -1], [1, 3]),
    ("vit_tiny_patch16_224", 32, {"patch_size": 4}, [0, 6, -1], [0, 6, 11]),
])
def test_custom_indices_honoured(name, size, kwargs, indices, expected):
    st = Student(name, size, indices=indices, model_kwargs=kwargs).eval()
    assert st.indices == expected
    assert [f.index for f in st.feature_info] == expected
    with torch.no_grad():
        feats = st(images(st))
    assert len(feats) == len(expected)
    for f, info in zip(feats, st.feature_info):
        assert f.shape[1] == st.model.feature_info[info.index]["num_chs"] == info.num_chs
        assert info.reduction == st.model.feature_info[info.index]["reduction"]


def test_unsorted_custom_indices_keep_index_and_channels_together():
    # feature_info pairs each requested index with the map forward returns for it.
    st = Student("resnet18", 64, indices=[3, 1]).eval()
    by_index = {info.index: info.num_chs for info in st.feature_info}
    assert by_index == {3: 256, 1: 64}
    with torch.no_grad():
        feats = st(images(st))
    assert [f.shape[1] for f in feats] == st.channels


@pytest.mark.parametrize("name, size, kwargs, indices, bad", [
    ("resnet18", 64, {}, [1, 5], [5]),
    ("resnet18", 64, {}, [-6], [-6]),
    ("convnext_atto", 64, {}, [4, 7], [4, 7]),
    ("vit_tiny_patch16_224", 32, {"patch_size": 4}, [12], [12]),
])
def test_out_of_range_indices(name, size, kwargs, indices, bad):
    with pytest.raises(ValueError) as e:
        Student(name, size, indices=indices, model_kwargs=kwargs)
    msg = str(e.value)
    assert str(bad) in msg and repr(name) in msg
    assert f"has {len(timm.create_model(name, num_classes=0, **kwargs).feature_info)} feature levels" in msg


def test_vit_gets_img_size_and_dynamic_size():
    st = Student("vit_tiny_patch16_224", 32, model_kwargs={"patch_size": 4})
    assert st.model_kwargs["img_size"] == 32 and st.model_kwargs["dynamic_img_size"] is True
    assert st.model.patch_embed.grid_size == (8, 8)
    # dynamic_img_size: another input size still yields maps (48 / 4 = 12).
    with torch.no_grad():
        feats = st.eval()(torch.zeros(1, 3, 48, 48))
    assert all(tuple(f.shape) == (1, 192, 12, 12) for f in feats)


@pytest.mark.parametrize("name, close", [("resnet181", "resnet18"), ("convnext_attto", "convnext_atto"),
                                         ("vit_tiny_patch16", "vit_tiny_patch16_224")])
def test_unknown_student_name(name, close):
    with pytest.raises(ValueError) as e:
        check_student_name(name)
    msg = str(e.value)
    assert repr(name) in msg
    assert "timm.list_models" in msg
    assert close in msg.split("Closest timm names:")[1]
    with pytest.raises(ValueError, match="timm.list_models"):
        Student(name)


def test_known_student_name_passes():
    for name in ("resnet18", "convnext_atto", "vit_tiny_patch16_224"):
        assert check_student_name(name) is None


def test_unknown_student_name_without_close_match():
    with pytest.raises(ValueError) as e:
        check_student_name("qqqqzzzzxxxx")
    assert "Closest" not in str(e.value) and "timm.list_models" in str(e.value)


def test_dry_run_keeps_training_mode():
    st = Student("resnet18", 64)
    assert st.training and st.model.training


# --------------------------------------------------------------------------------------------------- DistillModel

class Scale(nn.Module):
    """A regressor stand-in: multiplies each feature by a learnable scalar."""

    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.arange(1.0, n + 1))

    def forward(self, feats):
        return [f * w for f, w in zip(feats, self.w)]


def test_distill_model_is_regressor_of_student_identity_like():
    torch.manual_seed(0)
    st = Student("resnet18", 64).eval()
    model = DistillModel(st, Scale(4)).eval()
    x = images(st)
    with torch.no_grad():
        out = model(x)
        feats = st(x)
    assert len(out) == 4
    for k, (o, f) in enumerate(zip(out, feats)):
        torch.testing.assert_close(o, f * (k + 1))


def test_distill_model_with_feature_regressor_matches_composition():
    torch.manual_seed(0)
    st = Student("convnext_atto", 64).eval()
    reg = FeatureRegressor(st.channels, [(6, (8, 8)), (3, (4, 4))], level_sizes=st.sizes, width=8).eval()
    model = DistillModel(st, reg).eval()
    assert model.student is st and model.regressor is reg
    x = images(st)
    with torch.no_grad():
        out = model(x)
        ref = reg(st(x))
    assert [tuple(o.shape) for o in out] == [(2, 6, 8, 8), (2, 3, 4, 4)]
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r)


def undo_zero_init(st: Student) -> Student:
    """timm zero-inits the last BN of each residual branch, which zeroes the gradient of the convs before it."""
    for m in st.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
    return st


def test_gradients_flow_to_student_and_regressor():
    torch.manual_seed(0)
    st = undo_zero_init(Student("resnet18", 64))
    reg = FeatureRegressor(st.channels, [(4, (8, 8))], sources=[1], width=8)
    model = DistillModel(st, reg).train()
    out = model(images(st, batch=2))
    out[0].pow(2).mean().backward()
    # The FPN's top-down path mixes all four levels into level 1, so every stage gets a gradient.
    for name, p in st.model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # A DistillModel owns both parts' parameters (one optimizer, one DDP wrapper).
    n_params = sum(1 for _ in model.parameters())
    assert n_params == sum(1 for _ in st.parameters()) + sum(1 for _ in reg.parameters())
    assert reg.heads[0].weight.grad is not None and reg.heads[0].weight.grad.abs().sum() > 0


def test_gradients_reach_every_used_student_level():
    torch.manual_seed(0)
    st = undo_zero_init(Student("resnet18", 64))
    model = DistillModel(st, Scale(4)).train()
    out = model(images(st, batch=2))
    sum(o.mean() for o in out).backward()
    for name, p in st.model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert model.regressor.w.grad is not None and (model.regressor.w.grad != 0).all()


# ------------------------------------------------------------------ every timm family at the recipes' small sizes
FAMILIES = [  # (name, student_size, student_kwargs): tiny variants at the sizes the recipes use
    ("resnet18", 64, {}),
    ("convnext_atto", 64, {}),
    ("efficientnet_b0", 64, {}),
    ("regnetx_002", 64, {}),
    ("vit_tiny_patch16_224", 32, {"patch_size": 4}),
    ("deit_tiny_patch16_224", 32, {"patch_size": 4}),
    ("swin_tiny_patch4_window7_224", 64, {}),
    ("maxvit_nano_rw_256", 64, {}),
    ("coatnet_nano_rw_224", 64, {}),
]


@pytest.mark.parametrize("name, size, kwargs", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_every_family_builds_at_the_recipe_size(name, size, kwargs):
    torch.manual_seed(0)
    st = Student(name, size, model_kwargs=kwargs).eval()
    fixed = timm.models.get_pretrained_cfg(name).fixed_input_size  # timm's own record of the family
    assert ("img_size" in st.model_kwargs) == (fixed or name.startswith(("vit_", "deit_")))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = st(x)
        pooled = st.pooled(x)
    assert len(feats) == len(st.feature_info) >= 3
    for f, info in zip(feats, st.feature_info):
        assert f.shape[1] == info.num_chs == st.model.feature_info[info.index]["num_chs"]
        assert tuple(f.shape[-2:]) == info.size and torch.isfinite(f).all()
    assert pooled.shape == (2, st.model.num_features)
    # what export records (the model's arguments) rebuilds the same network: same weights, same output
    rebuilt = timm.create_model(name, pretrained=False, num_classes=0, **st.model_kwargs).eval()
    rebuilt.load_state_dict(st.model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), pooled)


def test_swin_default_size_is_set_from_student_size():
    # ../shared/cases/swin_student_default_size.py: timm's bare "Input height (64) doesn't match model (224)"
    st = Student("swin_tiny_patch4_window7_224", 64)
    assert st.model_kwargs["img_size"] == 64 and st.sizes == [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_vit_size_not_a_multiple_of_patch_is_refused_with_the_sizes_that_work():
    with pytest.raises(ValueError) as e:
        Student("vit_tiny_patch16_224", 30, model_kwargs={"patch_size": 4})
    msg = str(e.value)
    assert "student_size 30" in msg and "patch size 4" in msg and "28 or 32" in msg
    assert not isinstance(e.value, AssertionError)
    padded = Student("vit_tiny_patch16_224", 30, model_kwargs={"patch_size": 4, "dynamic_img_pad": True})
    assert padded.sizes[0] == (8, 8)  # asked for: timm pads the 2 px border to a whole patch


def test_size_a_family_cannot_take_names_timm_and_the_stride():
    with pytest.raises(ValueError) as e:
        Student("coatnet_nano_rw_224", 40)  # windows of 7 do not tile the 40 px maps
    msg = str(e.value)
    assert "'coatnet_nano_rw_224' cannot take student_size 40" in msg and "timm says" in msg
    assert "stride 32 (32 or 64)" in msg


def test_img_size_kwarg_conflicting_with_student_size_is_refused():
    with pytest.raises(ValueError, match=r"img_size=32 differs from student_size=64.*student_size: 32"):
        Student("swin_tiny_patch4_window7_224", 64, model_kwargs={"img_size": 32})
    assert Student("vit_tiny_patch16_224", 32, model_kwargs={"img_size": 32, "patch_size": 4}).img_size == 32


def test_unknown_model_kwarg_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match=r"does not take student_kwargs \{'foo': 1\}.*foo"):
        Student("resnet18", 64, model_kwargs={"foo": 1})


def test_fixed_input_size_follows_timm_cfg():
    from distill.student import fixed_input_size

    assert fixed_input_size("resnet18") is None
    assert fixed_input_size("swin_tiny_patch4_window7_224") == 224
    assert fixed_input_size("maxvit_nano_rw_256") == 256
