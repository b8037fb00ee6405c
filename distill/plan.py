"""``distill plan``: what a recipe will cost before it runs: parameters, FLOPs, memory, disk and time.

`plan_recipe` checks the recipe as ``train`` does (keys, data, teacher), reads one image, builds the teacher
(its real weights: it runs once on one image to count its FLOPs) and the student + regressor on the meta device
(shapes only), and estimates per process:

- FLOPs per image by part (`distill.trainer.cost`: VAE, teacher to the deepest block, student and regressor
  forward + backward), and per optimizer step (``batch_size x grad_accum_steps`` images);
- memory: the teacher's weights; the student's and regressor's weights, gradients and optimizer state (fp32:
  4 + 4 bytes per parameter, plus 8 for AdamW / LAMB's two moments or 4 for SGD's momentum); the activations the
  backward keeps (the bytes of every tensor autograd saves in a meta-device forward, per image, times the batch);
  plus, on the CPU, this process's own resident memory before the models are built (Python, torch, the data);
- disk: what ``distill extract`` would write (features: ``draws x`` every teacher feature in float16; latents:
  ``flips x (mean, std)`` in float16 for a latent teacher);
- time per step, per epoch and for the recipe's ``steps``: step FLOPs / (peak x MFU). The peak is the GPU's dense
  datasheet figure (`distill.cost.PEAK_TFLOPS`, ``--gpu NAME``) or, on a CPU, this CPU's fp32 matmul rate
  measured here; the MFU is assumed (`DEFAULT_MFU` unless given).

A precision the device cannot run fast is flagged: on a CPU, a bf16 / fp16 step is timed against fp32 matmuls.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .build import build_model, build_teacher, build_train_data, target_layout
from .cost import cpu_rate, peak_tflops, step_precision, student_step_flops
from .errors import option
from .latent_cache import num_flips
from .trainer.cost import teacher_flops

#: The MFU assumed when none is given: a typical share of the dense peak that mixed-precision training of CNNs /
#: ViTs reaches on data-centre GPUs (an assumption, stated in the output; ``--mfu`` replaces it).
DEFAULT_MFU = 0.4
_OPT_STATE_BYTES = {"adamw": 8, "lamb": 8, "sgd": 4}


def saved_activation_bytes(model: torch.nn.Module, size: int) -> int:
    """Bytes of the activations autograd saves for the backward in one training forward of ``model`` on ``[2, 3,
    size, size]`` (a meta-device copy: no memory, no time), per image: each storage once, the weights left out."""
    import copy

    m = copy.deepcopy(model).to("meta").train()
    weights = {t.untyped_storage()._cdata for t in [*m.parameters(), *m.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):  # a tensor saved by several ops (a conv output read by its norm and activation) counts once
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(torch.zeros(2, 3, size, size, device="meta"))
    return sum(saved.values()) // 2


def _rss() -> int:
    """This process's resident memory in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def _nbytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values()) if module is not None else 0


