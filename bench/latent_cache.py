#!/usr/bin/env python
"""Live VAE vs latent cache, on the real architectures with random weights (no hub, no download).

Builds the Stable Diffusion 1.5 UNet + VAE and the DiT-XL/2 transformer + VAE (sd-vae-ft: the same AutoencoderKL
architecture) from their public config values, written below, with random weights, at 256 px, fp32 on the CPU, and
the shipped recipes' students and regressors (``imagenet-sd15-resnet50``: ResNet-50 + FPN/PPM at ``up_blocks.1`` +
``up_blocks.2``, t=261; ``imagenet-dit-vit``: ViT-S/16 at ``transformer_blocks.13``, t=100). One training step is

- live: ``teacher(x)`` (VAE encode of the batch, noise, UNet/DiT to the deepest block), student + regressor forward,
  loss, backward, AdamW step;
- cache: the batch's posterior ``(mean, std)`` as the latent cache stores it (fp16), ``z = mean + std * eps``,
  ``teacher.features(normalize(z))``, then the same student step.

Steps are interleaved (live, cache, cache, live, ...) in one process and the medians compared. Each step is
timed by part (VAE encode, teacher to the deepest block, student forward + backward + optimizer step, regressor
forward + loss + backward), and each part's achieved GFLOP/s is reported, so that a step ratio below the FLOP ratio
can be traced to the part that runs slowly. FLOPs per image of
each part are counted with ``torch.utils.flop_counter`` (distill.cost). Also measured: how far a VAE is from flip
equivariance, ``encode(flip(x))`` vs ``flip(encode(x))`` (posterior means, scaled), against the noise the teacher
adds at the recipe's timestep, on a CamVid frame (random weights: the trained VAE's figure will differ).

    OMP_NUM_THREADS=2 nice -n 10 python bench/latent_cache.py --out bench/results/latent_cache_cpu.json
"""
from __future__ import annotations

import argparse
import statistics
import time

from _common import machine, save

import torch

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                 block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8, norm_num_groups=32,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)  # runwayml/stable-diffusion-v1-5 unet/
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
              block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, sample_size=512, scaling_factor=0.18215)  # SD 1.5 vae/
DIT_XL2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
               patch_size=2, sample_size=32, num_embeds_ada_norm=1000)  # facebook/DiT-XL-2-256 transformer/


def build(kind: str, device: str = "cpu"):
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, UNet2DConditionModel

    from distill.build import build_model
    from distill.recipes import load_recipe
    from distill.teacher import DiTTeacher, LatentDiffusionTeacher

    torch.manual_seed(0)
    torch.set_default_device(device)  # "meta": the same models as shapes only, for counting FLOPs
    vae = AutoencoderKL(**SD_VAE)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if kind == "sd15":
        recipe = load_recipe("imagenet-sd15-resnet50", {"teacher_dtype": "float32", "vae_dtype": "float32"})
        teacher = LatentDiffusionTeacher(UNet2DConditionModel(**SD15_UNET), recipe.teacher_blocks, recipe.timesteps,
                                         sched, vae=vae, conditioning={"encoder_hidden_states": torch.randn(1, 77, 768)},
                                         sample_size=256)
    else:
        recipe = load_recipe("imagenet-dit-vit", {"teacher_dtype": "float32", "vae_dtype": "float32"})
        teacher = DiTTeacher(DiTTransformer2DModel(**DIT_XL2), recipe.teacher_blocks, recipe.timesteps,
                             DDPMScheduler(beta_schedule="linear"), vae=vae, sample_size=256)
    model = build_model(recipe, teacher).train()
    torch.set_default_device("cpu")
    return recipe, teacher, model


def flip_error(teacher, mean: torch.Tensor, mean_of_flip: torch.Tensor) -> dict:
    """RMS of ``normalize(encode(flip(x))) - flip(normalize(encode(x)))`` (posterior means) against the RMS of the
    latent and against the noise the teacher adds at its first timestep, in the noised input's units."""
    a = teacher.normalize_latents(mean_of_flip)
    b = teacher.normalize_latents(mean).flip(-1)
    t = teacher.timesteps[0]
    abar = float(teacher.scheduler.alphas_cumprod[t])
    err = float((a - b).pow(2).mean().sqrt())
    return {"timestep": t, "rms_latent": float(b.pow(2).mean().sqrt()), "rms_flip_error": err,
            "error_over_latent": err / float(b.pow(2).mean().sqrt()),
            "signal_error_over_noise": abar ** 0.5 * err / (1 - abar) ** 0.5}


