"""Tests of distill.cache: the teacher-feature cache (`distill extract`), its key checks and reading it in training."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from distill.cache import (MANIFEST, CacheMismatchError, FeatureCache, IncompleteCacheError,
                           check_recipe_for_cache, expected_key, extract_features_cache,
                           open_for_recipe)
from distill.config import make_recipe
from distill.data import IndexedDataset, collate, collate_indexed, to_teacher, to_unit
from distill.losses import feature_distillation_loss
from distill.teacher import load_teacher
from distill.trainer import build_model, build_teacher, build_train_data

N_IMAGES, DRAWS, BATCH = 40, 3, 16  # 40 = 16 + 16 + 8: the last batch is partial
KEYS = ["mid_block@t11", "up_blocks.0@t11"]


def _recipe(fmnist_dir, teacher, **kw):
    base = dict(teacher=str(teacher), teacher_blocks=["mid_block", "up_blocks.0"], timesteps=[11],
                data_root=fmnist_dir, student="resnet18", student_size=32, regressor_width=16, batch_size=BATCH,
                augment="none", mean=[0.286] * 3, std=[0.353] * 3, seed=0, lr=2e-3)
    base.update(kw)
    return make_recipe(base)


def _subset(recipe, n=N_IMAGES, start=0):
    ds, ch = build_train_data(recipe)
    return Subset(ds, list(range(start, start + n))), ch


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, fmnist_dir, tiny_pipeline_dir):
    out = tmp_path_factory.mktemp("cache") / "c"
    res = extract_features_cache(_recipe(fmnist_dir, tiny_pipeline_dir), out, num_draws=DRAWS, batch_size=BATCH,
                                 max_images=N_IMAGES, progress=False)
    assert res["num_images"] == N_IMAGES and res["keys"] == KEYS
    return out


@pytest.fixture
def expect(fmnist_dir, tiny_pipeline_dir):
    """The key a run on the same recipe and the same 40 images expects (built independently of the cache)."""
    recipe = _recipe(fmnist_dir, tiny_pipeline_dir)
    ds, ch = _subset(recipe)
    return expected_key(recipe, ds, build_teacher(recipe, ch), ch)


def test_cached_features_equal_live_teacher(cache_dir, fmnist_dir, tiny_pipeline_dir, expect):
    cache = FeatureCache(cache_dir, expect=expect)
    assert cache.keys == KEYS and cache.num_images == N_IMAGES and cache.num_draws == DRAWS
    m = json.loads((cache_dir / MANIFEST).read_text())
    assert m["key"]["timesteps"] == [11] and m["key"]["blocks"] == ["mid_block", "up_blocks.0"]
    assert m["key"]["dtype"] == "float16" and m["seed"] == 0 and m["shapes"]["mid_block@t11"][:2] == [N_IMAGES, DRAWS]
    teacher = load_teacher(str(tiny_pipeline_dir), ["mid_block", "up_blocks.0"], [11])
    assert [(f.key, f.num_chs, f.size) for f in cache.feature_info] == [(f.key, f.num_chs, f.size)
                                                                         for f in teacher.feature_info]
    recipe = _recipe(fmnist_dir, tiny_pipeline_dir)
    ds, _ = _subset(recipe)
    g = torch.Generator().manual_seed(0)  # the recipe's seed; one generator consumed batch after batch
    for start in range(0, N_IMAGES, BATCH):
        images = torch.stack([ds[i][0] for i in range(start, min(start + BATCH, N_IMAGES))])
        B = len(images)
        x = to_teacher(to_unit(images), 1, 32)  # the clean image, as the trainer converts it
        live = teacher(x.repeat(DRAWS, 1, 1, 1), generator=g)  # draw-major: draw d is rows d*B:(d+1)*B
        for d in range(DRAWS):
            got = cache.targets(range(start, start + B), [d] * B)
            for k, t in zip(KEYS, got):
                assert t.dtype == torch.float32
                torch.testing.assert_close(t, live[k][d * B:(d + 1) * B], rtol=2e-3, atol=2e-3)
                # exactly the fp16 rounding of the live feature
                torch.testing.assert_close(t, live[k][d * B:(d + 1) * B].half().float(), rtol=0, atol=0)


def test_draws_differ_and_draw_choice(cache_dir):
    cache = FeatureCache(cache_dir)
    for k in KEYS:
        a = np.asarray(cache.arrays[k], dtype=np.float32)  # (N, D, C, H, W)
        for d in range(1, DRAWS):
            diff = np.abs(a[:, 0] - a[:, d]).mean()
            assert diff > 1e-3 * np.abs(a).mean(), (k, d, diff)
        # images differ more from each other than draws of one image (t=11 is little noise)
        assert np.abs(a[:, 0] - a[:, 1]).mean() < np.abs(a[:-1, 0] - a[1:, 0]).mean()
    idx = torch.arange(N_IMAGES)
    d1, d1b, d2 = cache.draw_ids(idx, step=1, seed=0), cache.draw_ids(idx, step=1, seed=0), cache.draw_ids(idx, 2, 0)
    assert torch.equal(d1, d1b) and not torch.equal(d1, d2)  # deterministic (resume), fresh each step
    assert int(d1.min()) >= 0 and int(d1.max()) < DRAWS
    assert torch.equal(cache.draw_ids(idx[5:9], 1, 0), d1[5:9])  # independent of the batch it is in
    counts = torch.bincount(torch.cat([cache.draw_ids(idx, s, 0) for s in range(50)]), minlength=DRAWS)
    assert counts.min() > 0.25 * counts.sum() / DRAWS  # every draw is used


def test_memmap_reading(cache_dir):
    cache = FeatureCache(cache_dir)
    for k in KEYS:
        assert isinstance(cache.arrays[k], np.memmap) and cache.arrays[k].dtype == np.float16
        assert not cache.arrays[k].flags.writeable
    idx, draws = torch.tensor([7, 0, 39, 7]), torch.tensor([2, 1, 0, 0])
    got = cache.targets(idx, draws, keys=["up_blocks.0@t11"])
    assert len(got) == 1 and got[0].shape == (4, 16, 16, 16)
    for i, (n, d) in enumerate(zip(idx.tolist(), draws.tolist())):
        assert torch.equal(got[0][i], torch.from_numpy(np.array(cache.arrays["up_blocks.0@t11"][n, d])).float())
    # groups of keys are concatenated along channels (the trainer's multi_timestep: concat layout)
    (cat,) = cache.targets(idx, draws, keys=[["up_blocks.0@t11", "up_blocks.0@t11"]])
    assert cat.shape == (4, 16 + 16, 16, 16) and torch.equal(cat[:, 16:], got[0])
    with pytest.raises(IndexError):
        cache.targets([N_IMAGES], [0])
    with pytest.raises(IndexError):
        cache.targets([0], [DRAWS])
    with pytest.raises(KeyError, match="mid_block@t11"):
        cache.targets([0], [0], keys=["nope@t1"])


def _tiny_other_blocks(fmnist_dir, tiny_pipeline_dir):
    r = _recipe(fmnist_dir, tiny_pipeline_dir, teacher_blocks=["up_blocks.0"])
    ds, ch = _subset(r)
    return expected_key(r, ds, build_teacher(r, ch), ch)


def _changed(fmnist_dir, tiny_pipeline_dir, what):
    r = _recipe(fmnist_dir, tiny_pipeline_dir)
    ds, ch = _subset(r)
    teacher = build_teacher(r, ch)
    if what == "weights":  # one value of one tensor, by the smallest step fp32 allows
        w = teacher.model.conv_in.weight
        with torch.no_grad():
            w.view(-1)[3] = torch.nextafter(w.view(-1)[3], torch.tensor(np.inf))
        return expected_key(r, ds, teacher, ch), ["teacher_sha256"]
    if what == "blocks":
        return _tiny_other_blocks(fmnist_dir, tiny_pipeline_dir), ["blocks"]
    if what == "timesteps":
        r2 = _recipe(fmnist_dir, tiny_pipeline_dir, timesteps=[5, 11])
        return expected_key(r2, ds, build_teacher(r2, ch), ch), ["timesteps"]
    if what == "draws":
        return expected_key(r, ds, teacher, ch, num_draws=DRAWS + 1), ["num_draws"]
    if what == "dataset size":
        ds2, _ = _subset(r, N_IMAGES + 1)
        return expected_key(r, ds2, teacher, ch), ["num_images", "data_sha256"]
    if what == "dataset content":  # same size, other images
        ds2, _ = _subset(r, N_IMAGES, start=1)
        return expected_key(r, ds2, teacher, ch), ["data_sha256"]
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["weights", "blocks", "timesteps", "draws", "dataset size", "dataset content"])
def test_mismatch_is_refused_naming_the_field(cache_dir, fmnist_dir, tiny_pipeline_dir, what, expect):
    want, fields = _changed(fmnist_dir, tiny_pipeline_dir, what)
    with pytest.raises(CacheMismatchError) as e:
        FeatureCache(cache_dir, expect=want)
    msg = str(e.value)
    for f in fields:
        assert f"  {f}: cached " in msg, msg
    named = [line.split(":")[0].strip() for line in msg.splitlines() if ": cached " in line]
    assert sorted(named) == sorted(fields), msg  # and nothing else
    assert "distill extract RECIPE -o" in msg and "--overwrite" in msg and "feature_cache" in msg
    FeatureCache(cache_dir, expect=expect)  # the matching key is accepted


def test_weights_file_changed_by_one_value(cache_dir, fmnist_dir, tiny_pipeline_dir, tmp_path):
    """The same check through the files: a copy of the teacher with one weight changed gets another hash."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "teacher"
    shutil.copytree(tiny_pipeline_dir, copy)
    f = copy / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    name = sorted(sd)[0]
    sd[name].view(-1)[0] += 1e-3
    save_file(sd, str(f))
    r = _recipe(fmnist_dir, tiny_pipeline_dir)
    ds, ch = _subset(r)
    same = expected_key(r, ds, build_teacher(_recipe(fmnist_dir, tiny_pipeline_dir), ch), ch)
    other = expected_key(r, ds, build_teacher(_recipe(fmnist_dir, copy), ch), ch)
    assert same["teacher_sha256"] != other["teacher_sha256"]
    with pytest.raises(CacheMismatchError, match="teacher_sha256"):
        FeatureCache(cache_dir, expect=other)