def plan_recipe(recipe, processes: int = 1, gpu: Optional[str] = None, mfu: Optional[float] = None) -> dict:
    """Estimate a run of ``recipe`` on ``processes`` processes (see the module docstring).

    Args:
        gpu: a GPU name of `distill.cost.PEAK_TFLOPS` (``H100``, ``A100``, ...); default: this machine's CUDA
            device, else its CPU (rate measured).
        mfu: the assumed model FLOPs utilisation in (0, 1] (default `DEFAULT_MFU`).

    Raises:
        ValueError: a recipe ``train`` would refuse; an unknown ``gpu``; ``processes`` < 1; ``mfu`` outside (0, 1].
    """
    if processes < 1:
        raise ValueError(f"{option('processes')} {processes} must be >= 1.")
    mfu = DEFAULT_MFU if mfu is None else float(mfu)
    if not 0 < mfu <= 1:
        raise ValueError(f"{option('mfu')} {mfu} must be in (0, 1] (a fraction of the peak, e.g. 0.4).")
    precision = step_precision(recipe.mixed_precision, recipe.teacher_dtype)
    if gpu is None and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name()
    peak = None
    if gpu is not None:
        peak = peak_tflops(gpu if gpu.upper().startswith("NVIDIA") else f"NVIDIA {gpu}", precision)
        if peak is None:
            raise ValueError(f"{option('gpu')} {gpu!r} has no known peak; valid: H100, H100 PCIe, H100 NVL, H200, "
                             f"H200 NVL, A100, L40S, L4, RTX 4090 (or leave it out to time this machine's CPU).")
    base_rss = _rss()
    ds, channels = build_train_data(recipe)
    ds[0]  # one image read and decoded, as training reads them
    timesteps = recipe.timesteps if isinstance(recipe.timesteps, list) else recipe.timestep_candidates[:1]
    teacher = build_teacher(recipe, channels, timesteps)
    layout = target_layout(recipe, teacher)
    with torch.device("meta"):
        model = build_model(recipe, teacher, layout)
    live = not recipe.feature_cache
    flops = teacher_flops(teacher, live)
    if recipe.latent_cache:
        flops["vae"] = 0
    flops.update(student_step_flops(model.student, model.regressor, recipe.student_size))
    per_image = sum(flops.values())
    images_per_step = recipe.batch_size * recipe.grad_accum_steps  # per process
    trainable = _numel(model)
    act = saved_activation_bytes(model, recipe.student_size)
    vae = getattr(teacher, "vae", None)
    teacher_bytes = 0 if recipe.feature_cache else _nbytes(teacher.model) + (0 if recipe.latent_cache else _nbytes(vae))
    memory = {"teacher_weights": teacher_bytes,
              "student_weights_grads_optimizer": trainable * (8 + _OPT_STATE_BYTES.get(recipe.optimizer, 8)),
              "activations": act * recipe.batch_size * (1 if recipe.mixed_precision == "no" else 0.5)}
    if gpu is None:
        memory["process_baseline"] = base_rss
    memory = {k: int(v) for k, v in memory.items()}
    flags = []
    if gpu is None:
        rate, slow = cpu_rate(precision)
        if slow:
            flags.append(slow)
        device, peak_flops = f"cpu ({torch.get_num_threads()} threads, matmul rate measured)", rate
    else:
        device, peak_flops = gpu, peak * 1e12
    step_s = per_image * images_per_step / (peak_flops * mfu)
    steps_per_epoch = max(1, len(ds) // (recipe.batch_size * recipe.grad_accum_steps * processes))
    feat_bytes = sum(f.num_chs * f.size[0] * f.size[1] for f in teacher.feature_info) * 2 * 2  # 2 draws, fp16
    latent_bytes = (2 * num_flips(recipe.augment) * teacher.model_in_channels * teacher.model_sample_size ** 2 * 2
                    if vae is not None else None)
    return {
        "num_images": len(ds), "processes": processes, "device": device, "precision": precision,
        "params": {"teacher": _numel(teacher.model), "vae": _numel(vae), "student": _numel(model.student),
                   "regressor": _numel(model.regressor)},
        "flops_per_image": flops, "flops_per_image_total": per_image, "flops_per_step": per_image * images_per_step,
        "memory_per_process": memory, "memory_total": sum(memory.values()),
        "activation_bytes_per_image": act,
        "disk": {"features": feat_bytes * len(ds), "latents": None if latent_bytes is None else latent_bytes * len(ds)},
        "peak_flops": peak_flops, "mfu_assumed": mfu, "step_seconds": step_s, "steps_per_epoch": steps_per_epoch,
        "epoch_seconds": step_s * steps_per_epoch, "total_seconds": step_s * recipe.steps, "flags": flags,
    }


def format_plan(p: dict) -> str:
    """The plan as the text ``distill plan`` prints."""
    g = lambda v: f"{v / 1e9:.4g}"  # noqa: E731
    gib = lambda v: f"{v / 2**30:.2f} GiB"  # noqa: E731
    lines = [f"device: {p['device']}, {p['precision']}, {p['processes']} process(es); {p['num_images']} images",
             "params: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in p["params"].items()),
             "GFLOP per image: " + ", ".join(f"{k} {g(v)}" for k, v in p["flops_per_image"].items())
             + f"; total {g(p['flops_per_image_total'])} (student, regressor: forward + backward)",
             "memory per process: " + ", ".join(f"{k} {gib(v)}" for k, v in p["memory_per_process"].items())
             + f"; total {gib(p['memory_total'])} (activations: tensors autograd saves, counted on meta)",
             f"disk for distill extract: features {gib(p['disk']['features'])} (2 draws, float16)"
             + ("" if p["disk"]["latents"] is None else f", latents {gib(p['disk']['latents'])} (float16, --latents)"),
             f"time at MFU {p['mfu_assumed']:.0%} of {p['peak_flops'] / 1e12:.4g} TFLOP/s: step "
             f"{p['step_seconds']:.3g} s, epoch ({p['steps_per_epoch']} steps) {p['epoch_seconds'] / 3600:.3g} h, "
             f"recipe {p['total_seconds'] / 3600:.3g} h"]
    return "\n".join(lines + [f"warning: {f}" for f in p["flags"]])
