"""Timestep/block selection (issue 3): online grid probe, label-free CLI, RL policy, multi-timestep, ensembles."""
import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from distill.cli import main
from distill.config import make_recipe
from distill.data import ImageFolder
from distill.evaluate import ProbeData
from distill.grid import check_grid_memory, estimate_grid_memory, grid_probe, teacher_grid_probe
from distill.policy import LeNetPolicy, TimestepPolicy, entropy_weight, per_sample_grad_variance
from distill.probe import ensemble_probe, multi_linear_probe
from distill.select import check_candidates, selection_split
from distill.teacher import load_teacher
from distill.trainer import load_trained, target_layout, train

from .conftest import tiny_unet_config

PNG = b"\x89PNG\r\n\x1a\n"


def _rgb_data(rgb_folder):
    return ProbeData(ImageFolder(str(rgb_folder / "train")), ImageFolder(str(rgb_folder / "test")), "rgb")


def _count_forwards(teacher):
    calls = []
    teacher.model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    return calls


# ------------------------------------------------------------------------------------------------ grid probe
def test_offline_teacher_probe_uses_one_forward_per_batch_and_the_students_probe(rgb_folder):
    """tools/probe_teacher.py's default protocol: features pooled once (one forward per batch, fixed noise), the
    same multi_linear_probe the students get; the rows match that probe run on the pooled features directly."""
    from distill.grid import pooled_teacher_features

    torch.manual_seed(0)
    teacher = load_teacher(tiny_unet_config(3), ["mid_block", "up_blocks.0"], [1, 11])
    data = _rgb_data(rgb_folder)
    calls = _count_forwards(teacher)
    rows = teacher_grid_probe(teacher, data, batch_size=12, epochs=200, seed=3, progress=False, protocol="offline")
    assert calls == [12 * 2] * 3 + [12 * 2, 6 * 2]  # 36 train + 18 test images, once each (no epochs), 2 t each
    tr, tr_y = pooled_teacher_features(teacher, data.train, 12, 3, False)
    te, te_y = pooled_teacher_features(teacher, data.test, 12, 4, False)
    ref = multi_linear_probe(tr, tr_y, te, te_y, epochs=200, seed=3)
    assert {f"{r['block']}@t{r['timestep']}": r["linear_top1"] for r in rows} == {
        k: round(v["top1"], 2) for k, v in ref.items()}
    assert rows[0]["linear_top1"] > 60
    with pytest.raises(ValueError, match="protocol must be 'online' or 'offline', got 'both'"):
        teacher_grid_probe(teacher, data, protocol="both")


def test_grid_probe_one_forward_per_batch_fresh_noise_and_learns(rgb_folder):
    torch.manual_seed(0)
    teacher = load_teacher(tiny_unet_config(3), ["mid_block", "up_blocks.0"], [1, 11, 50])
    data = _rgb_data(rgb_folder)  # 36 train / 18 test images, colour-coded classes
    calls = _count_forwards(teacher)
    noises = []
    orig = teacher.add_noise
    teacher.add_noise = lambda x0, t, g=None: noises.append(orig(x0, t, g)) or noises[-1]
    res = grid_probe(teacher, data, epochs=3, batch_size=12, lr=1e-2, augment="none", progress=False)
    train_batches = 3 * math.ceil(36 / 12)
    test_batches = math.ceil(18 / 12)
    assert calls.pop(0) == 1  # the memory estimate's one-image dry run
    # one teacher forward per batch covers all 3 timesteps x 2 blocks (6 probes), not one per probe
    assert res["teacher_forwards"] == len(calls) == train_batches + test_batches
    assert calls[:train_batches] == [12 * 3] * train_batches
    assert res["image_forwards"] == (3 * 36 + 18) * 3
    assert {(r["block"], r["timestep"]) for r in res["rows"]} == {(b, t) for b in ("mid_block", "up_blocks.0")
                                                                   for t in (1, 11, 50)}
    assert [r["linear_top1"] for r in res["rows"]] == sorted((r["linear_top1"] for r in res["rows"]), reverse=True)
    assert res["best"]["linear_top1"] > 60  # the classes differ by colour: pooled features separate them
    # fresh noise at every step: the same clean batch is never noised the same way twice
    flat = [n.flatten()[:50] for n in noises[1:train_batches + 1]]
    assert all(not torch.equal(a, b) for i, a in enumerate(flat) for b in flat[i + 1:])


