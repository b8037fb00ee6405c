#!/usr/bin/env python
"""Train a small diffusers ``UNet2DModel`` DDPM teacher on a dataset of ``distill.data``.

The loop follows diffusers' ``examples/unconditional_image_generation/train_unconditional.py``: epsilon
prediction, ``DDPMScheduler`` with 1000 steps, AdamW with warmup + cosine, optional EMA, Accelerate. It
saves a ``DDPMPipeline`` directory (``model_index.json``, ``unet/``, ``scheduler/``) in safetensors, which
``distill.teacher.load_teacher`` and ``diffusers.DDPMPipeline.from_pretrained`` both load.

The shipped Fashion-MNIST teacher was trained with (see distill/teacher/packaged/fashion-mnist-ddpm/README.md):

    OMP_NUM_THREADS=1 python tools/train_teacher.py --dataset fashion-mnist \
        --out distill/teacher/packaged/fashion-mnist-ddpm --steps 3500 --batch-size 32 --lr 5e-4 --ema

and the shipped CIFAR-10 teacher with (see distill/teacher/packaged/cifar10-ddpm-small/README.md):

    OMP_NUM_THREADS=1 python tools/train_teacher.py --dataset image-folder --data-root ~/.cache/distill/cifar10-jpg \
        --out distill/teacher/packaged/cifar10-ddpm-small --unet-config tools/unet_cifar10_small.json \
        --steps 3000 --stop-after 1250 --batch-size 32 --lr 5e-4 --ema --hflip
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.data import build_dataset, collate, to_teacher, to_unit  # noqa: E402

# A small UNet sized for CPU training: 1.1M parameters (4.5 MB in fp32), attention at 8x8.
SMALL_UNET = dict(
    sample_size=32,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=16,
    attention_head_dim=32,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist or image-folder")
    p.add_argument("--data-root", nargs="+", default=None,
                   help="one or more folders (image-folder: their images are pooled, e.g. CAMVID/train CAMVID/val)")
    p.add_argument("--channels", type=int, default=None, help="image channels (default: 1 for fashion-mnist, else 3)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--out", required=True, help="output pipeline directory")
    p.add_argument("--unet-config", default=None, help="JSON file of UNet2DModel kwargs (default: SMALL_UNET)")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--ema", action="store_true", help="keep an EMA of the weights and save it (as diffusers does)")
    p.add_argument("--ema-max-decay", type=float, default=0.999)
    p.add_argument("--hflip", action="store_true", help="random horizontal flips")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (and save) after this many steps, keeping the lr schedule of --steps; "
                        "how the shipped cifar10-ddpm-small teacher was cut at step 1250 of 3000")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--preload", action="store_true",
                   help="decode every image once, resize it to --resolution and keep the set on the device (small "
                        "sets: no data loader in the loop)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="a safety stop: save and stop once training has run this long (training.json records it); "
                        "budgets are steps, this only guards a slower machine")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "float16"],
                   help="dtype of the saved weights (float16 halves the file; distill loads it back in float32)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT.state/ (weights, optimizer, schedule, EMA, RNG, saved every --save-every "
                        "steps) with the same arguments; the loss CSV is continued")
    args = p.parse_args(argv)
    if args.stop_after is not None and not 0 < args.stop_after <= args.steps:
        p.error(f"--stop-after must be in [1, --steps={args.steps}], got {args.stop_after}")
    return args


def save(unet, ema, scheduler, out: Path, info: dict, dtype: str = "float32"):
    if ema is not None:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
    tmp = out.with_name(out.name + ".tmp")
    if dtype == "float32":
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
    else:  # a copy in the smaller dtype; the training weights stay float32
        import copy

        half = copy.deepcopy(unet).to(getattr(torch, dtype))
        DDPMPipeline(unet=half, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
    (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    if ema is not None:
        ema.restore(unet.parameters())
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)


def state_dir(out: Path) -> Path:
    """Where the resumable training state of OUT lives: ``OUT.state/`` (Accelerate's save_state + ``step.json``)."""
    return out.with_name(out.name + ".state")


def save_state(accelerator, out: Path, step: int, seconds: float, loss_ema: float) -> None:
    """Accelerate's full state (model, optimizer, schedule, EMA, RNG) to ``OUT.state/``, written beside and renamed
    into place, so a kill leaves the previous state whole."""
    import shutil

    final, tmp = state_dir(out), out.with_name(out.name + ".state.tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every process: Accelerate writes each one's RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "step.json").write_text(json.dumps({"step": step, "seconds": seconds, "loss_ema": loss_ema}) + "\n")
        old = out.with_name(out.name + ".state.old")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def build_data(args, channels: int):
    """The training images: one dataset, or several image folders pooled (``--data-root A B``)."""
    roots = args.data_root or [None]
    sets = [build_dataset(args.dataset, r, "train", channels=channels) for r in roots]
    return sets[0] if len(sets) == 1 else torch.utils.data.ConcatDataset(sets)


def preload(ds, channels: int, resolution: int, device) -> torch.Tensor:
    """Every image of ``ds`` at the teacher's size and range: ``[N, C, R, R]`` in [-1, 1], on ``device``."""
    out = []
    for i in range(0, len(ds), 256):
        images, _ = collate([ds[j] for j in range(i, min(i + 256, len(ds)))])
        out.append(to_teacher(to_unit(images), channels, resolution))
    return torch.cat(out).to(device)


def preloaded_batches(images: torch.Tensor, batch_size: int, seed: int, start_epoch: int = 0):
    """Endless batches from seeded permutations of the preloaded images (full batches, epoch after epoch)."""
    epoch = start_epoch
    while True:
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        perm = torch.randperm(len(images), generator=g)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            yield images[perm[i:i + batch_size].to(images.device)], None
        epoch += 1


def main(argv=None):
    args = parse_args(argv)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    set_seed(args.seed)
    channels = args.channels or (1 if args.dataset == "fashion-mnist" else 3)
    ds = build_data(args, channels)
    cfg = dict(SMALL_UNET)
    if args.unet_config:
        cfg.update(json.loads(Path(args.unet_config).read_text()))
    cfg.update(sample_size=args.resolution, in_channels=channels, out_channels=channels)
    unet = UNet2DModel(**cfg)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    lr_sched = get_cosine_schedule_with_warmup(opt, args.warmup, args.steps)
    if args.preload:
        images = preload(ds, channels, args.resolution, accelerator.device)
        unet, opt, lr_sched = accelerator.prepare(unet, opt, lr_sched)
        loader = None
    else:
        loader = torch.utils.data.DataLoader(
            ds, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collate,
            num_workers=args.workers, persistent_workers=args.workers > 0,
        )
        unet, opt, loader, lr_sched = accelerator.prepare(unet, opt, loader, lr_sched)
    ema = EMAModel(unet.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, power=0.75) if args.ema else None
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    out = Path(args.out)
    log_path = out.with_name(out.name + ".loss.csv")
    n_params = sum(p.numel() for p in unet.parameters())
    step, seconds_before, ema_loss = 0, 0.0, None
    if args.resume:
        if not (state_dir(out) / "step.json").is_file():
            raise SystemExit(f"--resume: no training state in '{state_dir(out)}' (it is written every --save-every "
                             f"steps); start without --resume.")
        accelerator.load_state(str(state_dir(out)))
        st = json.loads((state_dir(out) / "step.json").read_text())
        step, seconds_before, ema_loss = st["step"], st["seconds"], st["loss_ema"]
        if log_path.is_file():  # keep the rows up to the saved step: later ones were not saved
            rows = log_path.read_text().splitlines()
            log_path.write_text("\n".join(rows[:1] + [r for r in rows[1:] if int(r.split(",")[0]) <= step]) + "\n")
    accelerator.print(f"UNet2DModel: {n_params / 1e6:.2f}M parameters; {len(ds)} images; {args.steps} steps"
                      + (f"; resuming at step {step}" if step else ""))
    last = args.stop_after or args.steps
    t0 = time.time() - seconds_before
    bar = tqdm(total=last, initial=step, disable=not accelerator.is_main_process, desc="teacher")
    if loader is not None:
        batches = (b for _ in iter(int, 1) for b in loader)  # endless; a resumed run reshuffles
    else:
        batches = preloaded_batches(images, args.batch_size, args.seed,
                                    start_epoch=step * args.batch_size // len(images))
    with open(log_path, "a" if step else "w", newline="") as f:
        writer = csv.writer(f)
        if not step:
            writer.writerow(["step", "loss", "loss_ema", "lr", "seconds"])
        while step < last:
            images_b, _ = next(batches)
            # (B, C, R, R) in [-1, 1]
            x0 = images_b if loader is None else to_teacher(to_unit(images_b), channels, args.resolution)
            if args.hflip:
                flip = torch.rand(x0.shape[0], device=x0.device) < 0.5
                x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
            noise = torch.randn_like(x0)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
            xt = scheduler.add_noise(x0, noise, t)
            with accelerator.accumulate(unet):
                pred = unet(xt, t).sample
                loss = F.mse_loss(pred.float(), noise)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), 1.0)
                opt.step()
                lr_sched.step()
                opt.zero_grad()
            if ema is not None:
                ema.step(unet.parameters())
            step += 1
            lv = loss.item()
            ema_loss = lv if ema_loss is None else 0.98 * ema_loss + 0.02 * lv
            writer.writerow([step, f"{lv:.5f}", f"{ema_loss:.5f}", f"{lr_sched.get_last_lr()[0]:.3e}",
                             f"{time.time() - t0:.1f}"])
            bar.update(1)
            bar.set_postfix(loss=f"{ema_loss:.4f}")
            timed_out = args.time_limit is not None and time.time() - t0 > args.time_limit and step < last
            if timed_out:
                accelerator.print(f"--time-limit {args.time_limit:g}s reached at step {step} of {last}: saving and "
                                  f"stopping")
            if step % args.save_every == 0 or step == last or timed_out:
                f.flush()
                if accelerator.is_main_process:
                    info = dict(command="python tools/train_teacher.py " + " ".join(sys.argv[1:] if argv is None else argv),
                                step=step, loss_ema=round(ema_loss, 5), seconds=round(time.time() - t0, 1),
                                params=n_params, dataset=args.dataset, resolution=args.resolution, ema=args.ema,
                                images=len(ds), batch_size=args.batch_size, mixed_precision=args.mixed_precision,
                                save_dtype=args.save_dtype, torch=torch.__version__, threads=torch.get_num_threads(),
                                device=str(accelerator.device), planned_steps=last, stopped_by_time_limit=timed_out)
                    save(accelerator.unwrap_model(unet), ema, scheduler, out, info, args.save_dtype)
                save_state(accelerator, out, step, round(time.time() - t0, 1), ema_loss)
            if timed_out:
                break
    bar.close()
    accelerator.print(f"done: {step} steps, smoothed loss {ema_loss:.4f}, {time.time() - t0:.0f}s -> {out}")


if __name__ == "__main__":
    main()
