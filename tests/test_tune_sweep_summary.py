"""Statistics over seeds shared by ``distill report``'s classification and segmentation sections."""
import statistics

import numpy as np
import pytest

from distill.segment.report import summarize_segmentation
from distill.tune.sweep import group_by_label_fraction, seed_stats


def test_seed_stats_agree_with_numpy():
    vals = [31.5, 29.25, 33.0]
    s = seed_stats(vals)
    assert s["mean"] == pytest.approx(np.mean(vals))
    assert s["std"] == pytest.approx(np.std(vals, ddof=1))
    assert (s["min"], s["max"], s["n"]) == (29.25, 33.0, 3)
    assert seed_stats([4.0])["std"] == 0.0
    with pytest.raises(ValueError):
        seed_stats([])


def test_groups_are_label_and_fraction_sorted_by_seed():
    rs = [{"label": "a", "fraction": 0.1, "seed": 2}, {"label": "b", "fraction": 0.1, "seed": 0},
          {"label": "a", "fraction": "0.1", "seed": 0}, {"label": "a", "fraction": 1.0, "seed": 1}]
    g = group_by_label_fraction(rs)
    assert list(g) == [("a", 0.1), ("b", 0.1), ("a", 1.0)]
    assert [r["seed"] for r in g[("a", 0.1)]] == [0, 2]


def _seg(label, kind, frac, seed, miou):
    return {"label": label, "model_kind": kind, "fraction": frac, "seed": seed, "last_miou": miou,
            "last_pixel_acc": 80.0 + seed, "per_class_iou": {"road": miou + 1, "sky": miou - 1}, "steps": 10,
            "batch_size": 4, "input_size": 64, "augment": "flip", "optimizer": "adamw", "lr": 1e-3,
            "decoder": "fpn", "train_images": 36}


def test_segmentation_rows_average_seeds_and_subtract_scratch():
    rows = summarize_segmentation([_seg("distilled", "exported", 0.1, 0, 30.0), _seg("distilled", "exported", 0.1, 1, 32.0),
                                   _seg("scratch", "timm", 0.1, 0, 27.0), _seg("scratch", "timm", 0.1, 1, 28.0)])
    d = next(r for r in rows if r["label"] == "distilled")
    assert d["last_miou"]["mean"] == pytest.approx(31.0)
    assert d["per_class_iou"] == {"road": 32.0, "sky": 30.0}
    assert d["vs_scratch"] == pytest.approx(31.0 - statistics.fmean([27.0, 28.0]))
    assert next(r for r in rows if r["label"] == "scratch")["vs_scratch"] is None


def test_result_lines_count_one_image_in_the_singular():
    from distill.finetune.run import result_line

    r = {"label": "s", "fraction": 0.01, "train_images": 1, "seed": 0, "steps": 2, "last_top1": 10.0,
         "best_top1": 10.0, "best_step": 2, "top5_k": 5, "last_top5": 50.0, "seconds": 3}
    assert "(1 image)" in result_line(r)
    assert "(1,200 images)" in result_line({**r, "train_images": 1200})
    assert "seed 0, 2 steps:" in result_line(r) and "seed 0, 1 step:" in result_line({**r, "steps": 1})


def test_the_budget_label_counts_one_step_in_the_singular_and_names_the_decoder_for_segmentation():
    from distill.tune.sweep import budget_label

    r = {"steps": 1, "batch_size": 8, "input_size": 90, "augment": "crop-flip", "optimizer": "adamw", "lr": 0.001,
         "decoder": "fpn"}
    assert budget_label(r) == "1 step x 8, 90px, crop-flip, adamw lr 0.001"
    assert budget_label({**r, "steps": 300}, with_decoder=True) == "300 steps x 8, 90px, crop-flip, adamw lr 0.001, fpn decoder"
