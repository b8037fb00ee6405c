"""distill.plots: readable heatmap text, probe bars from 0 with the probe's image count, '1 seed'."""
import pytest

from distill import plots


@pytest.fixture
def figures(monkeypatch):
    """Capture the figures the plot functions save (the PNG is not written)."""
    captured = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, dpi=plots.DPI: captured.append(fig) or path)
    return captured


def _luminance(rgb):  # WCAG 2.x relative luminance, written out independently of plots.text_color
    def lin(c):
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (lin(c) for c in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _contrast(a, b):
    hi, lo = max(_luminance(a), _luminance(b)), min(_luminance(a), _luminance(b))
    return (hi + 0.05) / (lo + 0.05)


@pytest.mark.parametrize("cmap", ["viridis", "magma", "coolwarm", "gray"])
def test_text_color_has_the_better_contrast_on_every_cell(cmap):
    from matplotlib import colormaps
    from matplotlib.colors import to_rgba

    for i in range(101):
        cell = colormaps[cmap](i / 100)
        chosen = plots.text_color(cell)
        other = "white" if chosen == "black" else "black"
        assert _contrast(cell, to_rgba(chosen)) >= _contrast(cell, to_rgba(other)) - 1e-6
        assert _contrast(cell, to_rgba(chosen)) >= 4.5 - 1e-6 or cmap == "coolwarm"  # WCAG AA for normal text


def test_heatmap_labels_use_the_readable_color(figures, tmp_path):
    from matplotlib.colors import to_rgba

    rows = [{"block": b, "timestep": t, "linear_top1": v} for b, t, v in
            [("a", 1, 10.0), ("a", 11, 50.0), ("b", 1, 90.0), ("b", 11, 70.0)]]
    plots.grid_heatmap(rows, tmp_path / "h.png")
    ax = figures[0].axes[0]
    im = ax.images[0]
    for text in ax.texts:
        cell = im.cmap(im.norm(float(text.get_text())))
        other = "white" if to_rgba(text.get_color()) == to_rgba("black") else "black"
        assert _contrast(cell, to_rgba(text.get_color())) >= _contrast(cell, to_rgba(other))
    colors = {text.get_text(): text.get_color() for text in ax.texts}
    assert colors["10.0"] == "white" and colors["90.0"] == "black"  # viridis: dark purple low, yellow high


def test_probe_bars_start_at_zero_and_say_how_many_images(figures, tmp_path):
    rows = [{"name": "distilled", "linear_top1": 85.2, "knn_top1": 82.4, "num_train": 12000, "num_test": 10000},
            {"name": "raw pixels", "linear_top1": 83.4, "knn_top1": 80.5, "num_train": 60000, "num_test": 10000}]
    plots.plot_probes(rows, tmp_path / "p.png")
    ax = figures[0].axes[0]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 100
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert "fit on 12,000 images" in labels[0] and "fit on 60,000 images" in labels[1]
    assert "10,000" in ax.get_title()


def test_fraction_plot_says_1_seed_and_ticks_every_fraction(figures, tmp_path):
    def row(label, f, n, kind):
        return {"label": label, "fraction": f, "model_kind": kind,
                "last_top1": {"mean": 50.0 + f, "min": 49.0, "max": 51.0 + f, "n": n}}
    rows = [row("d", f, 1, "exported") for f in (0.01, 0.1, 1.0)] + [row("s", f, 3, "timm") for f in (0.01, 1.0)]
    plots.plot_fraction(rows, tmp_path / "f.png")
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["d (1 seed)", "s (3 seeds)"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1%", "10%", "100%"]
    assert plots.seeds_label(1) == "1 seed" and plots.seeds_label(2) == "2 seeds"


# ----------------------------------------------------------------------------------------------- predictions.png legend
def _legend_entries(fig):
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 1
    return [(t.get_text(), tuple(round(c * 255) for c in h.get_facecolor()[:3]))
            for t, h in zip(legends[0].get_texts(), legends[0].legend_handles)]


def test_segmentation_grid_legend_names_the_shown_classes_in_their_colours(figures, tmp_path):
    import numpy as np

    names = ["road", "sky", "car", "person", "tree"]
    palette = [(128, 64, 128), (70, 130, 180), (0, 0, 142), (220, 20, 60), (107, 142, 35)]
    images = np.zeros((2, 3, 4, 4), np.uint8)
    masks = np.array([[[0, 0, 9, 9]] * 4, [[1, 1, 9, 9]] * 4])  # 9: ignore index
    preds = np.array([[[0, 3, 3, 0]] * 4, [[1, 1, 1, 1]] * 4])  # class 3 predicted, never in the masks
    plots.segmentation_grid(images, masks, preds, palette, 9, tmp_path / "p.png", class_names=names)
    # present: 0, 1 (masks), 3 (prediction); absent: car (2), tree (4); the ignore index is no class, and its
    # pixels are named last (the palette has no void colour: the first one no class has)
    assert _legend_entries(figures[0]) == [("road", palette[0]), ("sky", palette[1]), ("person", palette[3]),
                                           ("ignored (void)", (224, 224, 192))]
    assert plots.present_classes(masks, preds, 9, len(names)) == [0, 1, 3]


def _panel(fig, row, col):  # the RGB array drawn in panel (row, col): 0 image, 1 ground truth, 2 prediction
    import numpy as np

    return np.asarray(fig.axes[3 * row + col].images[0].get_array())


def test_void_pixels_are_drawn_in_the_layouts_void_colour_and_named_in_the_legend(figures, tmp_path):
    """VOC: ignored pixels (255) were drawn black, like the background class, with no legend entry; the layout's
    void colour (224, 224, 192) went unused. Now they are drawn in it and the legend names them."""
    import numpy as np

    from distill.data.seglayouts import VOC_CLASSES, layout_info

    info = layout_info("voc")
    masks = np.array([[[0, 0, 255, 255], [0, 0, 255, 255], [15, 15, 0, 0], [15, 15, 0, 0]]])  # background, person
    preds = np.array([[[0, 0, 15, 15]] * 4])
    plots.segmentation_grid(np.zeros((1, 3, 4, 4), np.uint8), masks, preds, info.palette, info.ignore_index,
                            tmp_path / "p.png", class_names=VOC_CLASSES)
    truth = _panel(figures[0], 0, 1)
    assert (truth[masks[0] == 255] == (224, 224, 192)).all()
    assert (truth[masks[0] == 0] == (0, 0, 0)).all()  # the background class keeps its black
    assert _legend_entries(figures[0]) == [("background", (0, 0, 0)), ("person", info.palette[15]),
                                           ("ignored (void)", (224, 224, 192))]


@pytest.mark.parametrize("palette, expected", [
    ([(0, 0, 0), (255, 255, 255), (0, 0, 0)], (224, 224, 192)),  # the void colour is a class's: another one
    ([(224, 224, 192), (255, 255, 255)], (255, 0, 255)),  # no void colour; the first fallbacks are classes'
    ([(10, 20, 30), (40, 50, 60), (0, 0, 0)], (0, 0, 0)),  # the palette's own void colour, distinct: kept
])
def test_the_void_colour_differs_from_every_class_colour(figures, tmp_path, palette, expected):
    import numpy as np

    assert plots.void_colour(palette, 2) == expected
    masks = np.array([[[0, 1, 9, 9]] * 4])
    plots.segmentation_grid(np.zeros((1, 3, 4, 4), np.uint8), masks, np.array([[[0, 1, 1, 0]] * 4]), palette, 9,
                            tmp_path / "p.png", class_names=["a", "b"])
    assert (_panel(figures[0], 0, 1)[masks[0] == 9] == expected).all()
    assert _legend_entries(figures[0])[-1] == ("ignored (void)", expected)
    taken = [(224, 224, 192), (255, 255, 255), (255, 0, 255), (0, 255, 255), (128, 128, 128), (0, 0, 0), (0, 0, 1)]
    assert plots.void_colour(taken, len(taken)) == (0, 0, 2)  # every fallback is a class's: the first free colour


def test_segmentation_grid_without_class_names_has_no_legend(figures, tmp_path):
    import numpy as np

    plots.segmentation_grid(np.zeros((1, 3, 4, 4), np.uint8), np.zeros((1, 4, 4), int), np.ones((1, 4, 4), int),
                            [(0, 0, 0), (255, 255, 255)], 255, tmp_path / "p.png")
    assert all(ax.get_legend() is None for ax in figures[0].axes)


def test_segmentation_predictions_png_legend_uses_the_data_class_names(monkeypatch, tmp_path):
    """The fine-tuning run passes its data's class names (CamVid's, or --class-names) to the grid."""
    from distill.segment import SegmentConfig, segment_finetune
    from distill.segment import run as seg_run

    from ._segment import IGNORE, NUM_CLASSES, write_shapes

    root = write_shapes(tmp_path / "shapes", {"train": 4, "test": 2})
    (tmp_path / "names.txt").write_text("background\nsquare\ndisc\n")
    seen = {}
    monkeypatch.setattr(seg_run, "segmentation_grid", lambda *a, **k: seen.update(k) or a[5])
    segment_finetune(SegmentConfig(model="timm:resnet10t", data_root=str(root), num_classes=NUM_CLASSES,
                                   ignore_index=IGNORE, steps=1, batch_size=2, decoder_width=8, grid_images=2,
                                   class_names=str(tmp_path / "names.txt")), str(tmp_path / "run"), progress=False)
    assert list(seen["class_names"]) == ["background", "square", "disc"]
