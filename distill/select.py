"""Label-free choice of teacher block and timestep (DDAE, Xiang et al. ICCV 2023, section 3.3).

Features are globally pooled and L2-normalised; two independent noisings of the same image are a positive pair.
Alignment and uniformity are Wang & Isola's (ICML 2020) metrics; DDAE finds that blocks whose features sit near the
"lower left" (both small) probe best, so candidates are ranked by ``alignment + uniformity`` (lower is better).
No labels are read.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from .data import collate, to_teacher, to_unit
from .teacher import DiffusionTeacher


def alignment_loss(z1: Tensor, z2: Tensor, alpha: float = 2.0) -> Tensor:
    """``L_align = E_i || z1_i - z2_i ||_2^alpha`` for L2-normalised ``z1, z2`` of shape ``[N, D]``."""
    if z1.shape != z2.shape:
        raise ValueError(f"alignment needs paired features of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}.")
    return (z1 - z2).norm(dim=1).pow(alpha).mean()


def uniformity_loss(z: Tensor, t: float = 2.0) -> Tensor:
    """``L_uniform = log E_{i<j} exp(-t || z_i - z_j ||_2^2)`` for L2-normalised ``z`` of shape ``[N, D]``, N >= 2."""
    if z.shape[0] < 2:
        raise ValueError(f"uniformity needs at least 2 samples, got {z.shape[0]}.")
    return torch.pdist(z, p=2).pow(2).mul(-t).exp().mean().log()


@torch.no_grad()
def label_free_scores(teacher: DiffusionTeacher, dataset, num_images: int = 1000, batch_size: int = 128,
                      seed: int = 0, progress: bool = True) -> list[dict]:
    """Alignment, uniformity and their sum for every (block, timestep) of ``teacher``, best (lowest) first.

    Uses ``num_images`` images (a seeded random subset, labels ignored) and two teacher passes over them, each pass
    batching every timestep into one forward: ``2 * ceil(num_images / batch_size)`` forwards in all.
    """
    from tqdm.auto import tqdm

    t0 = time.time()
    n = min(num_images, len(dataset))
    if n < 2:
        raise ValueError(f"label-free selection needs at least 2 images, the dataset has {len(dataset)}.")
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=False, collate_fn=collate)
    g = torch.Generator(device=teacher.device).manual_seed(seed)
    views: list[dict[str, list[Tensor]]] = [{}, {}]
    forwards = 0
    for images, _ in tqdm(loader, desc="label-free", disable=not progress):
        x = to_teacher(to_unit(images.to(teacher.device)), teacher.in_channels, teacher.sample_size)
        for v in views:  # two independent noisings of the same images: a positive pair
            for key, f in teacher(x, generator=g).items():
                v.setdefault(key, []).append(F.normalize(f.float().mean((2, 3)), dim=1).cpu())  # (B, C)
            forwards += 1
    info = {f.key: f for f in teacher.feature_info}
    rows = []
    for key in views[0]:
        z1, z2 = torch.cat(views[0][key]), torch.cat(views[1][key])
        a, u = alignment_loss(z1, z2).item(), uniformity_loss(torch.cat([z1, z2])).item()
        rows.append({"block": info[key].block, "timestep": info[key].timestep, "alignment": round(a, 5),
                     "uniformity": round(u, 5), "score": round(a + u, 5)})
    rows.sort(key=lambda r: r["score"])
    for r in rows:
        r.update(images=n, teacher_forwards=forwards, seconds_total=round(time.time() - t0, 1))
    return rows


def rank_correlation(scores_a: dict, scores_b: dict) -> float:
    """Spearman correlation of two rankings given as ``{key: value}`` over the same keys (torchmetrics)."""
    from torchmetrics.functional import spearman_corrcoef

    keys = sorted(scores_a)
    if set(keys) != set(scores_b):
        raise ValueError(f"rankings cover different candidates: {sorted(set(keys) ^ set(scores_b))}.")
    a = torch.tensor([float(scores_a[k]) for k in keys])
    b = torch.tensor([float(scores_b[k]) for k in keys])
    return float(spearman_corrcoef(a, b))


# ------------------------------------------------------------------------------------------ selection runs
def check_candidates(candidates, num_train_timesteps: int, name: str = "timestep_candidates") -> list[int]:
    """A non-empty list of distinct integers in ``[0, T)``; the error names ``name`` and the fix."""
    ts = list(candidates) if candidates is not None else []
    if not ts:
        raise ValueError(f"{name} is empty; give two or more timesteps in [0, {num_train_timesteps}), e.g. "
                         f"[1, 11, 50, 100].")
    bad = [t for t in ts if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < num_train_timesteps]
    if bad:
        raise ValueError(f"{name} {bad} are outside [0, {num_train_timesteps}) for this teacher's scheduler "
                         f"(num_train_timesteps={num_train_timesteps}); use integers such as "
                         f"[1, 11, 50, {min(100, num_train_timesteps - 1)}].")
    if len(set(ts)) != len(ts):
        raise ValueError(f"{name} has duplicates: {ts}.")
    return [int(t) for t in ts]


def selection_split(dataset, num_train: int, num_val: int, seed: int = 0):
    """Disjoint, class-stratified fit/score subsets of a labelled TRAIN split (never the test split).

    Selecting on the test set and then reporting test accuracy would leak; the grid scores its probes on held-out
    training images instead.
    """
    from .data import dataset_labels, stratified_indices
    from .evaluate import ProbeData

    labels = dataset_labels(dataset)
    n = len(labels)
    if num_train + num_val > n:
        raise ValueError(f"select_images + select_val_images = {num_train + num_val} exceeds the {n} training images; "
                         f"lower them (e.g. select_images={max(1, n * 7 // 10)}, select_val_images={n * 3 // 10}).")
    idx = stratified_indices(labels, (num_train + num_val) / n, seed)
    idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))].tolist()
    return ProbeData(Subset(dataset, idx[:num_train]), Subset(dataset, idx[num_train:num_train + num_val]), "select")


def per_timestep(rows: list[dict], value: str, blocks=None) -> dict[int, float]:
    """Mean of ``value`` over ``blocks`` (default all) for each timestep: how a recipe with fixed blocks picks t."""
    out: dict[int, list] = {}
    for r in rows:
        if blocks is None or r["block"] in blocks:
            out.setdefault(int(r["timestep"]), []).append(float(r[value]))
    return {t: sum(v) / len(v) for t, v in out.items()}


def write_grid_outputs(result: dict, out_dir, teacher_name: str) -> dict:
    """grid.csv, grid.json, grid_heatmap.png and best_grid.yaml (recipe keys) in ``out_dir``."""
    import json
    from pathlib import Path

    import yaml

    from .grid import write_rows_csv
    from .plots import grid_heatmap

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_rows_csv(result["rows"], out / "grid.csv")
    grid_heatmap(result["rows"], out / "grid_heatmap.png",
                 title=f"linear probe top-1 on {result['test_images']} held-out images", blocks=result.get("blocks"))
    best = result["best"]
    (out / "best_grid.yaml").write_text(yaml.safe_dump(
        {"teacher": teacher_name, "teacher_blocks": [best["block"]], "timesteps": [int(best["timestep"])]},
        sort_keys=False))
    (out / "grid.json").write_text(json.dumps(result, indent=2) + "\n")
    return {"csv": str(out / "grid.csv"), "heatmap": str(out / "grid_heatmap.png"), "best": str(out / "best_grid.yaml")}


def write_label_free_outputs(rows: list[dict], out_dir, teacher_name: str, grid_rows=None) -> dict:
    """label_free.csv, label_free.json, best_label_free.yaml and, with ``grid_rows``, ranking.png + the Spearman correlation."""
    import json
    from pathlib import Path

    import yaml

    from .grid import write_rows_csv
    from .plots import ranking_scatter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra: dict = {}
    if grid_rows:
        acc = {f"{r['block']}@t{r['timestep']}": float(r["linear_top1"]) for r in grid_rows}
        score = {f"{r['block']}@t{r['timestep']}": -float(r["score"]) for r in rows}
        common = sorted(set(acc) & set(score))
        if len(common) >= 2:
            rho = rank_correlation({k: score[k] for k in common}, {k: acc[k] for k in common})
            pick = f"{rows[0]['block']}@t{rows[0]['timestep']}"
            best_key = max(common, key=lambda k: acc[k])
            extra = {"spearman": round(rho, 4), "candidates_compared": len(common),
                     "label_free_pick": pick, "label_free_pick_probe_top1": acc.get(pick),
                     "grid_best": best_key, "grid_best_probe_top1": acc[best_key]}
            for r in rows:
                r["probe_top1"] = acc.get(f"{r['block']}@t{r['timestep']}")
            ranking_scatter(rows, grid_rows, out / "ranking.png", spearman=rho)
            extra["ranking_png"] = str(out / "ranking.png")
    for i, r in enumerate(rows):
        r["rank"] = i + 1
    write_rows_csv(rows, out / "label_free.csv")
    best = rows[0]
    (out / "best_label_free.yaml").write_text(yaml.safe_dump(
        {"teacher": teacher_name, "teacher_blocks": [best["block"]], "timesteps": [int(best["timestep"])]},
        sort_keys=False))
    (out / "label_free.json").write_text(json.dumps({"rows": rows, **extra}, indent=2) + "\n")
    return extra


def auto_select_timestep(recipe, dataset, channels: int, out_dir, progress: bool = True) -> dict:
    """Pick the recipe's timestep among ``recipe.timestep_candidates`` (``timesteps: auto-grid | auto-label-free``).

    The recipe's blocks are fixed; each candidate timestep is scored by the mean over those blocks of the grid
    probe's held-out accuracy (auto-grid) or of the label-free score (auto-label-free). Writes the selection's files
    to ``out_dir`` and returns ``{'timestep', 'method', 'teacher_forwards', 'image_forwards', 'scores', ...}``.
    """
    import json
    from pathlib import Path

    from .trainer import build_teacher

    mode = recipe.timesteps
    teacher = build_teacher(recipe, channels, timesteps=[0])
    teacher.set_timesteps(check_candidates(recipe.timestep_candidates, teacher.num_train_timesteps))
    teacher_name = recipe.teacher if isinstance(recipe.teacher, str) else "teacher"
    out = Path(out_dir)
    if mode == "auto-grid":
        from .grid import grid_probe

        data = selection_split(dataset, recipe.select_images, recipe.select_val_images, recipe.seed)
        res = grid_probe(teacher, data, epochs=recipe.select_epochs, seed=recipe.seed,
                         max_memory_gb=recipe.select_max_memory_gb, progress=progress)
        write_grid_outputs(res, out, teacher_name)
        scores = per_timestep(res["rows"], "linear_top1")
        t = max(scores, key=lambda k: (scores[k], -k))
        info = {"teacher_forwards": res["teacher_forwards"], "image_forwards": res["image_forwards"],
                "seconds": res["seconds"]}
    elif mode == "auto-label-free":
        rows = label_free_scores(teacher, dataset, recipe.select_label_free_images, seed=recipe.seed,
                                 progress=progress)
        write_label_free_outputs(rows, out, teacher_name)
        scores = per_timestep(rows, "score")
        t = min(scores, key=lambda k: (scores[k], k))
        info = {"teacher_forwards": rows[0]["teacher_forwards"],
                "image_forwards": 2 * rows[0]["images"] * len(teacher.timesteps), "seconds": rows[0]["seconds_total"]}
    else:
        raise ValueError(f"auto_select_timestep: timesteps {mode!r} is not auto-grid or auto-label-free.")
    result = {"timestep": int(t), "method": mode, "candidates": teacher.timesteps, "blocks": teacher.blocks,
              "scores": {str(k): round(v, 5) for k, v in sorted(scores.items())}, **info}
    (out / "selection.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def select_command(args) -> dict:
    """``distill select``: grid probe and/or label-free selection over blocks x timesteps; files in ``args.out``."""
    import json
    from pathlib import Path

    from .config import load_recipe, make_recipe, parse_overrides
    from .trainer import build_teacher, build_train_data

    values = {}
    if args.recipe:
        values = load_recipe(args.recipe, parse_overrides(args.set)).to_dict()
    for key, arg in (("teacher", args.teacher), ("dataset", args.dataset), ("data_root", args.data_root),
                     ("teacher_blocks", args.blocks), ("timestep_candidates", args.timesteps),
                     ("select_images", args.images), ("select_val_images", args.val_images),
                     ("select_epochs", args.epochs), ("select_label_free_images", args.label_free_images),
                     ("seed", args.seed)):
        if arg is not None:
            values[key] = arg
    if not values.get("timestep_candidates") and "timestep_candidates" in values:
        raise ValueError("--timesteps is empty; give candidate timesteps such as --timesteps 1 11 50 100.")
    values["timesteps"] = [0]
    recipe = make_recipe(values, source="distill select")
    ds, channels = build_train_data(recipe)
    teacher = build_teacher(recipe, channels, timesteps=[0])
    teacher.set_timesteps(check_candidates(recipe.timestep_candidates, teacher.num_train_timesteps, "--timesteps"))
    name = recipe.teacher if isinstance(recipe.teacher, str) else "teacher"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = ["grid", "label-free"] if args.method == "both" else [args.method]
    report: dict = {"teacher": name, "blocks": teacher.blocks, "timesteps": teacher.timesteps, "dataset": recipe.dataset}
    grid_rows = None
    if args.compare:
        import csv

        grid_rows = list(csv.DictReader(open(args.compare)))
    if "grid" in methods:
        from .grid import grid_probe

        if args.score_on == "test":
            from .evaluate import probe_data

            full = probe_data(recipe.dataset, recipe.data_root, channels, 1.0, recipe.seed)
            data = selection_split(full.train, recipe.select_images, 0, recipe.seed)
            data.test = full.test
        else:
            data = selection_split(ds, recipe.select_images, recipe.select_val_images, recipe.seed)
        res = grid_probe(teacher, data, epochs=recipe.select_epochs, batch_size=args.batch_size, seed=recipe.seed,
                         max_memory_gb=args.max_memory_gb, augment=args.augment, progress=not args.no_progress)
        res["scored_on"] = args.score_on
        write_grid_outputs(res, out, name)
        grid_rows = res["rows"]
        report["grid"] = {k: v for k, v in res.items() if k != "rows"}
        print(f"\n## grid probe: {len(data.train)} train images x {recipe.select_epochs} epochs, scored on "
              f"{len(data.test)} {args.score_on} images; {res['teacher_forwards']} teacher forwards "
              f"({res['image_forwards']} image-timestep evaluations), {res['seconds']} s")
        print("| block | t | linear top-1 |\n|---|---|---|")
        for r in res["rows"]:
            print(f"| {r['block']} | {r['timestep']} | {r['linear_top1']:.2f} |")
    if "label-free" in methods:
        rows = label_free_scores(teacher, ds, recipe.select_label_free_images, batch_size=args.batch_size,
                                 seed=recipe.seed, progress=not args.no_progress)
        extra = write_label_free_outputs(rows, out, name, grid_rows)
        lf_image_forwards = 2 * rows[0]["images"] * len(teacher.timesteps)
        report["label_free"] = {"best": rows[0], "image_forwards": lf_image_forwards, **extra}
        print(f"\n## label-free: {rows[0]['images']} images x 2 noisings; {rows[0]['teacher_forwards']} teacher "
              f"forwards ({lf_image_forwards} image-timestep evaluations), {rows[0]['seconds_total']} s")
        print("| rank | block | t | alignment | uniformity | score | probe top-1 |\n|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['rank']} | {r['block']} | {r['timestep']} | {r['alignment']:.4f} | {r['uniformity']:.4f} | "
                  f"{r['score']:.4f} | {r.get('probe_top1') if r.get('probe_top1') is not None else '-'} |")
        if extra:
            print(f"\nSpearman(label-free, probe) = {extra['spearman']:.3f}; label-free pick {extra['label_free_pick']} "
                  f"probes {extra['label_free_pick_probe_top1']:.2f} vs grid best {extra['grid_best']} "
                  f"{extra['grid_best_probe_top1']:.2f}")
            if "grid" in report:
                report["label_free"]["compute_ratio_vs_grid"] = round(lf_image_forwards / report["grid"]["image_forwards"], 4)
                print(f"compute: label-free {lf_image_forwards} vs grid {report['grid']['image_forwards']} "
                      f"image-timestep evaluations (ratio {report['label_free']['compute_ratio_vs_grid']:.3f})")
    (out / "select.json").write_text(json.dumps(report, indent=2) + "\n")
    for m in methods:
        f = out / f"best_{m.replace('-', '_')}.yaml"
        print(f"\n{m} pick ({f}):\n{f.read_text().strip()}\nuse it: distill train RECIPE -o RUN --set "
              f"teacher_blocks=[{yaml_value(f, 'teacher_blocks')}] timesteps=[{yaml_value(f, 'timesteps')}]")
    return report


def yaml_value(path, key):
    import yaml

    return ", ".join(str(v) for v in yaml.safe_load(open(path))[key])
