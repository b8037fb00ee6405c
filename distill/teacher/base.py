"""The pixel-space diffusion teacher: features of named blocks at chosen timesteps, and the feature keys.

The wrapper noises a clean batch with the model's scheduler (``add_noise`` in fp32, fresh noise per call,
seedable), runs one forward with all requested timesteps batched together, collects block outputs with
forward hooks and stops the forward right after the deepest requested block (early exit). Like timm's
``feature_info``, it reports the channels and stride of every (block, timestep) feature, found by a dry run.

It wraps a diffusers ``UNet2DModel`` or any module whose forward takes ``(noisy_image, timestep)``; the latent
teachers (`distill.teacher.latent`) subclass it. A teacher is never given to ``accelerator.prepare``: move it
with ``.to()``. `feature_key` / `parse_feature_key` are the one place feature keys are built and read.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn


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
        """The feature's key in the teacher's output dict, ``'<block>@t<t>'`` (`feature_key`)."""
        return feature_key(self.block, self.timestep)


def feature_key(block: str, timestep: Optional[int]) -> str:
    """Key of a teacher feature in the dict returned by `DiffusionTeacher`: ``'up_blocks.1@t11'``, or
    ``'up_blocks.1@t*'`` for ``timestep=None`` (each image at its own, per-image timestep). The one place keys are
    built; `parse_feature_key` is its inverse."""
    return f"{block}@t{'*' if timestep is None else int(timestep)}"


def parse_feature_key(key: str) -> tuple[str, Optional[int]]:
    """Inverse of `feature_key`: ``'up_blocks.1@t11'`` -> ``('up_blocks.1', 11)``, ``'mid_block@t*'`` ->
    ``('mid_block', None)``.

    Raises:
        ValueError: ``key`` is not of the form ``'<block>@t<int>'`` or ``'<block>@t*'``.
    """
    block, sep, t = key.rpartition("@t")
    if not sep or not block or not (t == "*" or t.isdigit()):
        raise ValueError(f"feature key {key!r} is not of the form '<block>@t<timestep>' (e.g. 'mid_block@t11') or "
                         f"'<block>@t*'.")
    return block, None if t == "*" else int(t)


def _config_get(model: nn.Module, key: str) -> Any:
    """``model.config[key]`` for a diffusers config (object or mapping); None without a config or such a key."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def input_multiple(model: nn.Module) -> tuple[int, str]:
    """The multiple the side of the model's input must be, read from its config, and why (``(1, '')`` when any size
    works or the config does not tell).

    - a patch transformer (DiT, ``patch_size`` in its config): its patch size (a smaller remainder is cut off);
    - a ``UNet2DModel`` (``down_block_types``): every down block but the last halves the size and the up path
      concatenates the skips, so ``2 ** (len(down_block_types) - 1)``;
    - a UNet that forwards upsample sizes (diffusers' ``UNet2DConditionModel``, which has ``num_upsamplers``): any
      size.
    """
    patch = _config_get(model, "patch_size")
    if patch:
        return int(patch), f"the patch size {int(patch)}"
    downs = _config_get(model, "down_block_types")
    if downs and not hasattr(model, "num_upsamplers"):
        factor = 2 ** (len(downs) - 1)
        return factor, f"the UNet's downsampling {factor} ({len(downs)} down blocks)"
    return 1, ""


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
        in_channels, sample_size: the model's input; read from ``model.config`` when it has one. A given
            ``sample_size`` (the recipe's ``teacher_resolution``) must be a multiple of `input_multiple`.
        forward_kwargs: extra keyword arguments for every forward (e.g. ``encoder_hidden_states``).

    Raises:
        ValueError: unknown or duplicate blocks, timesteps outside ``[0, T)``, an input size the model cannot take
            (naming ``teacher_resolution``, the valid multiple and the fix), or a model without a config and without
            ``in_channels``/``sample_size``.
    """

    #: pixels per model-input pixel (a latent teacher's VAE downsampling factor); 1 for a pixel-space model.
    latent_scale: int = 1
    #: what `load_teacher` built (kind, class, factory, weights and their sha256)
    source_info: Optional[dict] = None

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

    def _init_teacher(self, model, blocks, timesteps, scheduler, in_channels, resolution, forward_kwargs, name):
        """Everything but ``nn.Module.__init__``: subclasses register their own modules (and ``latent_scale``) first,
        then call this. ``resolution``: the image size in pixels, or None for the model's ``sample_size``."""
        if scheduler is None:
            from diffusers import DDPMScheduler

            scheduler = DDPMScheduler(num_train_timesteps=1000)
        # The model's own input (latents for a latent teacher) ...
        self.model_in_channels = int(in_channels or _config_get(model, "in_channels") or 0)
        size = _config_get(model, "sample_size")
        default = int(size[0] if isinstance(size, (tuple, list)) else size) if size else 0
        self.model_sample_size = self._check_resolution(model, resolution, default) if resolution else default
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
        try:
            self.feature_info = self._dry_run()
        except (RuntimeError, TypeError) as e:  # the user's network refused the dry-run input
            raise ValueError(
                f"teacher {name!r} failed on a dry-run input of shape [1, {self.model_in_channels}, "
                f"{self.model_sample_size}, {self.model_sample_size}] called as model(x_t, t) ({str(e)[:300]}). Fix: "
                f"set teacher_in_channels and teacher_resolution to the input the network takes, and check that its "
                f"forward takes (noisy_image, timestep) and that the blocks run in it."
            ) from e

    def _check_resolution(self, model: nn.Module, resolution: int, default: int) -> int:
        """The model-space size of images of ``resolution`` px; raises ValueError unless ``resolution`` is a
        multiple of ``latent_scale`` x `input_multiple` (``default``: the model's own size, for the fix)."""
        multiple, why = input_multiple(model)
        step = self.latent_scale * multiple
        if resolution >= step and resolution % step == 0:
            return resolution // self.latent_scale
        parts = ([f"the VAE factor {self.latent_scale}"] if self.latent_scale > 1 else []) + ([why] if why else [])
        valid = parts[0] if len(parts) == 1 else f"{step}" + (f" ({' x '.join(parts)})" if parts else "")
        below = resolution // step * step
        examples = [below, below + step] if below >= step else [step, 2 * step]
        nearest = min(examples, key=lambda v: abs(v - resolution))
        own = f", or null for its own {default * self.latent_scale} px" if default else ""
        raise ValueError(
            f"teacher_resolution {resolution} px does not fit this teacher: the size must be a multiple of {valid}, "
            f"e.g. {examples[0]} or {examples[1]}. Fix: set teacher_resolution: {nearest}{own}."
        )

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
        """Ignore ``mode``: the teacher stays in eval mode (frozen). Returns ``self``."""
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

    def check_timestep_tensor(self, timesteps: torch.Tensor) -> None:
        """Validate per-image timesteps (a tensor ``[B]``) against ``[0, T)`` without reading them on the host: a
        policy samples them on the device every micro-batch, and ``tolist()`` there would wait for the device each
        time. The dtype is checked at once; the range with ``torch._assert_async``, which raises here for a CPU
        tensor and, on CUDA, fails the run at its next synchronisation (a device-side assert); other devices'
        values are not checked (the policy's candidates were, when it was built).

        Raises:
            ValueError: the tensor is not of an integer dtype, or (CPU) holds a value outside ``[0, T)``.
        """
        if timesteps.dtype.is_floating_point or timesteps.dtype.is_complex or timesteps.dtype == torch.bool:
            raise ValueError(f"per-image timesteps must be an integer tensor, got dtype {timesteps.dtype}; give "
                             f"integers in [0, {self.num_train_timesteps}) (e.g. torch.full((B,), 11)).")
        if timesteps.device.type not in ("cpu", "cuda"):
            return
        inside = ((timesteps >= 0) & (timesteps < self.num_train_timesteps)).all()
        try:
            torch._assert_async(inside)
        except RuntimeError:  # CPU: the check ran now; an error path, so reading the values costs nothing
            self.check_timesteps(timesteps.tolist())
            raise

    def set_timesteps(self, timesteps: Sequence[int]) -> "DiffusionTeacher":
        """Change the default timesteps (validated) and recompute ``feature_info``; returns ``self``."""
        self.timesteps = self.check_timesteps(timesteps)
        self.feature_info = self._dry_run()
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the wrapped model's weights (``teacher_dtype``)."""
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """The device of the wrapped model's weights."""
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
        return self.features(self.encode(x0), timesteps, generator)  # encoded once per image, not per timestep

    @torch.no_grad()
    def features(
        self,
        x0: torch.Tensor,
        timesteps: Union[None, Sequence[int], torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> dict[str, torch.Tensor]:
        """Features of the model's clean input ``x0`` ``[B, C_model, S_model, S_model]`` (what `encode` gives:
        the images themselves for a pixel teacher, the scaled VAE latents for a latent one), noised here with fresh
        noise; arguments and return value as `forward`. A latent cache (`distill.latent_cache`) calls
        this with latents it read, so the VAE never runs while training.

        Raises:
            ValueError: ``x0`` is not ``[B, model_in_channels, model_sample_size, model_sample_size]``.
        """
        if x0.ndim != 4 or x0.shape[1] != self.model_in_channels or x0.shape[-1] != self.model_sample_size:
            raise ValueError(f"model input has shape {tuple(x0.shape)}; this teacher's model takes [B, "
                             f"{self.model_in_channels}, {self.model_sample_size}, {self.model_sample_size}].")
        B = x0.shape[0]
        x0 = x0.float()
        if isinstance(timesteps, torch.Tensor):
            if timesteps.shape != (B,):
                raise ValueError(f"per-image timesteps must have shape ({B},), got {tuple(timesteps.shape)}.")
            self.check_timestep_tensor(timesteps)
            keys_t: list[Optional[int]] = [None]  # one per-image timestep each: key '<block>@t*'
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
                out[feature_key(b, t_)] = feats[b][k * B:(k + 1) * B]  # (B, C_b, H_b, W_b)
        return out