def test_grid_memory_estimate_scales_and_refuses_before_starting(rgb_folder):
    teacher = load_teacher(tiny_unet_config(3), ["up_blocks.0"], [1, 11])
    e1, e4 = estimate_grid_memory(teacher, 1), estimate_grid_memory(teacher, 4)
    assert e4["activations"] == 4 * e1["activations"] > 0
    teacher3 = load_teacher(tiny_unet_config(3), ["up_blocks.0"], [1, 11, 50])
    assert estimate_grid_memory(teacher3, 1)["activations"] == pytest.approx(1.5 * e1["activations"])
    calls = _count_forwards(teacher)
    limit_gb = (e1["weights"] + e1["probes"] + 3.5 * (e1["bytes"] - e1["weights"] - e1["probes"])) / 1024 ** 3
    with pytest.raises(MemoryError, match=r"needs about .* GiB .* Fix: --batch-size 3 "):
        grid_probe(teacher, _rgb_data(rgb_folder), batch_size=64, max_memory_gb=limit_gb, progress=False)
    assert calls == [1]  # refused after the one-image dry run of the estimate, before any batch
    assert check_grid_memory(teacher, 3, limit_gb)["bytes"] <= limit_gb * 1024 ** 3


def test_candidate_list_errors():
    assert check_candidates([1, 11], 1000) == [1, 11]
    with pytest.raises(ValueError, match=r"timestep_candidates is empty; give two or more timesteps in \[0, 1000\)"):
        check_candidates([], 1000)
    with pytest.raises(ValueError, match=r"timestep_candidates \[1000, -1\] are outside \[0, 1000\)"):
        check_candidates([1, 1000, -1], 1000)
    with pytest.raises(ValueError, match="duplicates"):
        check_candidates([5, 5], 1000)


def test_selection_split_is_disjoint_stratified_train_only(fmnist_dir):
    from distill.data import FashionMNIST, dataset_labels

    ds = FashionMNIST(fmnist_dir, "train")
    data = selection_split(ds, 300, 200, seed=0)
    a, b = set(data.train.indices), set(data.test.indices)
    assert len(a) == 300 and len(b) == 200 and not a & b
    counts = torch.bincount(dataset_labels(ds)[sorted(a | b)], minlength=10)
    assert counts.tolist() == [50] * 10
    with pytest.raises(ValueError, match="exceeds the 60000 training images"):
        selection_split(ds, 60000, 1)


# ------------------------------------------------------------------------------------------------ CLI
def test_select_cli_both_methods_writes_csv_png_and_recipe_ready_yaml(tmp_path, fmnist_dir, tiny_pipeline_dir):
    out = tmp_path / "sel"
    rc = main(["select", "--method", "both", "--teacher", str(tiny_pipeline_dir), "--blocks", "mid_block",
               "up_blocks.0", "--timesteps", "1", "50", "--data-root", fmnist_dir, "--images", "64",
               "--val-images", "32", "--epochs", "1", "--label-free-images", "16", "--batch-size", "32",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "grid.csv")))
    assert len(rows) == 4 and {r["block"] for r in rows} == {"mid_block", "up_blocks.0"}
    lf = list(csv.DictReader(open(out / "label_free.csv")))
    assert [int(r["rank"]) for r in lf] == [1, 2, 3, 4]
    for png in ("grid_heatmap.png", "ranking.png"):
        assert (out / png).read_bytes()[:8] == PNG
    report = json.loads((out / "select.json").read_text())
    assert report["label_free"]["image_forwards"] == 2 * 16 * 2
    assert report["label_free"]["compute_ratio_vs_grid"] == pytest.approx(64 / report["grid"]["image_forwards"],
                                                                           abs=1e-3)
    assert -1 <= report["label_free"]["spearman"] <= 1
    best = yaml.safe_load((out / "best_grid.yaml").read_text())
    assert (best["teacher_blocks"][0], best["timesteps"][0]) == (rows[0]["block"], int(rows[0]["timestep"]))
    recipe = make_recipe({**best, "data_root": fmnist_dir})  # usable as recipe keys as is
    assert recipe.timesteps == best["timesteps"]


@pytest.mark.parametrize("args, message", [
    (["--timesteps"], "--timesteps is empty"),
    (["--timesteps", "1", "5000"], r"--timesteps \[5000\] are outside \[0, 1000\)"),
    (["--timesteps", "1", "11", "--max-memory-gb", "0.000001"], "Fix: "),
])
def test_select_cli_bad_input_exits_2(tmp_path, fmnist_dir, tiny_pipeline_dir, capsys, args, message):
    rc = main(["select", "--method", "grid", "--teacher", str(tiny_pipeline_dir), "--blocks", "mid_block",
               "--data-root", fmnist_dir, "--images", "32", "--val-images", "16", "--out", str(tmp_path / "s"),
               "--no-progress", *args])
    assert rc == 2
    assert __import__("re").search(message, capsys.readouterr().err)


