#!/usr/bin/env python
"""Self-supervised baseline at the same compute: SimCLR on the distillation's unlabelled images, same student.

SimCLR (Chen et al., ICML 2020) from ``lightly`` (``pip install "diffusion-distill[ssl]"``): lightly's ``NTXentLoss``
(temperature 0.5, lightly's default) and ``SimCLRProjectionHead`` (512 -> 512 -> 128) on the recipe's student
(timm ResNet-18 at ``student_size``), the recipe's training images, loader, batch size (images per step; each
image gives two views), seed, optimizer (AdamW, lr, weight decay, warmup) and input pipeline (uint8 batch ->
[0, 1] -> augmentation at the data's resolution -> :func:`distill.data.batch.to_student`: RGB, ``student_size``,
the recipe's mean/std), as ``distill train`` does.

Augmentation: lightly's ``SimCLRTransform`` recipe (random resized crop, area 0.08-1; flip p 0.5; colour jitter
p 0.8 with brightness 0.8, contrast 0.8, saturation 0.8, hue 0.2; grayscale p 0.2; Gaussian blur p 0.5, sigma
0.1-2), run with kornia on whole batches at the data's resolution, as distill's own augmentation is. lightly's
transform works on single PIL images in the loader workers; its saturation, hue and random-grayscale steps need
RGB: on one-channel data (Fashion-MNIST) they would do nothing but cost CPU, so they are left out there; the blur
kernel is about a tenth of the image's shorter side, odd (3 px at 28 px; SimCLR's 23 px at 224).

``--set KEY=VALUE`` overrides recipe keys as ``distill train --set`` does (e.g. another ``data_root``, ``steps``-free
keys such as ``batch_size`` or ``student_size``), so the baseline runs on exactly the distillation's settings.

Same compute = the same wall time on this machine, the teacher's forward counted in the distillation's. Two
ways to set it: ``--seconds`` (e.g. a distillation's ``summary.json`` ``seconds``, measured just before under the
same load), or ``--steps`` = distillation steps / the wall-time ratio of one SimCLR step to one distillation step,
measured by ``--ratio ROUNDS`` in one process, the two steps timed alternately on the same batches (so load from
other jobs on a shared CPU hits both alike; the wall clock of two separate runs does not allow that). The learning
rate follows the recipe's warmup, then a cosine over the share of the budget used, so a run ends at lr 0 as a
step-budgeted distillation does. The student is exported in timm format (config.json + model.safetensors with a
``distill`` block) so ``distill probe DIR`` probes it as it probes a distilled export.

    python bench/ssl_baseline.py --ratio 4 --json bench/results/ssl_fmnist_step_ratio.json
    python bench/ssl_baseline.py --steps 267 -o runs/simclr-1x --json bench/results/ssl_fmnist_simclr_1x.json
    distill probe runs/simclr-1x/student --train-fraction 1.0
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.errors import refuse  # noqa: E402
from distill.version import install_hint  # noqa: E402
from bench._common import emit, interleave, library_step, machine, paired, quickstart_setup  # noqa: E402

MISSING_LIGHTLY = ("bench/ssl_baseline.py needs the optional 'ssl' extra (lightly, for SimCLR's loss and projection "
                   f"head): {install_hint('ssl')} (or pip install lightly==1.6.0), then run it again.")


def require_lightly():
    """``(NTXentLoss, SimCLRProjectionHead)`` from lightly.

    Raises:
        MissingDependencyError: lightly is not installed; the message names the ``ssl`` extra that installs it
            (exit 2 from the command line, as ``distill`` reports a missing extra).
    """
    from distill.errors import MissingDependencyError

    try:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead
    except ImportError:
        raise MissingDependencyError(MISSING_LIGHTLY) from None
    return NTXentLoss, SimCLRProjectionHead


def simclr_augment(size, channels: int = 1) -> nn.Module:
    """lightly's SimCLRTransform recipe, batched with kornia (see the module docstring): ``[B, C, H, W]`` in [0, 1]
    -> one random view of the same shape, ``size`` = ``H`` (square) or ``(H, W)``. ``channels`` 3 adds the colour
    steps (saturation 0.8, hue 0.2, grayscale p 0.2); 1 leaves them out (they do nothing on one channel)."""
    import kornia.augmentation as K

    h, w = (size, size) if isinstance(size, int) else tuple(size)
    k = max(3, int(0.1 * min(h, w)) // 2 * 2 + 1)  # odd, about a tenth of the shorter side (SimCLR: 23 px at 224)
    colour = channels == 3
    steps = [K.RandomResizedCrop((h, w), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
             K.RandomHorizontalFlip(p=0.5),
             K.ColorJitter(brightness=0.8, contrast=0.8, saturation=0.8 if colour else 0.0,
                           hue=0.2 if colour else 0.0, p=0.8)]
    if colour:
        steps.append(K.RandomGrayscale(p=0.2))
    steps.append(K.RandomGaussianBlur((k, k), sigma=(0.1, 2.0), p=0.5))
    return K.AugmentationSequential(*steps)


def lr_at(step: int, progress: float, base_lr: float, warmup_steps: int) -> float:
    """The recipe's schedule (diffusers' ``get_cosine_schedule_with_warmup``, as ``distill train``): linear warmup
    over ``warmup_steps`` steps (``step`` counts from 1), then a cosine from ``base_lr`` to 0 over ``progress`` in
    [0, 1], the share of the budget after warmup spent (clamped, so a last step past the budget gets lr 0)."""
    if step <= warmup_steps:
        return base_lr * step / max(1, warmup_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def budget_progress(step: int, used: float, used_at_warmup_end: float, steps, warmup_steps: int) -> float:
    """Share of the post-warmup budget spent at ``step``: of the steps (``steps`` given) or of the wall time
    (``used`` = share of ``--seconds`` spent now, ``used_at_warmup_end`` = the share when warmup ended)."""
    if steps:
        return (step - warmup_steps) / max(1, steps - warmup_steps)
    return (used - used_at_warmup_end) / max(1e-9, 1.0 - used_at_warmup_end)


class SimCLR(nn.Module):
    """Backbone (timm, ``num_classes=0``: pooled ``[B, D]``) + lightly's projection head ``D -> D -> 128``."""

    def __init__(self, backbone: nn.Module, head_cls):
        super().__init__()
        self.backbone = backbone
        dim = backbone.num_features
        self.head = head_cls(input_dim=dim, hidden_dim=dim, output_dim=128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # (B, 128)


def step_flops(model: SimCLR, loss_fn, size: int) -> int:
    """FLOPs per training image of one SimCLR step (two views: backbone + head forward and backward, the loss's
    similarity matrix), counted with :func:`distill.cost.count_flops` on a batch of 4 images, divided by 4."""
    import copy

    from distill.cost import count_flops

    m = copy.deepcopy(model).train()
    x0, x1 = torch.randn(4, 3, size, size), torch.randn(4, 3, size, size)
    return count_flops(lambda: loss_fn(m(x0), m(x1)).backward()) // 4


def ssl_step_fn(model: SimCLR, loss_fn, opt, augment, recipe, mean, std):
    """``step(images uint8 [B, C, H, W], lr) -> loss``: one SimCLR step (two augmented views of every image)."""
    from distill.data.batch import to_student, to_unit

    def step(images: torch.Tensor, lr: float) -> float:
        for group in opt.param_groups:
            group["lr"] = lr
        x = to_unit(images)  # (B, C, H, W) in [0, 1]
        v0 = to_student(augment(x), recipe.student_size, mean, std)  # (B, 3, S, S)
        v1 = to_student(augment(x), recipe.student_size, mean, std)
        loss = loss_fn(model(v0), model(v1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def step_time_ratio(recipe_path: str, rounds: int, overrides: dict | None = None) -> dict:
    """Wall time of one SimCLR step over one distillation step (``distill.train``'s own step through
    :func:`bench._common.library_step`, the teacher's forward included), timed alternately in this process on the
    same batches (:func:`bench._common.interleave`), so load from other jobs hits both alike. ``ratio_of_medians``
    turns a distillation budget of ``n`` steps into ``n / ratio`` SimCLR steps of the same wall time."""
    NTXentLoss, SimCLRProjectionHead = require_lightly()
    from distill.build import build_loader
    from distill.student import Student

    recipe, ds, mean, std, teacher, keys, dmodel = quickstart_setup(recipe_path, overrides or {})
    dstep = library_step(recipe, teacher, keys, dmodel, mean, std, ds[0][0].shape[-1])
    smodel = SimCLR(Student(recipe.student, recipe.student_size).model, SimCLRProjectionHead).train()
    sopt = torch.optim.AdamW(smodel.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sstep = ssl_step_fn(smodel, NTXentLoss(temperature=0.5), sopt, simclr_augment(ds[0][0].shape[-1], ds[0][0].shape[0]),
                        recipe, mean, std)
    batches = [b[0] for _, b in zip(range(rounds + 1), build_loader(ds, recipe, torch.Generator().manual_seed(0)))]
    ssl_rows, distill_rows = interleave([lambda i: sstep(batches[i], recipe.lr) and {},
                                         lambda i: dstep(batches[i], i) and {}], repeats=rounds, warmup=1)
    return {"rounds": rounds, "recipe": recipe_path, "overrides": overrides or {},
            "ssl_over_distill": paired(ssl_rows, distill_rows)}


def export_ssl(backbone: nn.Module, out: Path, recipe, mean, std, channels: int, steps: int, meta: dict) -> Path:
    """Write ``backbone`` in timm format (``timm.models.save_for_hf``) with the ``distill`` block that
    ``distill probe`` reads (dataset, data channels, input size, weights) and a model card (``README.md``,
    `distill.card.model_card` for ``method: simclr``), as ``distill export`` writes one."""
    import timm.models

    from distill.export import INHERITED_PROVENANCE

    S = recipe.student_size
    desc = f"{recipe.student} pretrained with SimCLR (lightly) on {recipe.dataset} for {steps} steps at {S}px"
    data_config = {"input_size": (3, S, S), "mean": tuple(mean), "std": tuple(std), "crop_pct": 1.0,
                   "interpolation": "bilinear", "crop_mode": "center"}
    out.mkdir(parents=True, exist_ok=False)
    timm.models.save_for_hf(backbone, str(out), model_config={"pretrained_cfg": {"tag": "simclr", "description": desc}},
                            data_config=data_config, safe_serialization=True)
    cfg = json.loads((out / "config.json").read_text())
    # the architecture's default pretrained_cfg describes timm's supervised weights: keep none of it (as distill export)
    cfg["pretrained_cfg"] = {k: v for k, v in cfg["pretrained_cfg"].items() if k not in INHERITED_PROVENANCE}
    cfg["pretrained_cfg"].update({"tag": "simclr", "description": desc})
    cfg["distill"] = {"method": "simclr", "dataset": recipe.dataset, "data_root": recipe.data_root,
                      "student_size": S, "data_channels": channels, "steps": steps, "batch_size": recipe.batch_size,
                      "weights": "live", **meta}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    from distill.atomic import fsync_tree
    from distill.card import write_model_card

    write_model_card(out)  # README.md: what it is (SimCLR, not distilled), how it was made, how to load it

    fsync_tree(out)  # the umask's mode, as distill export (safetensors writes 0600) and fsync'd
    return out


def _positive(kind):
    """argparse type: a number > 0 (a budget of 0 would train nothing and export an untrained student)."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not v > 0 or (kind is float and not math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0 (a budget of nothing trains nothing); e.g. "
                                             f"distillation steps / the ratio printed by --ratio")
        return v
    return parse


def main(argv=None) -> int:
    """Command line (see the module docstring). Returns 0; bad input exits 2 with one message (argparse's format),
    before any work and without writing ``--output-dir``; a missing extra or dataset is one line, exit 2; Ctrl-C or
    SIGTERM stop at once (exit 130 / 143), removing the half-written ``--output-dir``
    (`distill.errors.run_reporting`, as ``distill`` does)."""
    from distill.errors import parser_spelling, run_reporting, set_spelling

    ap = build_parser()  # the library's messages name this script's options: -o, --set data_root=VALUE
    return run_reporting("ssl_baseline.py", _main, ap, argv, spelling=parser_spelling(ap, fallback=set_spelling))


def build_parser() -> argparse.ArgumentParser:
    """The script's command line."""
    ap = argparse.ArgumentParser(prog="ssl_baseline.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="quickstart",
                    help="a shipped recipe's name or a recipe file: data, student, batch, optimizer, seed "
                         "(default: quickstart)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override recipe keys, as distill train --set (e.g. data_root=DIR batch_size=32)")
    budget = ap.add_mutually_exclusive_group(required=True)
    budget.add_argument("--seconds", type=_positive(float), help="wall-time budget of the training loop")
    budget.add_argument("--steps", type=_positive(int), help="step budget (e.g. distillation steps / --ratio's ratio)")
    budget.add_argument("--ratio", type=_positive(int), metavar="ROUNDS", help="only time SimCLR steps against "
                        "distillation steps, ROUNDS alternating pairs (>= 1), and print the ratio (no training)")
    ap.add_argument("-o", "--output-dir", default=None, help="new directory: student/ (timm export), log.csv")
    ap.add_argument("--json", default=None, help="write the figures here (small JSON, e.g. under bench/results/)")
    ap.add_argument("--distill-run", default=None, help="distillation run measured beside it: its figures are copied")
    ap.add_argument("--max-steps", type=_positive(int), default=None, help="stop earlier (smoke tests)")
    return ap


def _main(ap: argparse.ArgumentParser, argv=None) -> int:
    args = ap.parse_args(argv)
    from distill.recipes import load_recipe, parse_overrides

    try:
        overrides = parse_overrides(args.set)
        recipe = load_recipe(args.recipe, overrides)
    except (ValueError, FileNotFoundError) as e:
        refuse(ap, f"--recipe {args.recipe!r} / --set: {e}")
    if not args.ratio and not args.output_dir:
        refuse(ap, "--output-dir is required to train (only --ratio runs without one)")
    out = Path(args.output_dir) if args.output_dir else None
    if out is not None and out.exists():
        refuse(ap, f"--output-dir {out} exists; pick a new directory (nothing was written).")
    if args.distill_run and not (Path(args.distill_run) / "summary.json").is_file():
        refuse(ap, f"--distill-run {args.distill_run}: no summary.json there; give a finished distill train run "
                 f"directory, or leave --distill-run out.")
    # the extra is checked after the arguments: bad input is named as such whether or not lightly is installed
    NTXentLoss, SimCLRProjectionHead = require_lightly()
    at_start = machine()
    if args.ratio:
        res = step_time_ratio(args.recipe, args.ratio, overrides)
        return emit(res, args.json, at_start)
    try:
        return train(args, recipe, out, at_start, NTXentLoss, SimCLRProjectionHead)
    except BaseException:
        if out.exists() and not (out / "student" / "config.json").exists():
            import shutil

            shutil.rmtree(out)  # this run made it (refused above if it existed): no half run left behind
        raise


def train(args, recipe, out: Path, at_start: dict, NTXentLoss, SimCLRProjectionHead) -> int:
    """The SimCLR training loop, the export to ``out/student`` and the figures (``--json``)."""
    from distill.build import build_loader, build_train_data, resolve_mean_std
    from distill.student import Student
    from distill.trainer.batches import shutdown_workers

    torch.manual_seed(recipe.seed)
    ds, channels = build_train_data(recipe)
    mean, std = resolve_mean_std(recipe, ds)
    backbone = Student(recipe.student, recipe.student_size).model  # timm, num_classes=0, as distill builds it
    model = SimCLR(backbone, SimCLRProjectionHead)
    loss_fn = NTXentLoss(temperature=0.5)
    flops = step_flops(model, loss_fn, recipe.student_size)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    augment = simclr_augment(ds[0][0].shape[-1], ds[0][0].shape[0])  # square views at the data's width, as distill's
    g = torch.Generator()
    loader = build_loader(ds, recipe, g)
    out.mkdir(parents=True)
    log = open(out / "log.csv", "w")
    try:
        log.write("step,seconds,loss,lr\n")
        step_fn = ssl_step_fn(model, loss_fn, opt, augment, recipe, mean, std)
        model.train()
        step, seen, epoch, t0, loss, used_w = 0, 0, 0, time.time(), None, 0.0
        done = False
        while not done:
            g.manual_seed(recipe.seed * 100003 + epoch)
            for images, _ in loader:
                used = (time.time() - t0) / args.seconds if args.seconds else step / args.steps
                if used >= 1.0 or (args.max_steps and step >= args.max_steps):
                    done = True
                    break
                step += 1
                if step == recipe.warmup_steps + 1:
                    used_w = used
                progress = budget_progress(step, used, used_w, args.steps, recipe.warmup_steps)
                loss = step_fn(images, lr_at(step, progress, recipe.lr, recipe.warmup_steps))
                seen += images.shape[0]
                if step % 20 == 0 or step == 1:
                    log.write(f"{step},{time.time() - t0:.1f},{loss:.4f},{opt.param_groups[0]['lr']:.3g}\n")
                    log.flush()
            epoch += 1
        elapsed = time.time() - t0
    finally:
        log.close()
        shutdown_workers(loader)  # its workers ignore SIGINT/SIGTERM (distill's loader): stop them now, not at exit
    export_ssl(model.backbone, out / "student", recipe, mean, std, channels, step,
               {"seconds": round(elapsed, 1), "images_seen": seen})
    res = {"method": "SimCLR (lightly NTXentLoss T=0.5, SimCLRProjectionHead 512-512-128)", "recipe": args.recipe,
           "overrides": args.set,
           "budget_seconds": args.seconds, "budget_steps": args.steps, "seconds": round(elapsed, 1), "steps": step, "images_seen": seen,
           "views_per_image": 2, "img_per_s": round(seen / elapsed, 2), "flops_per_image": flops,
           "final_loss": None if loss is None else round(loss, 4), "student": str(out / "student")}
    if args.distill_run:
        s = json.loads((Path(args.distill_run) / "summary.json").read_text())
        cost = s.get("cost", {})
        res["distill"] = {"run": args.distill_run, "seconds": s["seconds"], "steps": s["steps"],
                          "images_seen": s["steps"] * recipe.batch_size, "img_per_s": s["img_per_s"],
                          "cost": cost}
    return emit(res, args.json, at_start)


if __name__ == "__main__":
    raise SystemExit(main())
