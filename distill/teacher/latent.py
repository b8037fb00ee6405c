"""Latent teachers: a diffusion model fed with images through a VAE (Stable Diffusion's ``UNet2DConditionModel``)
and a class-conditional DiT used with its null class, whose tokens are returned as maps.

Both run exactly as `DiffusionTeacher` does on pixels (batched timesteps, hooks, early
exit); sizes and feature strides are given in pixels.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..vocab import TEACHER_DTYPES, VAE_DTYPES
from .base import DiffusionTeacher


def resolve_vae_dtype(value: Union[str, torch.dtype]) -> torch.dtype:
    """``'float32'`` or ``'bfloat16'`` (or the torch dtype) -> the VAE's dtype. float16 is refused: SD-style VAEs
    overflow to NaN/Inf in fp16 (diffusers' own pipelines upcast them)."""
    names = {getattr(torch, name): name for name in TEACHER_DTYPES}
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
    return getattr(torch, key)


def vae_scale_factor(vae: nn.Module) -> int:
    """Pixels per latent pixel of an ``AutoencoderKL``: ``2 ** (len(block_out_channels) - 1)`` (8 for SD)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def normalize_latents(z: torch.Tensor, config: Any) -> torch.Tensor:
    """Raw VAE latents ``[B, C, h, w]`` -> the diffusion model's input, as diffusers' pipelines scale them.

    - ``latents_mean`` and ``latents_std`` in the VAE config (per-channel lists, SDXL-style VAEs):
      ``(z - latents_mean) * scaling_factor / latents_std`` (diffusers ``StableDiffusionXLImg2ImgPipeline``);
    - else ``shift_factor`` (SD3 / Flux VAEs): ``(z - shift_factor) * scaling_factor``
      (``StableDiffusion3Img2ImgPipeline``);
    - else ``z * scaling_factor`` (SD 1.x / 2.x: 0.18215; ``AutoencoderKL`` docstring, LDM paper sec. 4.3.2).

    ``config``: the VAE's config (``vae.config``: attributes or a mapping). Computed in fp32; returns fp32.

    Raises:
        ValueError: only one of ``latents_mean`` / ``latents_std``, or either of them with a ``shift_factor``
            (no diffusers pipeline uses both conventions at once), or a per-channel list whose length is not ``C``.
    """
    get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
    mean, std, shift = get("latents_mean", None), get("latents_std", None), get("shift_factor", None)
    scale = float(get("scaling_factor", 1.0))
    z = z.float()
    if (mean is None) != (std is None) or (mean is not None and shift is not None):
        raise ValueError(f"VAE config has latents_mean={mean!r}, latents_std={std!r}, shift_factor={shift!r}; valid: "
                         f"latents_mean and latents_std together (SDXL-style), or shift_factor (SD3-style), or none. "
                         f"Fix the VAE's config.json.")
    if mean is not None:
        m, s = (torch.as_tensor(v, dtype=torch.float32, device=z.device).reshape(1, -1, 1, 1) for v in (mean, std))
        if m.shape[1] != z.shape[1] or s.shape[1] != z.shape[1]:
            raise ValueError(f"VAE config latents_mean / latents_std have {m.shape[1]} / {s.shape[1]} values for "
                             f"{z.shape[1]} latent channels; fix the VAE's config.json.")
        return (z - m) * scale / s
    if shift is not None:
        z = z - float(shift)
    return z * scale


class LatentDiffusionTeacher(DiffusionTeacher):
    """A latent diffusion model (Stable Diffusion's ``UNet2DConditionModel``, a DiT, ...) fed with images.

    Each call encodes the images ``[B, 3, S, S]`` (in [-1, 1]) once with the VAE,
    ``z0 = vae.encode(x).latent_dist.mean * scaling_factor`` (the posterior mean: deterministic; normalised as
    diffusers' pipelines do, with ``shift_factor`` or ``latents_mean`` / ``latents_std`` where the VAE config has
    them: `normalize_latents`), then noises ``z0`` in latent space and runs the model exactly
    as `DiffusionTeacher` does on pixels (batched timesteps, hooks, early exit). ``conditioning`` tensors
    (``[1, ...]``, e.g. ``encoder_hidden_states``: the empty-prompt embedding ``[1, 77, D]``) are expanded to the
    batch of every forward (``B*K`` when K timesteps are batched).

    ``in_channels`` / ``sample_size`` are the pixel ones (3, ``latent size x VAE factor``); ``feature_info`` strides
    are relative to pixels. Without a VAE the caller gives latents and the sizes are the model's.

    Args:
        model: the latent model, called as ``model(z_t, t, **conditioning)``.
        blocks, timesteps, scheduler, forward_kwargs, name: as `DiffusionTeacher`.
        vae: an ``AutoencoderKL`` (frozen here), or ``None``.
        vae_dtype: ``'float32'`` or ``'bfloat16'``; float16 is refused (the VAE overflows).
        conditioning: ``{keyword: tensor [1, ...]}`` passed to every forward, expanded to its batch.
        sample_size: image resolution in pixels (default: the model's ``sample_size`` x the VAE factor); a multiple
            of the VAE factor x `input_multiple` (the DiT's patch size), else ValueError.
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
        #: the VAE's config (scaling_factor, shift_factor, latents_mean/std), kept when the VAE itself is dropped
        self.vae_config = None if vae is None else dict(vae.config)
        self.latent_scale = 1 if vae is None else vae_scale_factor(vae)
        self._conditioning: list[str] = []
        for key, value in (conditioning or {}).items():
            value = torch.as_tensor(value)
            if value.ndim == 0 or value.shape[0] != 1:
                raise ValueError(f"conditioning {key!r} must have batch size 1 ([1, ...]), got {tuple(value.shape)}.")
            self.register_buffer(f"cond_{key}", value)  # in state_dict(): what a feature cache keys on
            self._conditioning.append(key)
        self._init_teacher(model, blocks, timesteps, scheduler, None, sample_size, forward_kwargs, name)

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
        return self.normalize_latents(self.latent_distribution(x0)[0])

    @torch.no_grad()
    def latent_distribution(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``[B, 3, S, S]`` in [-1, 1] -> the VAE posterior's ``(mean, std)``, each ``[B, C_lat, S/f, S/f]``
        fp32, unscaled (the diagonal Gaussian ``vae.encode(x).latent_dist``); needs a VAE."""
        if self.vae is None:
            raise ValueError("this latent teacher has no VAE (its pipeline has no vae/): it takes latents, not images.")
        dist = self.vae.encode(x0.to(self.vae_dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> model input with this teacher's VAE config (`normalize_latents`)."""
        return z.float() if self.vae_config is None else normalize_latents(z, self.vae_config)

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
    `LatentDiffusionTeacher` (a real DiT pipeline has a VAE: ``facebook/DiT-XL-2-256``).
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