# ------------------------------------------------------------------------------------------------ policy
def test_entropy_weight_decays_linearly():
    assert entropy_weight(0, 0.1, 100) == pytest.approx(0.1)
    assert entropy_weight(50, 0.1, 100) == pytest.approx(0.05)
    assert entropy_weight(100, 0.1, 100) == 0.0 and entropy_weight(150, 0.1, 100) == 0.0


def test_batch_mean_baseline_is_leave_one_out_and_ema_tracks():
    pol = TimestepPolicy([1, 11], 1, 4, 3, baseline="batch-mean")
    r = torch.tensor([1.0, 2.0, 6.0])
    assert pol.advantage(r).tolist() == pytest.approx([1 - 4.0, 2 - 3.5, 6 - 1.5])
    ema = TimestepPolicy([1, 11], 1, 4, 3, baseline="ema", ema_momentum=0.5).train()
    assert ema.advantage(torch.tensor([2.0, 4.0])).tolist() == pytest.approx([-1.0, 1.0])  # first batch: its mean
    assert float(ema.baseline_ema) == pytest.approx(3.0)
    assert ema.advantage(torch.tensor([5.0, 5.0])).tolist() == pytest.approx([2.0, 2.0])
    assert float(ema.baseline_ema) == pytest.approx(4.0)
    assert TimestepPolicy([1, 11], 1, 4, 3, baseline="none").advantage(r).tolist() == r.tolist()
    with pytest.raises(ValueError, match="policy_baseline 'mean' is not one of batch-mean, ema, none"):
        TimestepPolicy([1, 11], 1, 4, 3, baseline="mean")


def test_per_sample_grad_variance_matches_autograd_loop_and_baseline_lowers_it():
    torch.manual_seed(0)
    net = LeNetPolicy(1, 4)
    torch.nn.init.normal_(net.fc[-1].weight, std=0.1)
    x, a = torch.randn(16, 1, 16, 16), torch.randint(0, 4, (16,))
    r = -2.0 + 0.1 * torch.randn(16)  # rewards far from zero, as negative cross-entropies are
    adv = {"none": r, "loo": r - (r.sum() - r) / 15}
    got = per_sample_grad_variance(net, x, a, adv)
    for name, A in adv.items():  # independent: one autograd backward per sample
        grads = []
        for i in range(16):
            net.zero_grad()
            (-F.log_softmax(net(x[i:i + 1]), 1)[0, a[i]] * A[i]).backward()
            grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
        assert got[name] == pytest.approx(float(torch.stack(grads).var(0).sum()), rel=1e-4)
    assert got["loo"] < 0.1 * got["none"]


def test_policy_learns_the_informative_timestep():
    """A bandit: the pooled feature holds the label only at candidate index 1; the head learns to read it, the reward
    follows, and REINFORCE moves the policy onto that timestep."""
    torch.manual_seed(0)
    pol = TimestepPolicy([1, 11, 50], 1, 8, 4, baseline="batch-mean").train()
    opt = torch.optim.Adam(pol.parameters(), lr=3e-3)
    x = torch.randn(64, 1, 16, 16)
    for _ in range(300):
        y = torch.randint(0, 4, (64,))
        a, t = pol.sample(x)
        pooled = torch.randn(64, 8)
        pooled[a == 1, :4] += 4 * F.one_hot(y[a == 1], 4).float()
        out = pol(x, a, pooled, y, entropy_weight=0.0)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    probs = F.softmax(pol.net(x), 1).mean(0)
    assert probs[1] > 0.8, probs
    assert set(t.tolist()) <= {1, 11, 50}


def _recipe(fmnist_dir, **kw):
    base = dict(teacher=tiny_unet_config(), teacher_blocks=["mid_block", "up_blocks.0"], timesteps=[11],
                data_root=fmnist_dir, student="resnet18", student_size=32, regressor_width=16, steps=6, batch_size=16,
                lr=2e-3, warmup_steps=1, log_every=1, checkpoint_every=3, augment="flip", mean=[0.286] * 3,
                std=[0.353] * 3, timestep_candidates=[1, 11, 50], select_images=64, select_val_images=32,
                select_epochs=1, select_label_free_images=16)
    base.update(kw)
    return make_recipe(base)