def test_open_for_recipe_checks_augment_and_key(cache_dir, fmnist_dir, tiny_pipeline_dir):
    r = _recipe(fmnist_dir, tiny_pipeline_dir)
    ds, ch = _subset(r)
    teacher = build_teacher(r, ch)
    cache = open_for_recipe(r, ds, teacher, ch, path=cache_dir)
    assert cache.num_images == N_IMAGES
    with pytest.raises(ValueError) as e:
        open_for_recipe(_recipe(fmnist_dir, tiny_pipeline_dir, augment="crop-flip"), ds, teacher, ch, path=cache_dir)
    assert "'augment'" in str(e.value) and "'feature_cache'" in str(e.value) and "augment=none" in str(e.value)
    full, _ = build_train_data(r)  # a run on the whole training set: the 40-image cache does not cover it
    with pytest.raises(CacheMismatchError, match="num_images: cached 40 vs expected 60000"):
        open_for_recipe(r, full, teacher, ch, path=cache_dir)
    check_recipe_for_cache(r)


def test_half_written_cache_is_refused(cache_dir, tmp_path, fmnist_dir, tiny_pipeline_dir, monkeypatch):
    # no manifest: what a killed extraction leaves in its temporary directory
    partial = tmp_path / ".tmp-c-123"
    shutil.copytree(cache_dir, partial)
    (partial / MANIFEST).unlink()
    with pytest.raises(IncompleteCacheError, match="no manifest.json"):
        FeatureCache(partial)
    # a truncated feature file
    trunc = tmp_path / "trunc"
    shutil.copytree(cache_dir, trunc)
    f = trunc / "up_blocks.0@t11.npy"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    with pytest.raises(IncompleteCacheError, match="truncated"):
        FeatureCache(trunc)
    # a missing feature file, a manifest that is not JSON
    gone = tmp_path / "gone"
    shutil.copytree(cache_dir, gone)
    (gone / "mid_block@t11.npy").unlink()
    with pytest.raises(IncompleteCacheError, match="lacks mid_block@t11.npy"):
        FeatureCache(gone)
    (gone / MANIFEST).write_text('{"format": "distill-feature-ca')
    with pytest.raises(IncompleteCacheError, match="not valid JSON"):
        FeatureCache(gone)
    with pytest.raises(FileNotFoundError, match="distill extract"):
        FeatureCache(tmp_path / "nothing")
    # an extraction that fails half-way leaves neither the cache nor its temporary directory
    import distill.cache as cache_mod

    calls = {"n": 0}
    real = cache_mod.extract_batch

    def failing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")
        return real(*a, **kw)

    monkeypatch.setattr(cache_mod, "extract_batch", failing)
    out = tmp_path / "out" / "cache"
    with pytest.raises(RuntimeError, match="killed"):
        extract_features_cache(_recipe(fmnist_dir, tiny_pipeline_dir), out, num_draws=1, batch_size=BATCH,
                               max_images=N_IMAGES, progress=False)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_overwrite_protection_and_stale_tmp(cache_dir, tmp_path, fmnist_dir, tiny_pipeline_dir):
    out = tmp_path / "c"
    shutil.copytree(cache_dir, out)
    before = (out / MANIFEST).read_text()
    r = _recipe(fmnist_dir, tiny_pipeline_dir)
    with pytest.raises(FileExistsError, match="pass overwrite=True to replace"):
        extract_features_cache(r, out, num_draws=1, max_images=8, progress=False)
    assert (out / MANIFEST).read_text() == before  # untouched
    # a stale temporary directory of a dead writer is cleaned up by the next extraction
    stale = tmp_path / ".tmp-c-999999999-deadbeef"
    stale.mkdir()
    res = extract_features_cache(r, out, num_draws=1, max_images=8, progress=False, overwrite=True)
    assert not stale.exists()
    assert FeatureCache(out).num_draws == 1 and FeatureCache(out).num_images == 8 and res["bytes_per_image"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    # --overwrite never deletes a directory that is not a cache
    other = tmp_path / "mydata"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a feature cache"):
        extract_features_cache(r, other, num_draws=1, max_images=8, progress=False, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    # ... nor one whose manifest.json is another tool's, nor a folder of other JSON files, nor a cache with more
    for name, files in (("webapp", {"manifest.json": '{"name": "webapp"}', "src.js": "code"}),
                        ("settings", {"settings.json": "{}", "data.json": "[]"})):
        d = tmp_path / name
        d.mkdir()
        for f, text in files.items():
            (d / f).write_text(text)
        with pytest.raises(FileExistsError, match="not a feature cache made by distill extract"):
            extract_features_cache(r, d, num_draws=1, max_images=8, progress=False, overwrite=True)
        assert {p.name: p.read_text() for p in d.iterdir()} == files
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine.txt"):
        extract_features_cache(r, out, num_draws=1, max_images=8, progress=False, overwrite=True)
    assert (out / "mine.txt").exists()


def test_train_steps_from_cache(cache_dir, fmnist_dir, tiny_pipeline_dir):
    """The integration the trainer does: indexed batches, one draw per image and step, targets from the cache."""
    r = _recipe(fmnist_dir, tiny_pipeline_dir)
    ds, _ = _subset(r)
    cache = FeatureCache(cache_dir)
    torch.manual_seed(0)
    model = build_model(r, cache)  # feature_info from the manifest: no teacher needed to build the regressor
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    loader = DataLoader(IndexedDataset(ds), batch_size=BATCH, shuffle=True, drop_last=True,
                        collate_fn=collate_indexed, generator=torch.Generator().manual_seed(0))
    from distill.data import to_student

    def train_step(images, idx, step):
        targets = cache.targets(idx, cache.draw_ids(idx, step, r.seed), cache.keys)
        preds = model(to_student(to_unit(images), r.student_size, r.mean, r.std))
        assert [p.shape for p in preds] == [t.shape for t in targets]
        loss = feature_distillation_loss(preds, targets)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    batches = list(loader)  # one epoch: 2 batches of 16 (the last 8 images dropped)
    assert len(batches) == 2
    for images, labels, idx in batches:
        assert images.dtype == torch.uint8 and idx.dtype == torch.int64 and len(idx) == BATCH
        assert torch.equal(labels, torch.tensor([ds[i][1] for i in idx.tolist()]))
    images, _, idx = batches[0]
    losses = [train_step(images, idx, s) for s in (1, 2, 3, 4)]  # same images, a fresh draw each step
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    # collate_indexed agrees with the plain collate on images and labels
    items = [IndexedDataset(ds)[i] for i in (3, 1)]
    a, b = collate_indexed(items), collate([it[:2] for it in items])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2].tolist() == [3, 1]


def test_cli_extract(tmp_path, fmnist_dir, tiny_pipeline_dir, capsys):
    from distill.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"teacher: {tiny_pipeline_dir}\nteacher_blocks: [mid_block]\ntimesteps: [11]\n"
                      f"data_root: {fmnist_dir}\nbatch_size: 8\naugment: none\n")
    out = tmp_path / "cache"
    args = ["extract", str(recipe), "--out", str(out), "--draws", "2", "--max-images", "12", "--no-progress",
            "--set", "timesteps=[3]"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "12 images x 2 draws of mid_block@t3" in printed and "KiB per image" in printed and " s\n" in printed
    c = FeatureCache(out)
    assert c.key["timesteps"] == [3] and c.manifest["batch_size"] == 8
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--batch-size", "5"]) == 0
    assert FeatureCache(out).manifest["batch_size"] == 5
    assert main(["extract", str(recipe), "--out", str(tmp_path / "x"), "--set", "timesteps=auto-grid",
                 "--no-progress"]) == 2
    assert "explicit list" in capsys.readouterr().err


def test_distill_train_reads_the_cache_and_refuses_a_stale_one(tmp_path, rgb_folder):
    """`train()` with feature_cache: no teacher forward during training, losses fall, a cache of other timesteps is
    refused before any step."""
    from distill.trainer import train
    import distill.teacher as T

    from .conftest import tiny_unet_config

    base = dict(teacher=tiny_unet_config(3), teacher_blocks=["up_blocks.0"], timesteps=[11], dataset="image-folder",
                data_root=str(rgb_folder), student="resnet18", student_size=32, regressor_width=16, batch_size=12,
                augment="none", mean=[0.5] * 3, std=[0.25] * 3, steps=6, lr=2e-3, warmup_steps=1, log_every=1)
    extract_features_cache(make_recipe(base), tmp_path / "cache", num_draws=2, batch_size=12, progress=False)
    calls = []
    orig = T.DiffusionTeacher._run
    T.DiffusionTeacher._run = lambda self, x, t, stop: calls.append(x.shape[0]) or orig(self, x, t, stop)
    try:
        summary = train(make_recipe({**base, "feature_cache": str(tmp_path / "cache")}), str(tmp_path / "run"),
                        progress=False)
    finally:
        T.DiffusionTeacher._run = orig
    assert all(n == 1 for n in calls)  # only the one-image dry runs of building the teacher: no batch forward
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert len(rows) == 6 and float(rows[-1]["total"]) < float(rows[0]["total"])
    assert summary["steps"] == 6
    with pytest.raises(CacheMismatchError, match="timesteps"):
        train(make_recipe({**base, "timesteps": [50], "feature_cache": str(tmp_path / "cache")}),
              str(tmp_path / "run2"), progress=False)
    with pytest.raises(ValueError, match="augment"):
        train(make_recipe({**base, "augment": "flip", "feature_cache": str(tmp_path / "cache")}),
              str(tmp_path / "run3"), progress=False)


# ----------------------------------------------------------------------------------------------- shards and files
def test_foreign_or_edited_shard_is_refused(cache_dir, tmp_path, fmnist_dir, tiny_pipeline_dir):
    """Every shard is tied to the manifest: a shard of another cache (same name and shape, other noise) is refused
    on open; an edit of one value is refused by verify='full'; a manifest without shard records is refused."""
    other = tmp_path / "other"
    extract_features_cache(_recipe(fmnist_dir, tiny_pipeline_dir), other, num_draws=DRAWS, batch_size=BATCH,
                           max_images=N_IMAGES, progress=False, seed=1)
    mixed = tmp_path / "mixed"
    shutil.copytree(cache_dir, mixed)
    shutil.copy2(other / "up_blocks.0@t11.npy", mixed / "up_blocks.0@t11.npy")
    assert (mixed / "up_blocks.0@t11.npy").stat().st_size == (cache_dir / "up_blocks.0@t11.npy").stat().st_size
    with pytest.raises(CacheMismatchError, match=r"shard '.*up_blocks\.0@t11\.npy' is refused.*another cache"):
        FeatureCache(mixed)
    FeatureCache(other, verify="full")  # each cache is whole on its own
    edited = tmp_path / "edited"
    shutil.copytree(cache_dir, edited)
    f = edited / "up_blocks.0@t11.npy"  # 983,040 bytes: larger than the 64 sampled blocks
    size = f.stat().st_size
    starts = [max(0, size - 4096) * i // 63 for i in range(64)]  # the 64 sampled 4 KiB blocks
    gap, at = max((b - a - 4096, a + 4096) for a, b in zip(starts, starts[1:]))
    assert gap > 0
    with open(f, "r+b") as fh:  # flip one byte between two sampled blocks
        fh.seek(at)
        b = fh.read(1)
        fh.seek(at)
        fh.write(bytes([b[0] ^ 0xFF]))
    FeatureCache(edited)  # documented: the sampled check reads 256 KiB per shard and misses this byte
    with pytest.raises(CacheMismatchError, match="sha256 of the whole file"):
        FeatureCache(edited, verify="full")
    with pytest.raises(ValueError, match="'all'"):
        FeatureCache(cache_dir, verify="all")
    m = json.loads((edited / MANIFEST).read_text())
    del m["shards"]
    (edited / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CacheMismatchError, match="records no size and hash"):
        FeatureCache(edited)


def test_image_folder_key_covers_every_file_and_non_utf8_names(tmp_path, rgb_folder):
    """`distill extract` on a folder holding a file whose name is not UTF-8; then an in-place edit of an image in the
    middle of the folder changes data_sha256 (and nothing else), so the cache is refused."""
    from PIL import Image

    from distill.cli import main

    from .conftest import tiny_unet_config

    root = tmp_path / "imgs"
    shutil.copytree(rgb_folder, root)
    cat = root / "train" / "cat"
    os.rename(cat / "0003.jpg", os.path.join(os.fsencode(cat), b"\xff-caf\xe9.jpg"))
    base = dict(teacher=tiny_unet_config(3), teacher_blocks=["up_blocks.0"], timesteps=[11], dataset="image-folder",
                data_root=str(root), student="resnet18", student_size=32, batch_size=12, augment="none",
                mean=[0.5] * 3, std=[0.25] * 3)
    (tmp_path / "r.yaml").write_text(json.dumps(base))  # JSON is YAML
    assert main(["extract", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "cache"), "--draws", "1",
                 "--no-progress"]) == 0
    recipe = make_recipe(base)

    def key():
        from accelerate.utils import set_seed

        set_seed(recipe.seed)  # a config-dict teacher is a seeded random init, as extract builds it
        ds, ch = build_train_data(recipe)
        return expected_key(recipe, ds, build_teacher(recipe, ch), ch, num_draws=1)

    FeatureCache(tmp_path / "cache", expect=key())
    ds, _ = build_train_data(recipe)
    assert len(ds) == 36 and any(b"\xff-caf\xe9" in os.fsencode(p) for p, _ in ds.files)
    middle = ds.files[18][0]
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(middle, format="JPEG")
    with pytest.raises(CacheMismatchError) as e:
        FeatureCache(tmp_path / "cache", expect=key())
    assert [line.split(":")[0].strip() for line in str(e.value).splitlines() if ": cached " in line] == ["data_sha256"]


# ----------------------------------------------------------------------- every field of the key, one at a time
NET_SOURCE = '''import torch.nn as nn


class Net(nn.Module):
    def __init__(self, in_channels=3, width=4, image_size=16):
        super().__init__()
        self.in_channels, self.image_size = in_channels, image_size
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.mid = nn.Conv2d(width, width, 3, stride=2, padding=1)

    def forward(self, x, t):
        return self.mid(self.conv(x))


def make(**kw):
    return Net(**kw)
'''


@pytest.fixture(scope="module")
def key_env(tmp_path_factory, rgb_folder):
    """A python: teacher file, a 3-channel DDPM pipeline and a DiT pipeline with a VAE (tiny), in a temp dir."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from ._tiny_latent import save_dit_pipeline, tiny_dit_config, tiny_vae_config
    from .conftest import tiny_unet_config

    root = tmp_path_factory.mktemp("key")
    (root / "net.py").write_text(NET_SOURCE)
    torch.manual_seed(0)
    DDPMPipeline(unet=UNet2DModel(**tiny_unet_config(3)), scheduler=DDPMScheduler()).save_pretrained(root / "ddpm")
    save_dit_pipeline(root / "dit", tiny_dit_config(sample_size=8), tiny_vae_config())
    return root


def _key(env, rgb_folder, fmnist_dir, *, n=12, start=0, split="train", draws=2, seed=0, **kw):
    """The cache key of a run: a python: teacher (``env/net.py``) on 12 images of the RGB folder unless ``kw``
    says otherwise; the teacher built after ``torch.manual_seed(seed)`` (its random init)."""
    base = dict(dataset="image-folder", data_root=str(rgb_folder), teacher=f"python:{env / 'net.py'}:make",
                teacher_blocks=["mid"], timesteps=[11], augment="none", mean=[0.5] * 3, std=[0.25] * 3)
    if kw.get("dataset") == "fashion-mnist":
        base.update(data_root=fmnist_dir)
    recipe = make_recipe({**base, **kw})
    ds, ch = build_train_data(recipe, split)
    torch.manual_seed(seed)
    teacher = build_teacher(recipe, ch)
    return expected_key(recipe, Subset(ds, list(range(start, start + n))), teacher, ch, draws)


def _edit_json(path, **values):
    cfg = json.loads(path.read_text())
    cfg.update(values)
    path.write_text(json.dumps(cfg))


def _copy(env, name, new):
    shutil.rmtree(env / new, ignore_errors=True)
    (shutil.copytree if (env / name).is_dir() else shutil.copy)(env / name, env / new)
    return env / new


def _case_code(env, k):  # the python: teacher's source edited, weights and everything else unchanged
    net = _copy(env, "net.py", "net_code.py")
    before = k(teacher=f"python:{net}:make")
    net.write_text(NET_SOURCE.replace("return self.mid(self.conv(x))", "return 2 * self.mid(self.conv(x))"))
    return before, k(teacher=f"python:{net}:make")


def _case_model_config(env, k):  # a UNet setting that changes no tensor (GroupNorm eps)
    d = _copy(env, "ddpm", "ddpm_cfg")
    before = k(teacher=str(d), teacher_blocks=["mid_block"])
    _edit_json(d / "unet" / "config.json", norm_eps=1e-3)
    return before, k(teacher=str(d), teacher_blocks=["mid_block"])


def _case_scheduler_file(env, k):  # the pipeline's scheduler_config.json edited
    d = _copy(env, "ddpm", "ddpm_sched")
    before = k(teacher=str(d), teacher_blocks=["mid_block"])
    _edit_json(d / "scheduler" / "scheduler_config.json", beta_end=0.03)
    return before, k(teacher=str(d), teacher_blocks=["mid_block"])


def _case_vae_config(env, k):  # the VAE's scaling_factor (shapes every latent, changes no tensor)
    d = _copy(env, "dit", "dit_vae")
    before = k(teacher=str(d), teacher_blocks=["transformer_blocks.1"])
    _edit_json(d / "vae" / "config.json", scaling_factor=0.5)
    return before, k(teacher=str(d), teacher_blocks=["transformer_blocks.1"])


#: field -> (base key, changed key) from a change of what that field records; constants of this version
#: (format_version, dtype) are left out: they change only with the code, and format_version is checked first
KEY_CASES = {
    "teacher": lambda env, k: (k(), k(teacher=f"python:{_copy(env, 'net.py', 'net_copy.py')}:make")),
    "teacher_kwargs": lambda env, k: (k(), k(teacher_kwargs={"width": 4})),  # the default, spelled out
    "teacher_sha256": lambda env, k: (k(), k(seed=1)),
    "teacher_code_sha256": _case_code,
    "model_config_sha256": _case_model_config,
    "scheduler_sha256": lambda env, k: (k(), k(teacher_scheduler={"beta_schedule": "linear", "beta_end": 0.03})),
    "vae_dtype": lambda env, k: (k(teacher=str(env / "dit"), teacher_blocks=["transformer_blocks.1"]),
                                 k(teacher=str(env / "dit"), teacher_blocks=["transformer_blocks.1"],
                                   vae_dtype="bfloat16")),
    "vae_config_sha256": _case_vae_config,
    "teacher_dtype": lambda env, k: (k(), k(teacher_dtype="bfloat16")),
    "blocks": lambda env, k: (k(), k(teacher_blocks=["conv"])),
    "timesteps": lambda env, k: (k(), k(timesteps=[5])),
    "sample_size": lambda env, k: (k(), k(teacher_resolution=32)),
    "in_channels": lambda env, k: (k(image_channels=1), k(image_channels=1, teacher_kwargs={"in_channels": 1})),
    "dataset": lambda env, k: (k(), k(dataset="fashion-mnist")),
    "data_root": lambda env, k: (k(), k(data_root=str(env / "imgs-copy"))),  # a copy of the same images
    "split": lambda env, k: (k(dataset="fashion-mnist"), k(dataset="fashion-mnist", split="test")),
    "data_channels": lambda env, k: (k(), k(image_channels=1)),
    "num_images": lambda env, k: (k(), k(n=11)),
    "decode": lambda env, k: (k(), k(image_resize="squash")),
    "data_hash": lambda env, k: (k(), k(data_hash="content")),
    "data_sha256": lambda env, k: (k(), k(start=1)),
    "num_draws": lambda env, k: (k(), k(draws=3)),
}


def test_the_key_cases_cover_every_field(key_env, rgb_folder, fmnist_dir):
    """A field added to the key needs a case below (and a field dropped from it fails its case)."""
    key = _key(key_env, rgb_folder, fmnist_dir)
    assert set(KEY_CASES) == set(key) - {"format_version", "dtype"}


@pytest.mark.parametrize("field", list(KEY_CASES))
def test_changing_what_a_key_field_records_is_refused(field, key_env, rgb_folder, fmnist_dir, tmp_path):
    """Each field of the cache key in turn: change what it records (the teacher's code, a scheduler or VAE
    setting, the data, ...), keep the rest; a cache made before the change is refused, naming that field."""
    from distill.cache import FORMAT, FORMAT_VERSION

    if field == "data_root" and not (key_env / "imgs-copy").exists():
        shutil.copytree(rgb_folder, key_env / "imgs-copy")
    before, after = KEY_CASES[field](key_env, lambda **kw: _key(key_env, rgb_folder, fmnist_dir, **kw))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / MANIFEST).write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                                                       "key": before, "files": {}, "shapes": {}, "feature_info": []}))
    FeatureCache(tmp_path / "c", expect=before)  # the unchanged run is accepted
    with pytest.raises(CacheMismatchError) as e:
        FeatureCache(tmp_path / "c", expect=after)
    named = [line.split(":")[0].strip() for line in str(e.value).splitlines() if ": cached " in line]
    assert field in named, str(e.value)
