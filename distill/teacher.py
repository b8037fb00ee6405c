"""A frozen diffusion teacher that returns features of named blocks at chosen timesteps.

The wrapper noises a clean batch with the model's scheduler (``add_noise`` in fp32, fresh noise per call,
seedable), runs one forward with all requested timesteps batched together, collects block outputs with
forward hooks and stops the forward right after the deepest requested block (early exit). Like timm's
``feature_info``, it reports the channels and stride of every (block, timestep) feature, found by a dry run.

It wraps a diffusers ``UNet2DModel`` (hub id, local directory, config dict) or any module whose forward
takes ``(noisy_image, timestep)``; :class:`LatentDiffusionTeacher` adds a VAE and text conditioning (Stable
Diffusion's ``UNet2DConditionModel``) and :class:`DiTTeacher` a class-conditional DiT whose tokens are returned as
maps. :func:`load_teacher` picks the class from the model's config. A teacher is never given to
``accelerator.prepare``: move it with ``.to()``.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

_logger = logging.getLogger(__name__)

PACKAGED_TEACHERS_DIR = Path(__file__).resolve().parent / "teachers"


class _EarlyExit(Exception):
    """Raised from the hook of the deepest requested block to skip the rest of the forward."""


@dataclass(frozen=True)
class TeacherFeatureInfo:
    """Shape of one teacher feature: block name, timestep, channels, stride and spatial size."""

    block: str
    timestep: int
    num_chs: int
    reduction: int
    size: tuple[int, int]

    @property
    def key(self) -> str:
        return feature_key(self.block, self.timestep)


def feature_key(block: str, timestep: Optional[int]) -> str:
    """Key of a teacher feature in the dict returned by :class:`DiffusionTeacher`: ``'up_blocks.1@t11'``, or
    ``'up_blocks.1@t*'`` for ``timestep=None`` (each image at its own, per-image timestep). The one place keys are
    built; :func:`parse_feature_key` is its inverse."""
    return f"{block}@t{'*' if timestep is None else int(timestep)}"


def parse_feature_key(key: str) -> tuple[str, Optional[int]]:
    """Inverse of :func:`feature_key`: ``'up_blocks.1@t11'`` -> ``('up_blocks.1', 11)``, ``'mid_block@t*'`` ->
    ``('mid_block', None)``.

    Raises:
        ValueError: ``key`` is not of the form ``'<block>@t<int>'`` or ``'<block>@t*'``.
    """
    block, sep, t = key.rpartition("@t")
    if not sep or not block or not (t == "*" or t.isdigit()):
        raise ValueError(f"feature key {key!r} is not of the form '<block>@t<timestep>' (e.g. 'mid_block@t11') or "
                         f"'<block>@t*'.")
    return block, None if t == "*" else int(t)


def packaged_teachers() -> list[str]:
    """Names of the teachers shipped inside the package (usable as ``teacher: NAME`` in a recipe)."""
    if not PACKAGED_TEACHERS_DIR.is_dir():
        return []
    return sorted(p.name for p in PACKAGED_TEACHERS_DIR.iterdir() if (p / "model_index.json").is_file())


def candidate_blocks(model: nn.Module, max_depth: int = 3) -> list[str]:
    """Module paths a user can ask for: every named module up to ``max_depth`` dots deep, in model order."""
    return [n for n, _ in model.named_modules() if n and n.count(".") < max_depth]


class DiffusionTeacher(nn.Module):
    """Frozen diffusion model + scheduler that extracts block features of noised images.

    Args:
        model: ``UNet2DModel`` or any module called as ``model(x_t, t, **forward_kwargs)``.
        blocks: module paths (``'mid_block'``, ``'up_blocks.1'``, ``'up_blocks.1.resnets.2'``); down blocks
            return ``(hidden, residuals)``: the hidden state (element 0) is taken.
        timesteps: default timesteps, each in ``[0, T)``; ``forward`` can override them.
        scheduler: a diffusers noise scheduler with ``add_noise``; default ``DDPMScheduler(1000)``.
        in_channels, sample_size: the model's input; read from ``model.config`` when it has one.
        forward_kwargs: extra keyword arguments for every forward (e.g. ``encoder_hidden_states``).
    """

    #: pixels per model-input pixel (a latent teacher's VAE downsampling factor); 1 for a pixel-space model.
    latent_scale: int = 1

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[str],
        timesteps: Sequence[int] = (11,),
        scheduler: Any = None,
        in_channels: Optional[int] = None,
        sample_size: Optional[int] = None,
        forward_kwargs: Optional[Mapping[str, Any]] = None,
        name: str = "custom",
    ):
        super().__init__()
        self._init_teacher(model, blocks, timesteps, scheduler, in_channels, sample_size, forward_kwargs, name)

    def _init_teacher(self, model, blocks, timesteps, scheduler, in_channels, sample_size, forward_kwargs, name):
        """Everything but ``nn.Module.__init__``: subclasses register their own modules first, then call this."""
        if scheduler is None:
            from diffusers import DDPMScheduler

            scheduler = DDPMScheduler(num_train_timesteps=1000)
        config = getattr(model, "config", None)
        get = (lambda k: getattr(config, k, None) if not isinstance(config, Mapping) else config.get(k))
        # The model's own input (latents for a latent teacher) ...
        self.model_in_channels = int(in_channels or (get("in_channels") if config is not None else 0) or 0)
        size = sample_size or (get("sample_size") if config is not None else None)
        self.model_sample_size = int(size[0] if isinstance(size, (tuple, list)) else size) if size else 0
        if not self.model_in_channels or not self.model_sample_size:
            raise ValueError(
                f"cannot tell the teacher's input (in_channels={self.model_in_channels or None}, "
                f"sample_size={self.model_sample_size or None}); pass in_channels= and sample_size= for a model "
                f"without a diffusers config."
            )
        # ... and the images the caller gives (pixels): what the trainer resizes to and feature strides refer to.
        self.in_channels = self._image_channels()
        self.sample_size = self.model_sample_size * self.latent_scale
        self.model = model.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.forward_kwargs = dict(forward_kwargs or {})
        self.name = name
        modules = dict(model.named_modules())
        blocks = list(blocks)
        if not blocks:
            raise ValueError(f"teacher_blocks is empty; choose from: {', '.join(candidate_blocks(model, 2))}.")
        for b in blocks:
            if b not in modules or b == "":
                close = difflib.get_close_matches(b, list(modules), n=3)
                hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
                raise ValueError(
                    f"unknown teacher block {b!r}.{hint} Valid blocks (module paths; deeper paths such as "
                    f"'up_blocks.1.resnets.0' work too): {', '.join(candidate_blocks(model, 2))}."
                )
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"teacher_blocks has duplicates: {blocks}.")
        self.blocks = blocks
        self.timesteps = self.check_timesteps(timesteps)
        self._modules_by_block = {b: modules[b] for b in blocks}
        self._stop_block: Optional[str] = None
        self.feature_info = self._dry_run()

    # Hooks for subclasses (identity for a pixel-space model).
    def _image_channels(self) -> int:
        """Channels of the images the caller gives."""
        return self.model_in_channels

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """Clean images ``[B, in_channels, S, S]`` -> the model's clean input, fp32 (identity here)."""
        return x0.float()

    def _model_kwargs(self, batch: int) -> dict[str, Any]:
        """Keyword arguments of one model forward on ``batch`` inputs (``B*K`` when K timesteps are batched)."""
        return self.forward_kwargs

    def _feature_map(self, block: str, out: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """A hooked block output -> ``[B, C, H, W]`` (identity here)."""
        return out

    # Frozen: train() keeps the wrapped model in eval mode, so dropout/BN never switch on.
    def train(self, mode: bool = True):
        super().train(False)
        return self

    def check_timesteps(self, timesteps: Sequence[int]) -> list[int]:
        """Validate a list of timesteps against ``[0, T)``; returns them as ints."""
        ts = [timesteps] if isinstance(timesteps, int) else list(timesteps)
        if not ts:
            raise ValueError(f"timesteps is empty; give one or more integers in [0, {self.num_train_timesteps}).")
        bad = [t for t in ts if not isinstance(t, (int,)) or isinstance(t, bool) or not 0 <= t < self.num_train_timesteps]
        if bad:
            raise ValueError(
                f"timesteps {bad} are outside [0, {self.num_train_timesteps}) for this teacher's scheduler "
                f"(num_train_timesteps={self.num_train_timesteps}); use integers such as 11 (small noise works best "
                f"for recognition, DDAE)."
            )
        return [int(t) for t in ts]

    def set_timesteps(self, timesteps: Sequence[int]) -> "DiffusionTeacher":
        """Change the default timesteps (validated) and recompute ``feature_info``; returns ``self``."""
        self.timesteps = self.check_timesteps(timesteps)
        self.feature_info = self._dry_run()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _run(self, x_t: torch.Tensor, t: torch.Tensor, stop: Optional[str]) -> dict[str, torch.Tensor]:
        feats: dict[str, torch.Tensor] = {}
        order: list[str] = []

        def make_hook(name: str):
            def hook(_module, _inputs, output):
                out = output[0] if isinstance(output, (tuple, list)) else output
                out = getattr(out, "sample", out)
                feats[name] = out
                order.append(name)
                if name == stop and len(feats) == len(self.blocks):
                    raise _EarlyExit

            return hook

        handles = [m.register_forward_hook(make_hook(b)) for b, m in self._modules_by_block.items()]
        try:
            self.model(x_t, t, **self._model_kwargs(x_t.shape[0]))
        except _EarlyExit:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [b for b in self.blocks if b not in feats]
        if missing:
            raise RuntimeError(f"teacher blocks {missing} never ran in the forward; pick blocks on the forward path.")
        self._last_order = order
        return {b: self._feature_map(b, f, x_t) for b, f in feats.items()}

    @torch.no_grad()
    def _dry_run(self) -> list[TeacherFeatureInfo]:
        s = self.model_sample_size  # model space (latents for a latent teacher): the VAE is not needed for shapes
        x = torch.zeros(1, self.model_in_channels, s, s, device=self.device, dtype=self.dtype)
        t = torch.zeros(1, dtype=torch.long, device=self.device)
        feats = self._run(x, t, stop=None)
        self._stop_block = self._last_order[-1]  # deepest requested block in execution order
        info = []
        for t_ in self.timesteps:
            for b in self.blocks:
                f = feats[b]
                if f.ndim != 4:
                    raise ValueError(f"teacher block {b!r} returns a tensor of shape {tuple(f.shape)}, not [B, C, H, W].")
                info.append(TeacherFeatureInfo(b, t_, f.shape[1], self.sample_size // f.shape[-1], tuple(f.shape[-2:])))
        return info

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with fresh ``eps``, computed in fp32."""
        x0 = x0.float()
        eps = torch.randn(x0.shape, generator=generator, device=x0.device if generator is None else generator.device)
        return self.scheduler.add_noise(x0, eps.to(x0.device), t)

    @torch.no_grad()
    def forward(
        self,
        x0: torch.Tensor,
        timesteps: Union[None, Sequence[int], torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> dict[str, torch.Tensor]:
        """Features of ``x0`` (``[B, C, H, W]`` in [-1, 1]) at every requested block and timestep.

        Args:
            x0: clean images in [-1, 1], at the teacher's channels and size.
            timesteps: a list of K timesteps (all K for every image, batched into one forward of B*K), or a
                LongTensor ``[B]`` with one timestep per image (key ``'<block>@t*'``). Default: the constructor's.
            generator: seeds the noise.

        Returns:
            ``{'<block>@t<t>': [B, C_b, H_b, W_b]}`` in the model's dtype; for per-image timesteps the key is
            ``'<block>@t*'``.
        """
        if x0.shape[1] != self.in_channels or x0.shape[-1] != self.sample_size:
            raise ValueError(
                f"teacher input has shape {tuple(x0.shape)}; this teacher takes [B, {self.in_channels}, "
                f"{self.sample_size}, {self.sample_size}] (convert with distill.data.to_teacher)."
            )
        B = x0.shape[0]
        x0 = self.encode(x0)  # (B, C_model, S_model, S_model), fp32; once per image, not per timestep
        if isinstance(timesteps, torch.Tensor):
            if timesteps.shape != (B,):
                raise ValueError(f"per-image timesteps must have shape ({B},), got {tuple(timesteps.shape)}.")
            self.check_timesteps(timesteps.tolist())
            keys_t: list = ["*"]
            t = timesteps.to(x0.device, torch.long)
            x_rep = x0
        else:
            ts = self.timesteps if timesteps is None else self.check_timesteps(timesteps)
            keys_t = ts
            t = torch.tensor(ts, device=x0.device, dtype=torch.long).repeat_interleave(B)  # (K*B,)
            x_rep = x0.repeat(len(ts), 1, 1, 1)  # (K*B, C, H, W): timestep-major
        x_t = self.add_noise(x_rep, t, generator).to(self.dtype)
        feats = self._run(x_t, t, stop=self._stop_block)
        out = {}
        for k, t_ in enumerate(keys_t):
            for b in self.blocks:
                key = feature_key(b, None if t_ == "*" else t_)
                out[key] = feats[b][k * B:(k + 1) * B]  # (B, C_b, H_b, W_b)
        return out


# ----------------------------------------------------------------------------------------------- latent teachers
VAE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
EMBEDDING_FILENAME = "empty_prompt_embedding.safetensors"
SD_EXTRA_HINT = 'pip install -e ".[sd]" (or pip install "transformers>=4.40")'


class MissingDependencyError(ImportError, ValueError):
    """An optional dependency is missing (a ValueError too, so the CLI prints the message and exits with 2)."""


def resolve_vae_dtype(value: Union[str, torch.dtype]) -> torch.dtype:
    """``'float32'`` or ``'bfloat16'`` (or the torch dtype) -> the VAE's dtype. float16 is refused: SD-style VAEs
    overflow to NaN/Inf in fp16 (diffusers' own pipelines upcast them)."""
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    key = names.get(value, str(value)) if isinstance(value, torch.dtype) else str(value)
    key = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(key, key)
    if key == "float16":
        raise ValueError(
            f"vae_dtype {value!r} is refused: the VAE overflows to NaN/Inf in float16. Valid: "
            f"{', '.join(VAE_DTYPES)}. Fix: set vae_dtype: bfloat16 (or float32) in the recipe; teacher_dtype: "
            f"float16 still applies to the UNet/DiT."
        )
    if key not in VAE_DTYPES:
        raise ValueError(f"vae_dtype {value!r} is not supported; valid: {', '.join(VAE_DTYPES)} (fix: vae_dtype: float32).")
    return VAE_DTYPES[key]


def vae_scale_factor(vae: nn.Module) -> int:
    """Pixels per latent pixel of an ``AutoencoderKL``: ``2 ** (len(block_out_channels) - 1)`` (8 for SD)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


class LatentDiffusionTeacher(DiffusionTeacher):
    """A latent diffusion model (Stable Diffusion's ``UNet2DConditionModel``, a DiT, ...) fed with images.

    Each call encodes the images ``[B, 3, S, S]`` (in [-1, 1]) once with the VAE,
    ``z0 = vae.encode(x).latent_dist.mean * scaling_factor`` (the posterior mean: deterministic; minus
    ``shift_factor`` first for VAEs that have one), then noises ``z0`` in latent space and runs the model exactly
    as :class:`DiffusionTeacher` does on pixels (batched timesteps, hooks, early exit). ``conditioning`` tensors
    (``[1, ...]``, e.g. ``encoder_hidden_states``: the empty-prompt embedding ``[1, 77, D]``) are expanded to the
    batch of every forward (``B*K`` when K timesteps are batched).

    ``in_channels`` / ``sample_size`` are the pixel ones (3, ``latent size x VAE factor``); ``feature_info`` strides
    are relative to pixels. Without a VAE the caller gives latents and the sizes are the model's.

    Args:
        model: the latent model, called as ``model(z_t, t, **conditioning)``.
        blocks, timesteps, scheduler, forward_kwargs, name: as :class:`DiffusionTeacher`.
        vae: an ``AutoencoderKL`` (frozen here), or ``None``.
        vae_dtype: ``'float32'`` or ``'bfloat16'``; float16 is refused (the VAE overflows).
        conditioning: ``{keyword: tensor [1, ...]}`` passed to every forward, expanded to its batch.
        sample_size: image resolution in pixels (default: the model's ``sample_size`` x the VAE factor); a multiple
            of the VAE factor.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[str],
        timesteps: Sequence[int] = (11,),
        scheduler: Any = None,
        vae: Optional[nn.Module] = None,
        vae_dtype: Union[str, torch.dtype] = "float32",
        conditioning: Optional[Mapping[str, torch.Tensor]] = None,
        sample_size: Optional[int] = None,
        forward_kwargs: Optional[Mapping[str, Any]] = None,
        name: str = "custom",
    ):
        nn.Module.__init__(self)
        self.vae_dtype = resolve_vae_dtype(vae_dtype)
        if vae is not None and next(vae.parameters()).dtype != self.vae_dtype:
            vae = vae.to(self.vae_dtype)  # a module given as is; load_latent_model loads in the right dtype
        self.vae = None if vae is None else vae.eval().requires_grad_(False)
        self.latent_scale = 1 if vae is None else vae_scale_factor(vae)
        self._conditioning: list[str] = []
        for key, value in (conditioning or {}).items():
            value = torch.as_tensor(value)
            if value.ndim == 0 or value.shape[0] != 1:
                raise ValueError(f"conditioning {key!r} must have batch size 1 ([1, ...]), got {tuple(value.shape)}.")
            self.register_buffer(f"cond_{key}", value)  # in state_dict(): what a feature cache keys on
            self._conditioning.append(key)
        model_size = None
        if sample_size:
            if sample_size % self.latent_scale:
                raise ValueError(
                    f"teacher resolution {sample_size} px is not a multiple of the VAE factor {self.latent_scale}; "
                    f"valid: multiples of {self.latent_scale} (e.g. {max(1, round(sample_size / self.latent_scale)) * self.latent_scale})."
                )
            model_size = sample_size // self.latent_scale
        self._init_teacher(model, blocks, timesteps, scheduler, None, model_size, forward_kwargs, name)

    def _image_channels(self) -> int:
        if self.vae is None:
            return self.model_in_channels
        latent = int(self.vae.config.latent_channels)
        if latent != self.model_in_channels:
            raise ValueError(
                f"the VAE gives {latent}-channel latents but the model takes in_channels={self.model_in_channels}; "
                f"use the VAE of the model's own pipeline."
            )
        return int(self.vae.config.in_channels)

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, S, S]`` in [-1, 1] -> scaled latents ``[B, C_lat, S/f, S/f]``, fp32."""
        if self.vae is None:
            return x0.float()
        z = self.vae.encode(x0.to(self.vae_dtype)).latent_dist.mean.float()
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift is not None:
            z = z - float(shift)
        return z * float(self.vae.config.scaling_factor)

    def conditioning(self, key: str) -> torch.Tensor:
        """The ``[1, ...]`` conditioning tensor passed as ``key`` (e.g. ``'encoder_hidden_states'``)."""
        return getattr(self, f"cond_{key}")

    def _model_kwargs(self, batch: int) -> dict[str, Any]:
        kwargs = dict(self.forward_kwargs)
        for key in self._conditioning:
            value = self.conditioning(key)
            if value.is_floating_point():
                value = value.to(self.dtype)
            kwargs[key] = value.expand(batch, *value.shape[1:])
        return kwargs


class DiTTeacher(LatentDiffusionTeacher):
    """A DiT (diffusers ``DiTTransformer2DModel``) used unconditionally: ``class_labels`` is the null class
    (index ``num_embeds_ada_norm``, the label classifier-free guidance drops to), expanded to the batch.

    Blocks are ``transformer_blocks.N`` (or modules inside them); their tokens ``[B, N, C]``, row-major over the
    patch grid as ``PatchEmbed`` flattens them, are returned as maps ``[B, C, H/p, W/p]`` (``H`` the latent size,
    ``p`` the patch size). The forward stops after the deepest requested block. Other arguments as
    :class:`LatentDiffusionTeacher` (a real DiT pipeline has a VAE: ``facebook/DiT-XL-2-256``).
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[str],
        timesteps: Sequence[int] = (11,),
        scheduler: Any = None,
        vae: Optional[nn.Module] = None,
        vae_dtype: Union[str, torch.dtype] = "float32",
        sample_size: Optional[int] = None,
        name: str = "custom",
    ):
        depth = len(getattr(model, "transformer_blocks", []))
        modules = dict(model.named_modules())
        for b in [blocks] if isinstance(blocks, str) else list(blocks):
            if b not in modules or not b.startswith("transformer_blocks."):
                raise ValueError(
                    f"unknown DiT block {b!r}: this DiT has {depth} transformer blocks; valid: transformer_blocks.0 "
                    f"... transformer_blocks.{depth - 1} (or a module inside one, e.g. transformer_blocks.0.attn1); "
                    f"the middle one, transformer_blocks.{depth // 2}, is a good start."
                )
        null_class = int(model.config.num_embeds_ada_norm)
        try:
            rows = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings
        except AttributeError:
            rows = null_class + 1
        if rows <= null_class:
            raise ValueError(f"this DiT's class embedding has no null class (rows={rows}, num_classes={null_class}); "
                             f"it was trained without class dropout and cannot be used unconditionally.")
        super().__init__(model, blocks, timesteps, scheduler, vae=vae, vae_dtype=vae_dtype,
                         conditioning={"class_labels": torch.tensor([null_class])}, sample_size=sample_size, name=name)

    def _feature_map(self, block: str, out: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, h*w, C]`` -> ``[B, C, h, w]`` with ``h, w`` the patch grid of ``x_t``."""
        p = int(self.model.config.patch_size)
        h, w = x_t.shape[-2] // p, x_t.shape[-1] // p
        if out.ndim != 3 or out.shape[1] != h * w:
            raise ValueError(
                f"DiT block {block!r} returns shape {tuple(out.shape)}, not tokens [B, {h * w}, C] of the {h}x{w} "
                f"patch grid; choose transformer_blocks.N."
            )
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], h, w)


# ----------------------------------------------------------------------------------------------- text embedding
def distill_cache_dir() -> Path:
    """``$DISTILL_CACHE_DIR`` or ``~/.cache/distill``: where derived files go when the teacher's own directory is
    not writable (or the teacher is a hub id)."""
    return Path(os.environ.get("DISTILL_CACHE_DIR") or "~/.cache/distill").expanduser()


def load_prompt_embedding(value: Union[str, Path, torch.Tensor], cross_attention_dim: Optional[int] = None) -> torch.Tensor:
    """A user-given text embedding -> ``[1, L, D]`` fp32.

    ``value`` is a tensor (``[L, D]`` or ``[1, L, D]``) or a file: ``.safetensors`` (one tensor, or the key
    ``prompt_embedding``) or ``.pt``/``.pth``/``.bin`` read with ``torch.load(weights_only=True)`` (a tensor or a
    dict of one). ``cross_attention_dim``, when given, must equal ``D``.
    """
    where = "prompt_embedding"
    if not isinstance(value, torch.Tensor):
        path = Path(value).expanduser()
        where = f"prompt_embedding '{path}'"
        if not path.is_file():
            raise FileNotFoundError(f"{where} does not exist; give a [1, 77, D] tensor file (.safetensors or .pt).")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            value = load_file(str(path))
        elif path.suffix in (".pt", ".pth", ".bin"):
            try:
                value = torch.load(str(path), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:  # weights_only refuses anything but tensors and plain containers
                raise ValueError(f"{where} is not a plain tensor file (torch.load(weights_only=True) refused it: "
                                 f"{str(e).splitlines()[0]}); save it with torch.save(tensor, path).") from e
        else:
            raise ValueError(f"{where} has suffix {path.suffix!r}; valid: .safetensors, .pt, .pth, .bin.")
        if isinstance(value, Mapping):
            tensors = {k: v for k, v in value.items() if isinstance(v, torch.Tensor)}
            if "prompt_embedding" in tensors:
                value = tensors["prompt_embedding"]
            elif len(tensors) == 1:
                value = next(iter(tensors.values()))
            else:
                raise ValueError(f"{where} holds tensors {sorted(tensors)}; save one tensor, or name it 'prompt_embedding'.")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where} holds a {type(value).__name__}, not a tensor.")
    emb = value.detach().float().cpu()
    if emb.ndim == 2:
        emb = emb[None]
    if emb.ndim != 3 or emb.shape[0] != 1:
        raise ValueError(f"{where} has shape {tuple(emb.shape)}; expected [1, L, D] (e.g. [1, 77, 768] for SD 1.x).")
    if cross_attention_dim is not None and emb.shape[-1] != int(cross_attention_dim):
        raise ValueError(
            f"{where} has width {emb.shape[-1]} but the UNet's cross_attention_dim is {cross_attention_dim}; use the "
            f"embedding of the same pipeline's text encoder."
        )
    return emb


def _sha256_file(path: Path) -> Optional[str]:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def embedding_cache_files(source: str, local: Optional[Path]) -> list[Path]:
    """Where the empty-prompt embedding of ``source`` is cached, in the order they are read and tried for writing:
    ``<teacher_dir>/empty_prompt_embedding.safetensors``, then ``<cache dir>/prompt-embeddings/<name>-<hash>``
    keyed by the teacher's resolved path (or hub id)."""
    key = str(local.resolve()) if local is not None else str(source)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_")[-60:]
    home = distill_cache_dir() / "prompt-embeddings" / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors"
    return ([local / EMBEDDING_FILENAME] if local is not None else []) + [home]


def _encode_empty_prompt(src: str, source: str, local: Optional[Path]) -> torch.Tensor:
    """Run the pipeline's tokenizer + CLIP text encoder on ``""`` as the SD pipelines do -> ``[1, 77, D]``."""
    try:
        from transformers import AutoTokenizer, CLIPTextModel
    except ImportError as e:
        raise MissingDependencyError(
            f"teacher {source!r} needs its empty-prompt embedding, computed once with the pipeline's CLIP text encoder, "
            f"which needs transformers. Fix: {SD_EXTRA_HINT}; or give the embedding as a tensor file "
            f"(recipe key prompt_embedding: PATH, a [1, 77, D] .safetensors or .pt)."
        ) from e
    if local is not None and not ((local / "text_encoder").is_dir() and (local / "tokenizer").is_dir()):
        raise FileNotFoundError(
            f"teacher directory '{local}' has no text_encoder/ and tokenizer/ to compute the empty-prompt embedding, "
            f"and no cached {EMBEDDING_FILENAME}. Fix: copy the pipeline's text_encoder/ and tokenizer/ folders there, "
            f"or give the embedding as a tensor file (recipe key prompt_embedding: PATH)."
        )
    tokenizer = AutoTokenizer.from_pretrained(src, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder").eval()
    tokens = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    mask = tokens.attention_mask if getattr(encoder.config, "use_attention_mask", False) else None
    with torch.no_grad():
        return encoder(tokens.input_ids, attention_mask=mask)[0].float()  # last_hidden_state [1, 77, D]


def empty_prompt_embedding(source: str, src: Optional[str] = None, local: Optional[Path] = None) -> torch.Tensor:
    """The empty-prompt text embedding ``[1, 77, D]`` of a Stable Diffusion pipeline, computed once and cached.

    Read from the first of :func:`embedding_cache_files` that exists (a cache whose recorded text-encoder config
    no longer matches the directory's is recomputed); otherwise computed with the pipeline's tokenizer and CLIP
    text encoder (``transformers``, the ``sd`` extra) and written to the first writable location.

    Args:
        source: the teacher as the user named it (for messages). src: what ``from_pretrained`` gets (directory or
            hub id; default ``source``). local: the local pipeline directory, ``None`` for a hub id.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = src or source
    fingerprint = _sha256_file(local / "text_encoder" / "config.json") if local is not None else None
    files = embedding_cache_files(source, local)
    for f in files:
        if f.is_file():
            with safe_open(str(f), "pt") as fh:
                meta = fh.metadata() or {}
                emb = fh.get_tensor("prompt_embedding")
            if fingerprint is None or meta.get("text_encoder_config_sha256") in (None, fingerprint):
                _logger.info("empty-prompt embedding of %s read from %s", source, f)
                return emb.float()
            _logger.warning("cached embedding %s was made with another text encoder: recomputing", f)
    emb = _encode_empty_prompt(src, source, local)
    meta = {"prompt": "", "teacher": str(source)}
    if fingerprint:
        meta["text_encoder_config_sha256"] = fingerprint
    for f in files:
        tmp = f.with_name(f"{f.name}.tmp-{os.getpid()}")
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            save_file({"prompt_embedding": emb.contiguous()}, str(tmp), metadata=meta)
            os.replace(tmp, f)
            _logger.info("empty-prompt embedding of %s cached in %s", source, f)
            break
        except OSError as e:  # read-only teacher directory: try the next location
            _logger.info("cannot write %s (%s)", f, e)
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
    else:
        _logger.warning("could not cache the empty-prompt embedding of %s in %s", source, " or ".join(map(str, files)))
    return emb



def _resolve_source(source: str) -> str:
    if source in packaged_teachers():
        return str(PACKAGED_TEACHERS_DIR / source)
    return source


def load_unet(source: Union[str, Mapping[str, Any], nn.Module], torch_dtype: Optional[torch.dtype] = None):
    """Load a diffusers ``UNet2DModel`` and its scheduler.

    ``source`` is a packaged teacher name (see :func:`packaged_teachers`), a local directory (a pipeline with
    ``unet/`` and ``scheduler/`` or a bare model directory), a hub id such as ``google/ddpm-cifar10-32``, a
    config dict (random weights, for tests) or a module (used as is).
    """
    from diffusers import DDPMScheduler, UNet2DModel

    if isinstance(source, nn.Module):
        return source, DDPMScheduler(num_train_timesteps=1000)
    if isinstance(source, Mapping):
        cfg = dict(source)
        cfg.pop("_class_name", None)
        T = int(cfg.pop("num_train_timesteps", 1000))
        return UNet2DModel(**cfg), DDPMScheduler(num_train_timesteps=T)
    path = _resolve_source(str(source))
    local = Path(path).expanduser()
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"teacher {source!r} is a file; give a diffusers directory (config.json + weights).")
        sub = "unet" if (local / "unet" / "config.json").is_file() else None
        if sub is None and not (local / "config.json").is_file():
            raise FileNotFoundError(
                f"teacher directory '{local}' has neither unet/config.json nor config.json; save the model with "
                f"diffusers' save_pretrained (or DDPMPipeline.save_pretrained)."
            )
        unet = UNet2DModel.from_pretrained(str(local), subfolder=sub, **kwargs)
        sched_dir = local / "scheduler" if (local / "scheduler").is_dir() else local
        scheduler = (DDPMScheduler.from_pretrained(str(sched_dir))
                     if (sched_dir / "scheduler_config.json").is_file() else DDPMScheduler(num_train_timesteps=1000))
        return unet, scheduler
    if str(source).count("/") != 1:
        raise ValueError(
            f"teacher {source!r} is neither a packaged teacher ({', '.join(packaged_teachers()) or 'none'}), an "
            f"existing directory, nor a hub id of the form 'owner/name'."
        )
    try:  # hub id: pipeline repos keep the model in unet/, model repos at the root
        unet = UNet2DModel.from_pretrained(path, **kwargs)
        sub = None
    except (OSError, EnvironmentError):
        unet = UNet2DModel.from_pretrained(path, subfolder="unet", **kwargs)
        sub = "scheduler"
    try:
        scheduler = DDPMScheduler.from_pretrained(path, subfolder=sub)
    except (OSError, EnvironmentError):
        scheduler = DDPMScheduler(num_train_timesteps=1000)
    return unet, scheduler


LATENT_UNET_CLASSES = ("UNet2DConditionModel",)
DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")  # the hub's DiT configs say Transformer2DModel


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _hub_json(repo: str, filename: str) -> Optional[dict]:
    """A JSON file of a hub repo (through the local hub cache): ``{}`` when the repo has no such file, ``None``
    when the hub cannot be asked (offline, no such repo): the caller then falls back to the UNet2DModel loader."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        return _read_json(Path(hf_hub_download(repo, filename)))
    except LocalEntryNotFoundError:  # offline and not in the hub cache (a subclass of EntryNotFoundError)
        return None
    except EntryNotFoundError:
        return {}
    except Exception:  # noqa: BLE001 - offline, no such repo, bad token: one try only (the hub client retries)
        return None


def _class_of(cfg: Mapping[str, Any]) -> Optional[str]:
    name = cfg.get("_class_name")
    if name == "Transformer2DModel" and cfg.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        return f"Transformer2DModel(norm_type={cfg.get('norm_type')})"  # PixArt & co: not a DiT
    return name


def inspect_teacher(source: Union[str, Mapping[str, Any], nn.Module]) -> dict:
    """What kind of teacher ``source`` is, from its config alone (nothing is loaded).

    Returns ``{'kind': 'pixel' | 'latent-unet' | 'dit', 'class': model class name, 'subfolder': folder of the model
    in a pipeline (``'unet'``, ``'transformer'``) or None, 'components': pipeline folders present, 'local': Path or
    None}``. A packaged name, a DDPM pipeline and anything unrecognised is ``'pixel'`` (the ``UNet2DModel`` loader,
    which gives its own errors).
    """
    info: dict = {"kind": "pixel", "class": None, "subfolder": None, "components": set(), "local": None}

    def classify(name: Optional[str]) -> str:
        if name in LATENT_UNET_CLASSES:
            return "latent-unet"
        if name in DIT_CLASSES:
            return "dit"
        if name in (None, "UNet2DModel"):
            return "pixel"
        raise ValueError(
            f"teacher {source if isinstance(source, str) else name!r} is a {name}; supported: UNet2DModel (pixel "
            f"DDPM), UNet2DConditionModel (Stable Diffusion 1.x/2.x) and DiTTransformer2DModel (DiT)."
        )

    if isinstance(source, nn.Module):
        info["class"] = type(source).__name__
        info["kind"] = classify(info["class"]) if info["class"] in LATENT_UNET_CLASSES + DIT_CLASSES else "pixel"
        return info
    if isinstance(source, Mapping):
        info["class"] = _class_of(source)
        info["kind"] = classify(info["class"])
        info["components"] = {"vae"} if "vae" in source else set()
        return info
    path = _resolve_source(str(source))
    local = Path(path).expanduser()
    if local.is_dir():
        info["local"] = local
        info["components"] = {p.name for p in local.iterdir() if (p / "config.json").is_file()
                              or (p / "scheduler_config.json").is_file() or p.name == "tokenizer"}
        for sub in ("unet", "transformer"):
            if (local / sub / "config.json").is_file():
                info.update(subfolder=sub, **{"class": _class_of(_read_json(local / sub / "config.json"))})
                break
        else:
            info["class"] = _class_of(_read_json(local / "config.json"))
        info["kind"] = classify(info["class"])
        return info
    if local.exists() or str(source).count("/") != 1:
        return info  # a file or a malformed name: load_unet says what is wrong
    index = _hub_json(path, "model_index.json")  # hub id: the pipeline's index names its components
    if index:
        info["components"] = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]}
        for sub in ("unet", "transformer"):
            if sub in info["components"]:
                info["subfolder"] = sub
                info["class"] = _class_of(_hub_json(path, f"{sub}/config.json") or {}) or index[sub][1]
                break
    elif index is not None:  # a model repo (no pipeline index): its own config.json
        info["class"] = _class_of(_hub_json(path, "config.json") or {})
    info["kind"] = classify(info["class"])  # hub unreachable: class None, the UNet2DModel loader reports it
    return info


def load_latent_model(source: Union[str, Mapping[str, Any], nn.Module], info: Mapping[str, Any],
                      torch_dtype: Optional[torch.dtype] = None, vae_dtype: Union[str, torch.dtype] = "float32"):
    """Load the model (``UNet2DConditionModel`` or ``DiTTransformer2DModel``), its ``AutoencoderKL`` (or None) and a
    ``DDPMScheduler`` built from the pipeline's scheduler config (SD ships PNDM/DDIM configs: same betas, and
    ``add_noise`` is the DDPM one), as :func:`inspect_teacher` described ``source``.

    Config dicts (random weights, for tests): the model's config with ``_class_name``, plus optionally
    ``vae`` (an ``AutoencoderKL`` config dict) and ``num_train_timesteps``.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, UNet2DConditionModel

    cls = UNet2DConditionModel if info["kind"] == "latent-unet" else DiTTransformer2DModel
    vae_dt = resolve_vae_dtype(vae_dtype)
    if isinstance(source, nn.Module):
        return source, None, DDPMScheduler(num_train_timesteps=1000)
    if isinstance(source, Mapping):
        cfg = {k: v for k, v in source.items() if k != "_class_name"}
        vae_cfg = cfg.pop("vae", None)
        T = int(cfg.pop("num_train_timesteps", 1000))
        vae = AutoencoderKL(**vae_cfg) if vae_cfg is not None else None
        return cls(**cfg), vae, DDPMScheduler(num_train_timesteps=T)
    src = str(info["local"]) if info["local"] is not None else _resolve_source(str(source))
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    sub = info["subfolder"]
    model = cls.from_pretrained(src, subfolder=sub, **kwargs)
    vae = None
    if sub is not None and "vae" in info["components"]:
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=vae_dt)
    elif sub is not None:
        _logger.warning("teacher %s has no vae/: it takes latents, not images", source)
    if sub is not None and "scheduler" in info["components"]:
        scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler")
    else:
        scheduler = DDPMScheduler(num_train_timesteps=1000)
    return model, vae, scheduler


def load_teacher(
    source: Union[str, Mapping[str, Any], nn.Module],
    blocks: Sequence[str],
    timesteps: Sequence[int] = (11,),
    torch_dtype: Optional[torch.dtype] = None,
    vae_dtype: Union[str, torch.dtype] = "float32",
    prompt_embedding: Union[None, str, Path, torch.Tensor] = None,
    resolution: Optional[int] = None,
    **kwargs,
) -> DiffusionTeacher:
    """Load a teacher and wrap it in the class its config calls for (see :func:`inspect_teacher`).

    - ``UNet2DModel`` (packaged name, DDPM pipeline or model directory, hub id such as ``google/ddpm-cifar10-32``,
      config dict without ``_class_name``): :class:`DiffusionTeacher` on pixels (see :func:`load_unet`).
    - ``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x pipeline directory with ``unet/ vae/ scheduler/
      text_encoder/ tokenizer/``, or hub id such as ``runwayml/stable-diffusion-v1-5``):
      :class:`LatentDiffusionTeacher` conditioned on the empty-prompt embedding (:func:`empty_prompt_embedding`).
    - ``DiTTransformer2DModel`` (DiT pipeline with ``transformer/ vae/ scheduler/``, e.g. ``facebook/DiT-XL-2-256``):
      :class:`DiTTeacher` with the null class.

    Args:
        torch_dtype: dtype of the UNet/DiT (``from_pretrained(torch_dtype=...)``).
        vae_dtype: ``'float32'`` or ``'bfloat16'`` (float16 is refused: the VAE overflows).
        prompt_embedding: SD only: the text embedding ``[1, L, D]`` (tensor or .safetensors/.pt file) instead of
            the empty-prompt one; required for a config dict or module (no text encoder).
        resolution: pixel size the teacher sees; default the model's ``sample_size`` (x the VAE factor).
        kwargs: passed to the teacher class (e.g. ``in_channels``, ``forward_kwargs`` for a pixel module).
    """
    vae_dt = resolve_vae_dtype(vae_dtype)  # checked for every teacher: a wrong recipe value fails early
    info = inspect_teacher(source)
    name = source if isinstance(source, str) else (info["class"] or type(source).__name__)
    if info["kind"] != "latent-unet" and prompt_embedding is not None:
        raise ValueError(
            f"prompt_embedding is set but teacher {name!r} is a {info['class'] or 'UNet2DModel'}, which takes no text; "
            f"remove prompt_embedding (it is for Stable Diffusion UNet2DConditionModel teachers)."
        )
    if info["kind"] == "pixel":
        model, scheduler = load_unet(source, torch_dtype)
        if resolution is not None:
            kwargs.setdefault("sample_size", resolution)
        return DiffusionTeacher(model, blocks, timesteps, scheduler=scheduler, name=name, **kwargs)
    model, vae, scheduler = load_latent_model(source, info, torch_dtype, vae_dt)
    if info["kind"] == "dit":
        return DiTTeacher(model, blocks, timesteps, scheduler=scheduler, vae=vae, vae_dtype=vae_dt,
                          sample_size=resolution, name=name, **kwargs)
    cross_dim = model.config.cross_attention_dim
    if prompt_embedding is not None:
        emb = load_prompt_embedding(prompt_embedding, cross_dim)
    elif info["local"] is None and not isinstance(source, str):
        raise ValueError(
            f"teacher {name!r} (a UNet2DConditionModel {'config' if isinstance(source, Mapping) else 'module'}) has "
            f"no text encoder: give prompt_embedding= (a [1, 77, {cross_dim}] tensor or .safetensors/.pt file, e.g. "
            f"the empty-prompt embedding of its pipeline), or load the teacher from a pipeline directory."
        )
    else:
        src = str(info["local"]) if info["local"] is not None else _resolve_source(str(source))
        emb = load_prompt_embedding(empty_prompt_embedding(str(source), src, info["local"]), cross_dim)
    return LatentDiffusionTeacher(model, blocks, timesteps, scheduler=scheduler, vae=vae, vae_dtype=vae_dt,
                                  conditioning={"encoder_hidden_states": emb}, sample_size=resolution, name=name,
                                  **kwargs)
