"""distill.segment.model: logits at the input size for sizes the backbone's strides do not divide, an export's
weights (BN statistics included) reach the features_only backbone, scratch is seeded and takes --like's model
arguments, a frozen backbone stays frozen, and a diffusion teacher's features serve as a backbone."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from distill.finetune.model import parse_model_source, read_export_config
from distill.segment.model import SegModel, TeacherBackbone, TimmBackbone, build_decoder, timm_features

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