def camvid_frames(n: int, size: int) -> torch.Tensor:
    """``n`` CamVid training frames at ``size`` px (squashed), ``[n, 3, size, size]`` in [-1, 1]."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    paths = sorted(Path("/work/cache/camvid-240x180/train").iterdir())[:n]
    imgs = [np.asarray(Image.open(p).convert("RGB").resize((size, size))).copy() for p in paths]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1


def run(kind: str, batch: int, repeats: int, warmup: int) -> dict:
    from distill.cost import count_flops, student_step_flops
    from distill.losses import feature_distillation_loss

    recipe, teacher, model = build(kind)
    keys = [f.key for f in teacher.feature_info]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    S = teacher.sample_size
    x = camvid_frames(batch, S)
    with torch.no_grad():  # the image and its flip, as extract --latents encodes them
        both_mean, both_std = teacher.latent_distribution(torch.cat([x, x.flip(-1)]))
    mean, std = both_mean[:batch].half(), both_std[:batch].half()  # what the cache holds
    flip = flip_error(teacher, both_mean[:batch], both_mean[batch:])
    print(kind, "flip", flip, flush=True)

    def student_step(feats, parts):
        """The same math as ``loss(model(x)).backward()``, split at the student's maps so that the student's and
        the regressor's forward + backward are timed apart (the regressor's backward ends at the maps' gradients,
        then the student's backward runs from them)."""
        t0 = time.perf_counter()
        maps = model.student(torch.nn.functional.interpolate(x, size=recipe.student_size))
        t1 = time.perf_counter()
        held = [m.detach().requires_grad_(True) for m in maps]
        loss = feature_distillation_loss(model.regressor(held), [feats[k].float() for k in keys])["total"]
        loss.backward()
        t2 = time.perf_counter()
        used = [(m, h.grad) for m, h in zip(maps, held) if h.grad is not None]  # maps the regressor reads
        torch.autograd.backward([m for m, _ in used], [g for _, g in used])
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        parts["student"] = (t1 - t0) + (t3 - t2)  # forward + backward + AdamW step of the whole model
        parts["regressor"] = t2 - t1  # forward + loss + backward to the maps
        return parts

    def live():
        t0 = time.perf_counter()
        z = teacher.encode(x)  # VAE posterior mean, scaled (as teacher(x) does)
        t1 = time.perf_counter()
        feats = teacher.features(z)  # fresh noise, UNet/DiT to the deepest block
        t2 = time.perf_counter()
        return student_step(feats, {"vae": t1 - t0, "teacher": t2 - t1})

    def cache():
        t0 = time.perf_counter()
        z = mean.float() + std.float() * torch.randn(mean.shape)
        feats = teacher.features(teacher.normalize_latents(z))
        return student_step(feats, {"vae": 0.0, "teacher": time.perf_counter() - t0})

    _, meta_teacher, _ = build(kind, "meta")  # the same models on the meta device: FLOPs without compute
    one = torch.zeros(1, 3, S, S, device="meta")
    z = torch.zeros(1, meta_teacher.model_in_channels, S // 8, S // 8, device="meta")
    flops = {"vae": count_flops(lambda: meta_teacher.encode(one)),
             "teacher": count_flops(lambda: meta_teacher.features(z)),
             **student_step_flops(model.student, model.regressor, recipe.student_size)}
    print(kind, "flops", flops, flush=True)
    live_fl = sum(flops.values())
    cache_fl = live_fl - flops["vae"]
    times = {"live": [], "cache": []}
    parts = {"live": [], "cache": []}
    order = [("live", live), ("cache", cache)]
    for r in range(repeats + warmup):  # the first `warmup` pairs are not timed
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            sub = fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
                parts[name].append(sub)
        print(kind, r, {k: [round(v, 2) for v in t] for k, t in times.items()}, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    part_s = {arm: {k: statistics.median(p[k] for p in rows) for k in rows[0]} for arm, rows in parts.items()}
    # achieved CPU rate of each part (FLOPs per image x batch / median seconds), which explains the step ratio:
    # a part that runs at a lower rate weighs more in time than in FLOPs
    rate = {k: flops[k] * batch / part_s["live"][k] / 1e9 for k in flops if part_s["live"][k] > 0}
    return {"kind": kind, "batch": batch, "image_size": S, "repeats": repeats, "flops_per_image": flops,
            "flops_live": live_fl, "flops_cache": cache_fl, "flop_ratio": live_fl / cache_fl,
            "seconds": times, "median_live_s": med["live"], "median_cache_s": med["cache"],
            "step_ratio": med["live"] / med["cache"], "median_part_s": part_s, "live_gflop_per_s": rate,
            "flip": flip}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", nargs="+", default=["sd15", "dit"], choices=["sd15", "dit"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed (live, cache) pairs first")
    ap.add_argument("--out", default="bench/results/latent_cache_cpu.json")
    args = ap.parse_args()
    at_start, results = machine(), {"runs": []}
    for kind in args.kinds:
        res = run(kind, args.batch, args.repeats, args.warmup)
        results["runs"].append(res)
        print(f"{kind}: FLOPs/image live {res['flops_live'] / 1e9:.1f} G, cache {res['flops_cache'] / 1e9:.1f} G "
              f"(x{res['flop_ratio']:.2f}); CPU step live {res['median_live_s']:.1f} s, cache "
              f"{res['median_cache_s']:.1f} s (x{res['step_ratio']:.2f}); parts (s) {res['median_part_s']}; live GFLOP/s "
              f"{ {k: round(v, 1) for k, v in res['live_gflop_per_s'].items()} }; flip error {res['flip']}", flush=True)
        save(args.out, results, at_start)


if __name__ == "__main__":
    main()
