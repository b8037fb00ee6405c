"""Linear probes of a diffusion teacher's own pooled features (``distill probe teacher:NAME`` or
``teacher:RECIPE.yaml``).

One probe per (block, timestep), trained as students' probes are (`distill.probe.multi_linear_probe` on
features pooled once, one seeded noise draw per image); with ``ensemble`` the timesteps of each block also
soft-vote (averaged logits; `distill.probe.ensemble_probe`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

from ..build import build_teacher
from ..config import load_recipe
from ..errors import option
from ..evaluate import probe_data, tested_on
from ..probe import ensemble_probe, eval_device
from ..teacher import feature_key, load_teacher
from ..vocab import dataset_channels
from .grid import pooled_teacher_features


def probe_teacher(source, blocks: Sequence[str], timesteps: Optional[Sequence[int]] = None, *,
                  dataset: Optional[str] = None, data_root: Optional[str] = None, train_fraction: float = 1.0,
                  test_fraction: float = 1.0, epochs: int = 30, seed: int = 0, ensemble: bool = False,
                  progress: bool = True, device=None, **teacher_options) -> dict:
    """Probe ``source``'s pooled features at every (block, timestep); with ``ensemble`` also each block's soft vote.

    Args:
        source: the teacher (packaged name, directory, hub id or ``python:module:factory``; as
            `distill.teacher.load_teacher` takes), or a recipe file (``.yaml``) whose teacher and ``teacher_*``
            keys are used, with its ``teacher_blocks``, dataset and data root as defaults.
        blocks: the teacher blocks to probe.
        timesteps: the timesteps (default ``[11]``); ``ensemble`` needs two or more.
        dataset, data_root: a labelled dataset (default Fashion-MNIST); train split (a seeded stratified
            ``train_fraction`` of it) to fit, test split (a seeded stratified ``test_fraction`` of it) to score.
        epochs, seed: of the probes (and the noise: train features draw with ``seed``, test with ``seed + 1``).
        ensemble: add one row per block that soft-votes its timesteps.
        progress: progress bars (`distill.logs.progress`: plain lines when stderr is a file).
        device: where the teacher and the probes run (default `distill.probe.eval_device`: Accelerate's, a
            GPU when there is one); returned as ``'device'``.
        teacher_options: more `distill.teacher.load_teacher` arguments (``teacher_kwargs``, ``weights``,
            ``noise_schedule``, ``resolution``, ``in_channels`` ... of a ``python:module:factory`` teacher).

    Returns:
        ``{'rows', 'dataset', 'train_images', 'test_images', 'tested', 'device'}`` (``tested``: the line of
        `distill.evaluate.tested_on`); each row is ``{'block', 'timestep',
        'linear_top1', 'linear_top5'}`` (per block: its timesteps in order, then with ``ensemble`` a row whose ``timestep`` is
        ``'ensemble'`` with ``members`` and ``best_member``).

    Raises:
        ValueError: no ``blocks``, or ``ensemble`` with fewer than two timesteps.
    """
    recipe = None
    if isinstance(source, str) and source.endswith((".yaml", ".yml")) and Path(source).is_file():
        recipe = load_recipe(source)  # its teacher with every teacher_* key, its blocks and data as defaults
        blocks, dataset = blocks or recipe.teacher_blocks, dataset or recipe.dataset
        data_root = data_root or (recipe.data_root if dataset == recipe.dataset else None)
    if not blocks:
        raise ValueError(f"probing a teacher needs {option('blocks')}, e.g. {option('blocks')} mid_block (see "
                         f"`distill select`).")
    timesteps = list(timesteps or [11])
    if ensemble and len(timesteps) < 2:
        raise ValueError(f"{option('ensemble', flag=True)} needs two or more {option('timesteps')} (one probe each), "
                         f"got {timesteps}; e.g. {option('timesteps')} 1 5 11 25 50 (the best t, two finer, two "
                         f"coarser).")
    dataset = dataset or "fashion-mnist"
    channels = dataset_channels(dataset, recipe.image_channels if recipe is not None else None)
    if recipe is not None:
        teacher = build_teacher(dataclasses.replace(recipe, teacher_blocks=list(blocks)), channels, timesteps)
    else:
        teacher = load_teacher(source, list(blocks), timesteps, **teacher_options)
    teacher = teacher.to(eval_device(device))
    data = probe_data(dataset, data_root, channels, train_fraction, seed, test_fraction)
    tr, tr_y = pooled_teacher_features(teacher, data.train, seed=seed, progress=progress,
                                       desc="teacher: train features")
    te, te_y = pooled_teacher_features(teacher, data.test, seed=seed + 1, progress=progress,
                                       desc="teacher: test features")
    rows = []
    for b in teacher.blocks:
        keys = {t: feature_key(b, t) for t in teacher.timesteps}
        res = ensemble_probe(tr, tr_y, te, te_y, members=list(keys.values()), epochs=epochs, seed=seed,
                             device=teacher.device)
        for t, k in keys.items():
            r = res["members"][k]
            rows.append({"block": b, "timestep": int(t), "linear_top1": round(r["top1"], 2),
                         "linear_top5": round(r["top5"], 2)})
        if ensemble:
            e = res["ensemble"]
            rows.append({"block": b, "timestep": "ensemble", "members": teacher.timesteps,
                         "linear_top1": round(e["top1"], 2), "linear_top5": round(e["top5"], 2),
                         "best_member": res["best_member"]})
    return {"rows": rows, "dataset": dataset, "train_images": len(tr_y), "test_images": len(te_y),
            "tested": tested_on(data), "device": str(teacher.device)}


def format_teacher_probe(result: dict) -> str:
    """The Markdown table ``distill probe teacher:NAME`` prints for `probe_teacher`'s result."""
    lines = ["| block | timestep(s) | linear top-1 | linear top-5 |\n|---|---|---|---|"]
    for r in result["rows"]:
        if r["timestep"] == "ensemble":
            lines.append(f"| {r['block']} | ensemble {r['members']} (soft vote) | **{r['linear_top1']:.2f}** | "
                         f"{r['linear_top5']:.2f} |")
        else:
            lines.append(f"| {r['block']} | {r['timestep']} | {r['linear_top1']:.2f} | {r['linear_top5']:.2f} |")
    lines.append(f"\nprobe: {result['train_images']} train / {result['test_images']} test {result['dataset']} "
                 f"images, one noise draw per image; teacher and probes on {result.get('device', 'cpu')}")
    if result.get("tested"):
        lines.append(result["tested"])
    return "\n".join(lines)