def test_train_with_policy_logs_histogram_variance_and_resumes(tmp_path, fmnist_dir):
    run = tmp_path / "pol"
    recipe = _recipe(fmnist_dir, timesteps="policy", policy_baseline="ema", steps=3)
    summary = train(recipe, str(run), progress=False)
    rows = list(csv.DictReader(open(run / "policy.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert sum(int(r[f"n_t{t}"]) for r in rows for t in (1, 11, 50)) == 3 * 16  # one timestep per image per step
    assert all(float(r["gradvar_batch_mean"]) < float(r["gradvar_none"]) for r in rows)
    assert (run / "policy_histogram.png").read_bytes()[:8] == PNG
    assert summary["timesteps_used"] == {"policy": [1, 11, 50]}
    assert summary["policy"]["gradvar_ratio_batch_mean_over_none_median"] < 1
    assert (run / "checkpoint-3" / "model_1.safetensors").is_file()  # policy + head + baseline checkpointed
    metrics = list(csv.DictReader(open(run / "metrics.csv")))
    assert {"reward", "entropy", "policy_loss", "head_ce"} <= set(metrics[0])
    # resume to step 6 from the checkpoint: policy.csv continues, the policy weights are restored
    from safetensors.torch import load_file

    before = load_file(str(run / "checkpoint-3" / "model_1.safetensors"))
    train(_recipe(fmnist_dir, timesteps="policy", policy_baseline="ema", steps=6), str(run), resume=True,
          progress=False)
    rows = list(csv.DictReader(open(run / "policy.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    after = load_file(str(run / "checkpoint-6" / "model_1.safetensors"))
    assert before.keys() == after.keys() and float(after["baseline_initialised"]) == 1.0
    assert not torch.equal(before["net.features.0.weight"], after["net.features.0.weight"])
    model, _, resolved = load_trained(str(run))
    assert resolved["target_groups"] == [["mid_block@t*"], ["up_blocks.0@t*"]]


def test_policy_without_labels_is_a_clear_error(tmp_path, rgb_folder):
    import shutil

    flat = tmp_path / "flat"
    flat.mkdir()
    for p in (rgb_folder / "train" / "cat").iterdir():
        shutil.copy(p, flat / p.name)
    recipe = make_recipe(dict(teacher=tiny_unet_config(3), teacher_blocks=["up_blocks.0"], timesteps="policy",
                              dataset="image-folder", data_root=str(flat), student="resnet18", student_size=32,
                              regressor_width=16, steps=2, batch_size=4, mean=[0.5] * 3, std=[0.25] * 3))
    with pytest.raises(ValueError, match=r"timesteps: policy needs labels .* Fix: use labelled data"):
        train(recipe, str(tmp_path / "run"), progress=False)


def test_policy_recipe_errors():
    with pytest.raises(ValueError, match="policy needs at least 2 timestep_candidates"):
        make_recipe({"timesteps": "policy", "timestep_candidates": [11]})
    with pytest.raises(ValueError, match="valid: batch-mean, ema, none"):
        make_recipe({"policy_baseline": "avg"})
    with pytest.raises(ValueError, match="one of auto-grid, auto-label-free, policy"):
        make_recipe({"timesteps": "grid"})


# ------------------------------------------------------------------------------------------------ multi-timestep
@pytest.mark.parametrize("mode", ["heads", "concat"])
def test_multi_timestep_layouts_one_batched_forward_per_step(tmp_path, fmnist_dir, mode):
    recipe = _recipe(fmnist_dir, timesteps=[1, 11, 50], multi_timestep=mode, steps=2, teacher_blocks=["up_blocks.0"])
    from distill.trainer import build_teacher

    teacher = build_teacher(recipe, 1)
    layout = target_layout(recipe, teacher)
    C = teacher.feature_info[0].num_chs
    if mode == "heads":
        assert layout.groups == [["up_blocks.0@t1"], ["up_blocks.0@t11"], ["up_blocks.0@t50"]]
        assert [c for c, _ in layout.targets] == [C] * 3
    else:
        assert layout.groups == [["up_blocks.0@t1", "up_blocks.0@t11", "up_blocks.0@t50"]]
        assert [c for c, _ in layout.targets] == [3 * C]
    import distill.teacher as T

    calls = []
    orig = T.DiffusionTeacher._run
    T.DiffusionTeacher._run = lambda self, x, t, stop: calls.append(x.shape[0]) or orig(self, x, t, stop)
    try:
        train(recipe, str(tmp_path / mode), progress=False)
    finally:
        T.DiffusionTeacher._run = orig
    assert calls[-2:] == [3 * 16, 3 * 16]  # each step: one forward of B x K images
    model, _, resolved = load_trained(str(tmp_path / mode))
    assert len(model.regressor.heads) == len(layout.targets)
    assert resolved["timesteps_used"] == [1, 11, 50]


# ------------------------------------------------------------------------------------------------ auto modes
@pytest.mark.parametrize("mode, files", [("auto-grid", ["grid.csv", "grid_heatmap.png", "best_grid.yaml"]),
                                         ("auto-label-free", ["label_free.csv", "best_label_free.yaml"])])
def test_auto_timesteps_select_record_and_reuse_on_resume(tmp_path, fmnist_dir, mode, files):
    run = tmp_path / mode
    summary = train(_recipe(fmnist_dir, timesteps=mode, steps=2, checkpoint_every=1), str(run), progress=False)
    sel = json.loads((run / "selection" / "selection.json").read_text())
    for f in files:
        assert (run / "selection" / f).is_file()
    scores = {int(k): v for k, v in sel["scores"].items()}
    pick = (max if mode == "auto-grid" else min)(scores, key=scores.get)
    assert sel["timestep"] == pick and summary["timesteps_used"] == [pick]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["timesteps"] == mode and cfg["_resolved"]["timesteps_used"] == [pick]
    from distill.export import export_student

    exported = export_student(str(run), str(tmp_path / "student"))
    assert json.loads((exported / "config.json").read_text())["distill"]["timesteps"] == [pick]
    mtime = (run / "selection" / "selection.json").stat().st_mtime_ns
    train(_recipe(fmnist_dir, timesteps=mode, steps=3, checkpoint_every=1), str(run), resume=True, progress=False)
    assert (run / "selection" / "selection.json").stat().st_mtime_ns == mtime  # not re-run


def test_auto_grid_out_of_range_candidates_error(tmp_path, fmnist_dir):
    with pytest.raises(ValueError, match=r"timestep_candidates \[1000\] are outside \[0, 1000\)"):
        train(_recipe(fmnist_dir, timesteps="auto-grid", timestep_candidates=[1, 1000]), str(tmp_path / "r"),
              progress=False)


# ------------------------------------------------------------------------------------------------ ensemble
def test_ensemble_probe_averages_member_logits():
    g = torch.Generator().manual_seed(0)
    y, yt = torch.randint(0, 3, (60,), generator=g), torch.randint(0, 3, (30,), generator=g)
    tr = {k: torch.randn(60, 5, generator=g) + F.one_hot(y, 5) * s for k, s in (("a", 1.0), ("b", 2.0), ("c", 0.5))}
    te = {k: torch.randn(30, 5, generator=g) + F.one_hot(yt, 5) * s for k, s in (("a", 1.0), ("b", 2.0), ("c", 0.5))}
    res = ensemble_probe(tr, y, te, yt, epochs=5)
    ref = multi_linear_probe(tr, y, te, yt, epochs=5, return_logits=True)
    avg = torch.stack([ref[k]["test_logits"] for k in "abc"]).mean(0)
    assert res["ensemble"]["top1"] == pytest.approx(100 * float((avg.argmax(1) == yt).float().mean()), abs=1e-4)
    assert res["best_member"] == max("abc", key=lambda k: ref[k]["top1"])
    single = ensemble_probe(tr, y, te, yt, members=["b"], epochs=5)
    assert single["ensemble"]["top1"] == pytest.approx(single["members"]["b"]["top1"])


def test_probe_ensemble_cli(tmp_path, fmnist_dir, tiny_pipeline_dir, capsys):
    out = tmp_path / "e.json"
    rc = main(["probe", f"teacher:{tiny_pipeline_dir}", "--blocks", "mid_block", "--timesteps", "1", "50",
               "--ensemble", "--data-root", fmnist_dir, "--train-fraction", "0.002", "--epochs", "2", "--json",
               str(out), "--no-progress"])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [r["timestep"] for r in rows] == [1, 50, "ensemble"]
    assert "soft vote" in capsys.readouterr().out
    assert main(["probe", "timm:resnet18", "--ensemble", "--no-progress"]) == 2
    assert "--ensemble soft-votes one probe per timestep" in capsys.readouterr().err
