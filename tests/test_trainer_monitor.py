"""The training monitor (distill.trainer.monitor, recipe monitor_every): on a tiny Fashion-MNIST run the monitored
kNN top-1 rises above its step-0 value; each value equals a kNN computed here by hand (cosine, k=20, T=0.07 votes)
on the checkpointed student; monitoring leaves training unchanged (same loss curve as an unmonitored run); rows
land in monitor.csv, a metrics.csv column and summary.json; unusable data is refused naming monitor_every."""
import csv
import shutil

import pytest
import torch
import torch.nn.functional as F

from distill.build import build_train_data
from distill.data import to_student, to_unit
from distill.trainer import load_trained, train
from distill.trainer.monitor import MONITOR_COLUMN, fixed_subset

from .conftest import fmnist_recipe, rgb_recipe


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _knn_by_hand(model, recipe, mean, std, n, k=20, t=0.07):
    """Top-1 (percent) of a weighted cosine kNN written out here: features of the fixed subsets, L2-normalised,
    each query's k most similar bank images vote exp(sim / t) for their class."""
    feats = {}
    for split in ("train", "test"):
        x, y = fixed_subset(build_train_data(recipe, split)[0], n)
        with torch.no_grad():
            feats[split] = (F.normalize(model.eval()(to_student(to_unit(x), recipe.student_size, mean, std)), dim=1), y)
    (bank, by), (q, qy) = feats["train"], feats["test"]
    sim, idx = (q @ bank.T).topk(k, dim=1)
    scores = torch.zeros(len(qy), int(by.max()) + 1).scatter_add_(1, by[idx], (sim / t).exp())
    return 100.0 * (scores.argmax(1) == qy).float().mean().item()


@pytest.fixture(scope="module")
def monitored(tmp_path_factory, fmnist_dir):
    """6 steps, the monitor every 3 (steps 0, 3, 6) on 200 + 200 images, a checkpoint at 3 and 6; and the same run
    without the monitor."""
    base = tmp_path_factory.mktemp("monitor")
    kw = dict(steps=6, checkpoint_every=3, keep_checkpoints=5, log_every=2)
    r = fmnist_recipe(fmnist_dir, monitor_every=3, monitor_images=200, **kw)
    summary = train(r, str(base / "on"), progress=False)
    train(fmnist_recipe(fmnist_dir, **kw), str(base / "off"), progress=False)
    return base, r, summary


def test_monitored_knn_rises_above_step_0_and_equals_a_knn_by_hand(monitored):
    base, recipe, summary = monitored
    rows = _rows(base / "on" / "monitor.csv")
    assert [int(r["step"]) for r in rows] == [0, 3, 6]
    top1 = [float(r["knn_top1"]) for r in rows]
    assert top1[-1] > top1[0] + 5, top1  # the student's features separate the classes better than at step 0
    assert {int(r["train_images"]) for r in rows} == {200} and {int(r["test_images"]) for r in rows} == {200}
    for step, value in ((3, top1[1]), (6, top1[2])):
        model, _, resolved = load_trained(str(base / "on"), f"checkpoint-{step}")
        expected = _knn_by_hand(model.student.model, recipe, resolved["mean"], resolved["std"], 200)
        assert value == pytest.approx(expected, abs=0.51), step  # one image of 200 is 0.5 points
    assert summary["monitor"]["knn_top1"] == top1[-1] and summary["monitor"]["step"] == 6


def test_metrics_csv_has_the_column_at_monitored_steps_only(monitored):
    base, _, _ = monitored
    rows = _rows(base / "on" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 6]  # log_every 2, plus the monitored step 3
    monitor = {int(r["step"]): float(r["knn_top1"]) for r in _rows(base / "on" / "monitor.csv")}
    for r in rows:
        step = int(r["step"])
        assert r[MONITOR_COLUMN] == ("" if step not in monitor else str(monitor[step])), r


def test_monitoring_does_not_change_training(monitored):
    base, _, _ = monitored
    on = {int(r["step"]): r["total"] for r in _rows(base / "on" / "metrics.csv")}
    off = {int(r["step"]): r["total"] for r in _rows(base / "off" / "metrics.csv")}
    assert all(on[s] == off[s] for s in off), (on, off)  # same RNG stream, same BN statistics
    from safetensors.torch import load_file

    a, b = (load_file(str(base / d / "checkpoint-6" / "model.safetensors")) for d in ("on", "off"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_monitor_without_a_test_split_is_refused_naming_the_key(rgb_folder, tmp_path):
    root = tmp_path / "imgs"
    shutil.copytree(rgb_folder / "train", root / "train")
    with pytest.raises(ValueError, match="monitor_every: 2 needs the dataset's test split.*monitor_every: 0"):
        train(rgb_recipe(root, monitor_every=2), str(tmp_path / "run"), progress=False)


@pytest.mark.parametrize("key, value, text", [("monitor_every", -1, "monitor_every must be >= 0"),
                                              ("monitor_images", 1, "monitor_images must be >= 2")])
def test_bad_monitor_keys_are_refused(rgb_folder, key, value, text):
    with pytest.raises(ValueError, match=text):
        rgb_recipe(rgb_folder, **{key: value})


def test_monitor_pairs_test_labels_with_the_training_classes_by_name(tmp_path):
    from distill.trainer.monitor import Monitor

    from .test_data_classes import image_folder

    image_folder(tmp_path / "d", {"train": {"cat": 3, "dog": 3, "ship": 3}, "test": {"dog": 2, "ship": 2}})
    m = Monitor(rgb_recipe(tmp_path / "d", monitor_every=2, monitor_images=100), [0.5] * 3, [0.25] * 3, "cpu")
    assert m.train[1].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert m.test[1].tolist() == [1, 1, 2, 2]  # dog and ship as in train/, not shifted onto cat and dog
    image_folder(tmp_path / "e", {"train": {"cat": 3, "dog": 3}, "test": {"cat": 2, "horse": 2}})
    with pytest.raises(ValueError, match="monitor_every: 2 needs.*'horse'.*training split lacks.*monitor_every: 0"):
        Monitor(rgb_recipe(tmp_path / "e", monitor_every=2, monitor_images=100, batch_size=2), [0.5] * 3, [0.25] * 3,
                "cpu")
