"""distill.segment.model: logits at the input size for sizes the backbone's strides do not divide, an export's
weights (BN statistics included) reach the features_only backbone, scratch is seeded and takes --like's model
arguments, a frozen backbone stays frozen, and a diffusion teacher's features serve as a backbone."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from distill.finetune.model import parse_model_source, read_export_config
from distill.segment.model import SegModel, TeacherBackbone, TimmBackbone, build_decoder, timm_backbone, timm_features

from ._finetune import MEAN, STD, fake_export


@pytest.fixture(scope="module")
def export18(tmp_path_factory):
    return fake_export(tmp_path_factory.mktemp("export") / "student", arch="resnet18")


@pytest.mark.parametrize("decoder", ["fpn", "linear"])
@pytest.mark.parametrize("hw", [(45, 60), (32, 32)])
def test_logits_have_the_input_size(decoder, hw):
    torch.manual_seed(0)
    bb = TimmBackbone(timm_features(parse_model_source("timm:resnet18"), None), MEAN, STD)
    assert bb.channels == [64, 128, 256, 512] and bb.reductions == [4, 8, 16, 32]
    model = SegModel(bb, build_decoder(decoder, bb.channels, 5, width=16))
    assert model(torch.rand(2, 3, *hw)).shape == (2, 5, *hw)


def test_explicit_levels_are_kept():
    bb = TimmBackbone(timm_features(parse_model_source("timm:resnet18"), [0, 4]), MEAN, STD, drop_stem=False)
    assert bb.reductions == [2, 32] and [f.shape[1] for f in bb(torch.rand(1, 3, 64, 64))] == [64, 512]


def test_exported_weights_reach_the_features_only_backbone(export18):
    source = parse_model_source(str(export18))
    model = timm_features(source, None)
    saved = load_file(str(export18 / "model.safetensors"))
    state = model.state_dict()
    for key in ("conv1.weight", "layer4.1.bn2.running_mean", "layer2.0.downsample.0.weight"):
        assert torch.equal(state[key], saved[key]), key


def test_scratch_is_seeded_and_copies_like_model_args(export18):
    cfg = read_export_config(export18, "--like")
    cfg["model_args"] = {"num_classes": 0, "in_chans": 3, "global_pool": "avg", "drop_rate": 0.25}
    weights = []
    for _ in range(2):
        torch.manual_seed(7)
        weights.append(timm_features(parse_model_source("timm:resnet18"), None, cfg).state_dict()["conv1.weight"])
    assert torch.equal(*weights)
    assert not torch.equal(weights[0], load_file(str(export18 / "model.safetensors"))["conv1.weight"])


def test_frozen_backbone_gets_no_gradient_and_keeps_its_statistics():
    torch.manual_seed(0)
    bb = TimmBackbone(timm_features(parse_model_source("timm:resnet10t"), None), MEAN, STD)
    model = SegModel(bb, build_decoder("linear", bb.channels, 3), freeze_backbone=True).train()
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in bb.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters() if p.requires_grad)
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())


def test_teacher_features_as_a_frozen_backbone(tiny_pipeline_dir):
    from distill.teacher import load_teacher

    teacher = load_teacher(str(tiny_pipeline_dir), blocks=["up_blocks.0", "up_blocks.1"], timesteps=[11])
    bb = TeacherBackbone(teacher)
    assert bb.keys == ["up_blocks.1@t11", "up_blocks.0@t11"]  # finest (stride 2) first
    model = SegModel(bb, build_decoder("linear", bb.channels, 4), freeze_backbone=True).train()
    out = model(torch.rand(2, 3, 24, 40))  # any size: resized to the teacher's 32 px, logits back at 24x40
    assert out.shape == (2, 4, 24, 40) and not bb.teacher.training
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["decoder.classifier.weight",
                                                                           "decoder.classifier.bias"]


SWIN_TINY = {"architecture": "swin_tiny_patch4_window7_224",
             "model_args": {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}}


@pytest.mark.parametrize("name,like,nhwc,pad", [("timm:test_resnet", None, False, None),
                                                ("timm:test_convnext", None, False, None),
                                                ("timm:test_efficientnet", None, False, None),
                                                ("timm:swin_tiny_patch4_window7_224", SWIN_TINY, True, 32),
                                                ("timm:test_vit", None, False, 16)])
def test_every_backbone_family_trains_two_steps(name, like, nhwc, pad):
    """ResNet, ConvNeXt, EfficientNet (NCHW CNNs), Swin (channels-last maps, window grid) and a plain ViT (one
    stride: ViTDet's simple pyramid) at a size no stride divides: levels at strides 4..32, logits at the input size,
    two optimizer steps change backbone and decoder."""
    torch.manual_seed(0)
    bb = timm_backbone(parse_model_source(name), None, like, MEAN, STD, img_size=40)
    assert bb.reductions == [4, 8, 16, 32] and bb.nhwc == nhwc and bb.pad_multiple == pad
    assert (bb.pyramid is not None) == name.endswith("vit")
    model = SegModel(bb, build_decoder("fpn", bb.channels, 3, width=16)).train()
    feats = bb(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == bb.channels and [64 // f.shape[-1] for f in feats] == [4, 8, 16, 32]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    x, y = torch.rand(2, 3, 40, 56), torch.randint(0, 3, (2, 40, 56))
    for _ in range(2):
        logits = model(x)
        assert logits.shape == (2, 3, 40, 56)
        loss = torch.nn.functional.cross_entropy(logits, y)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    changed = {k.split(".")[0] for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed == {"backbone", "decoder"}


def test_a_fixed_size_family_is_built_at_the_run_size(tmp_path):
    """timm:test_vit is built for 160 px; a run at --size 32 builds it at 32 px with a dynamic size (any multiple of
    its patch), so the 32x40 images run padded to 32x48, and trains."""
    from distill.segment import SegmentConfig, segment_finetune

    from ._segment import IGNORE, NUM_CLASSES, write_shapes

    bb = timm_backbone(parse_model_source("timm:test_vit"), None, None, MEAN, STD, img_size=32)
    embed = bb.model.model.patch_embed
    assert tuple(embed.img_size) == (32, 32) and embed.strict_img_size is False and bb.fixed_size is None

    root = write_shapes(tmp_path / "d", {"train": 2, "test": 1})
    cfg = SegmentConfig(model="timm:test_vit", data_root=str(root), num_classes=NUM_CLASSES, ignore_index=IGNORE,
                        steps=2, batch_size=2, warmup_steps=1, decoder_width=8, grid_images=0, size=32,
                        eval_batch_size=2)
    r = segment_finetune(cfg, str(tmp_path / "run"), progress=False)
    assert r["input_size"] == [32, 40] and r["backbone"]["reductions"] == [4, 8, 16, 32] and r["test_images"] == 1


@pytest.mark.parametrize("arch,model_args", [
    ("swin_tiny_patch4_window7_224", {"img_size": 64, "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1] * 4}),
    ("vit_tiny_patch16_224", {"img_size": 64, "dynamic_img_size": True, "depth": 2})])
def test_exported_swin_and_vit_students_segment_at_another_size(tmp_path, arch, model_args):
    """An export of a fixed-size family (built at its student size, 64 px) loads every tensor into the segmentation
    backbone and runs at another size (48x72); a 2-block ViT too (its last block, not timm's default last three)."""
    import json

    import timm

    torch.manual_seed(0)
    student = timm.create_model(arch, num_classes=0, **model_args)
    timm.models.save_for_hf(student, str(tmp_path / "s"), model_config={"pretrained_cfg": {"tag": "distill-test"}},
                            model_args=model_args, safe_serialization=True,
                            data_config={"input_size": (3, 64, 64), "mean": MEAN, "std": STD, "crop_pct": 1.0,
                                         "interpolation": "bilinear", "crop_mode": "center"})
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    cfg["distill"] = {"dataset": "image-folder", "data_channels": 3, "student_size": 64}
    (tmp_path / "s" / "config.json").write_text(json.dumps(cfg))
    bb = timm_backbone(parse_model_source(str(tmp_path / "s")), None, None, MEAN, STD, img_size=48)
    saved = list(student.state_dict().values())
    loaded = bb.model.state_dict()
    assert all(any(v.shape == w.shape and torch.equal(v, w) for w in saved) for v in loaded.values())
    out = SegModel(bb, build_decoder("fpn", bb.channels, 3, width=8))(torch.rand(1, 3, 48, 72))
    assert out.shape == (1, 3, 48, 72) and bb.reductions == [4, 8, 16, 32]


def test_a_level_the_backbone_lacks_is_one_error_naming_its_levels():
    """--levels 9 on a ResNet (5 levels) was an IndexError traceback from timm's feature_info, exit 1."""
    from distill.finetune.model import parse_model_source
    from distill.segment.model import timm_features

    with pytest.raises(ValueError, match=r"^levels 9: resnet18 has 5 feature levels, 0\.\.4 \(timm out_indices"):
        timm_features(parse_model_source("timm:resnet18"), [9])
    assert len(timm_features(parse_model_source("timm:resnet18"), [3, 4]).feature_info.channels()) == 2
