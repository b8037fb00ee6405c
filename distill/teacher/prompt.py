"""The text conditioning of a Stable Diffusion teacher: a user-given prompt embedding, or the pipeline's
empty-prompt embedding, computed once with its CLIP text encoder and cached (in the teacher's directory, else in
`distill_cache_dir`).
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from ..atomic import atomic_file
from ..errors import MissingDependencyError
from ..version import install_hint

_logger = logging.getLogger(__name__)

EMBEDDING_FILENAME = "empty_prompt_embedding.safetensors"
SD_EXTRA_HINT = f'{install_hint("sd")}, or pip install "transformers>=4.40"'


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

    Read from the first of `embedding_cache_files` that exists (a cache whose recorded text-encoder config
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
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(f) as tmp:  # a failed write leaves neither f nor its temporary
                save_file({"prompt_embedding": emb.contiguous()}, str(tmp), metadata=meta)
            _logger.info("empty-prompt embedding of %s cached in %s", source, f)
            break
        except OSError as e:  # read-only teacher directory: try the next location
            _logger.info("cannot write %s (%s)", f, e)
    else:
        _logger.warning("could not cache the empty-prompt embedding of %s in %s", source, " or ".join(map(str, files)))
    return emb
