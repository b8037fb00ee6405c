"""A teacher built by the user's own Python code: ``teacher: python:package.module:factory`` in a recipe.

The factory is any callable that returns an ``nn.Module`` called as ``model(noisy_image, timestep)`` (an ADM /
guided-diffusion UNet, an EDM network behind a small wrapper, a home-made DDPM), called with the recipe's
``teacher_kwargs``. Its weights come from ``teacher_weights``: a ``.safetensors`` file, or a ``.pt``/``.pth``/
``.bin``/``.ckpt`` file read with ``torch.load(weights_only=True)`` (tensors only: a pickle that would import or run
code is refused), with an optional key prefix to strip (``module.``, ``ema_model.``). distill bundles none of the
users' code: the package must be importable (installed, or its folder on ``PYTHONPATH``), or the module part may be
the path of a ``.py`` file.

Blocks are named by ``model.named_modules()`` and read with forward hooks, as for diffusers teachers. See
``docs/teachers.md`` for ADM and EDM.

Trust: a recipe with a ``python:`` teacher runs that code, as a Hydra ``_target_`` does: importing the module runs
its top-level code, then the factory is called. Only a class (an ``nn.Module`` subclass) or a function *defined in*
the named module or file is accepted, checked before anything is called: ``python:os:system``, a builtin, a name
the module imported from elsewhere (``from subprocess import run``) and any standard-library module are refused, so
a recipe cannot reach a shell through a callable that happens to exist. The code is part of the teacher: its sha256
(`code_record`: the module file, or every ``.py`` file of its top-level package) is in the run's
``config.yaml`` and the feature cache's key, so an edited teacher is never mistaken for the old one.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import pickle
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn as nn

from ..integrity import error_text
from ..vocab import TORCH_WEIGHT_SUFFIXES

#: the recipe form of a Python teacher: ``python:<module or file.py>:<factory>``
PYTHON_PREFIX = "python:"


def is_python_source(source: Any) -> bool:
    """Whether ``source`` is a ``python:module:factory`` teacher name."""
    return isinstance(source, str) and source.startswith(PYTHON_PREFIX)


def parse_python_source(source: str) -> tuple[str, str]:
    """``'python:pkg.mod:make_unet'`` -> ``('pkg.mod', 'make_unet')``; the module part may be a ``.py`` path and the
    factory a dotted attribute (``Class.from_config``).

    Raises:
        ValueError: not of the form ``python:<module>:<factory>``, with an example.
    """
    body = source[len(PYTHON_PREFIX):] if source.startswith(PYTHON_PREFIX) else source
    module, sep, factory = body.rpartition(":")
    if not sep or not module or not factory or not all(p.isidentifier() for p in factory.split(".")):
        raise ValueError(f"teacher {source!r} is not of the form python:<module>:<factory> (e.g. "
                         f"python:my_models.unet:make_unet or python:/path/to/unet.py:make_unet); the factory is a "
                         f"callable returning an nn.Module called as model(noisy_image, timestep).")
    return module, factory


def _is_stdlib(module: str) -> bool:
    """Whether ``module`` (a dotted name) belongs to Python's standard library or its builtins."""
    return module.split(".")[0] in sys.stdlib_module_names or module.split(".")[0] in sys.builtin_module_names


def _import(module: str, source: str):
    if not module.endswith(".py") and _is_stdlib(module):  # refused before the import: nothing of it runs
        raise ValueError(f"teacher {source!r}: {module!r} is Python's standard library, not a teacher network's "
                         f"code; a python: teacher names a class or function defined in your own module or .py file "
                         f"(a recipe's python: teacher runs that code). Fix: teacher: python:my_models.unet:make_unet "
                         f"or python:/path/to/unet.py:make_unet.")
    if module.endswith(".py"):
        path = Path(module).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"teacher {source!r}: no such file '{path}'. Fix: give the path of the .py file "
                                    f"that defines the factory, or an importable module name.")
        name = "distill_teacher_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.split(".")[0] != e.name.split(".")[0]:  # the module imports a package that is missing
            raise ValueError(f"teacher {source!r}: module {module!r} imports {e.name!r}, which is not installed. Fix: "
                             f"install it (e.g. pip install -e the repository that provides {e.name!r}) or put its "
                             f"folder on PYTHONPATH.") from None
        raise ValueError(f"teacher {source!r}: module {module!r} cannot be imported ({e}). Fix: install the package "
                         f"that defines it (pip install -e PATH), add its folder to PYTHONPATH, or give the path of "
                         f"the .py file: python:/path/to/{module.split('.')[-1]}.py:<factory>.") from None


def _own_factories(mod) -> list[str]:
    """The public classes and functions defined in ``mod`` itself (what a ``python:`` teacher may name)."""
    return sorted(n for n, v in vars(mod).items() if not n.startswith("_") and (inspect.isclass(v) or
                  inspect.isfunction(v)) and getattr(v, "__module__", None) == mod.__name__)


def _is_factory(obj) -> bool:
    """A Python function (or a method of a class: ``Class.from_config``) or an ``nn.Module`` subclass."""
    if inspect.isclass(obj):
        return issubclass(obj, nn.Module)
    return inspect.isfunction(obj) or (inspect.ismethod(obj) and inspect.isfunction(obj.__func__))


def import_factory(source: str) -> Callable[..., nn.Module]:
    """The factory named by ``python:module:factory``: a function or an ``nn.Module`` subclass defined in that
    module or file (for ``Class.method``, the class is defined there), checked before anything is called. Importing
    the module runs its top-level code (see the module docstring: a recipe's ``python:`` teacher is code).

    Raises:
        ValueError / FileNotFoundError: a standard-library module (refused before it is imported), a module that
            cannot be imported, no such attribute, or a name that is not a class or function defined in the module
            (``os.system``, a builtin, a name imported from elsewhere); the message lists the module's own classes
            and functions.
    """
    module, factory = parse_python_source(source)
    obj = mod = _import(module, source)
    parts = factory.split(".")
    for part in parts:
        if not hasattr(obj, part):
            raise ValueError(f"teacher {source!r}: {module!r} has no attribute {factory!r}; its classes and "
                             f"functions: {', '.join(_own_factories(mod)) or 'none'}.")
        obj = getattr(obj, part)
    first = getattr(mod, parts[0])
    where = getattr(first, "__module__", None)
    if not (inspect.isclass(first) or inspect.isfunction(first)) or where != mod.__name__ or not _is_factory(obj):
        what = (f"defined in {where!r}, not in {module!r}" if where not in (None, mod.__name__) else
                f"a {type(obj).__name__}, not a function or an nn.Module class")
        raise ValueError(f"teacher {source!r}: {factory!r} is {what}; a python: teacher's factory must be a function "
                         f"or an nn.Module class defined in the named module or file, so a recipe cannot call "
                         f"whatever the module happens to import (a recipe's python: teacher runs code). Nothing was "
                         f"called. Its classes and functions: {', '.join(_own_factories(mod)) or 'none'}. Fix: name "
                         f"the module that defines the factory (python:package.module:factory).")
    return obj


def code_record(source: str) -> dict:
    """What code a ``python:`` teacher runs and its sha256: ``{'code': path, 'code_sha256': hex}``. For a ``.py``
    file, that file; for a module, its file, or every ``.py`` file (sorted by path relative to the package, each
    path and content hashed) of its top-level package when it is one, since a factory may use any module of its
    package. Call after `import_factory` (the module is then imported; it is not run again)."""
    module, _ = parse_python_source(source)
    if module.endswith(".py"):
        path = Path(module).expanduser().resolve()
        return {"code": str(path), "code_sha256": file_sha256(path)}
    top = importlib.import_module(module.split(".")[0])
    dirs = [Path(d) for d in getattr(top, "__path__", [])]
    if not dirs:  # a single-file module
        path = Path(top.__file__).resolve()
        return {"code": str(path), "code_sha256": file_sha256(path)}
    h = hashlib.sha256()
    for d in dirs:
        for f in sorted(d.rglob("*.py")):
            h.update(f.relative_to(d).as_posix().encode() + b"\0" + file_sha256(f).encode())
    return {"code": ", ".join(str(d.resolve()) for d in dirs), "code_sha256": h.hexdigest()}


def build_python_model(source: str, kwargs: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """``factory(**kwargs)`` of a ``python:module:factory`` teacher, checked to be an ``nn.Module``.

    Raises:
        ValueError: the factory does not take ``kwargs`` (naming its signature) or does not return an nn.Module.
    """
    factory = import_factory(source)
    kwargs = dict(kwargs or {})
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise ValueError(f"teacher {source!r}: teacher_kwargs {kwargs} do not fit {factory.__name__}"
                         f"{inspect.signature(factory)} ({e}). Fix: set teacher_kwargs to its arguments.") from None
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"teacher {source!r}: the factory returned a {type(model).__name__}, not an nn.Module; it "
                         f"must return the network called as model(noisy_image, timestep).")
    return model


def file_sha256(path) -> str:
    """sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: The remembered sha256 of weight files, in `distill.teacher.prompt.distill_cache_dir`.
SHA256_CACHE = "weights-sha256.json"


def cached_file_sha256(path) -> str:
    """`file_sha256` of a weight file, computed once per file: remembered in ``distill_cache_dir() /
    weights-sha256.json`` under the file's absolute path with its size and ``st_mtime_ns``, and used while both are
    unchanged (the test ``make`` and git's index make); a file rewritten or touched is hashed again. A file modified
    less than 2 s before it was hashed is not remembered (its next write may keep the same mtime: git's "racily
    clean" case). A cache that cannot be read or written is ignored: the hash is computed, nothing fails.
    Written with `distill.atomic.atomic_write_json` (never half-written); concurrent writers lose entries,
    never correctness."""
    import json
    import os
    import time

    from ..atomic import atomic_write_json
    from ..errors import WriteError
    from .prompt import distill_cache_dir

    p = Path(path).expanduser().resolve()
    st = p.stat()
    store = distill_cache_dir() / SHA256_CACHE
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    entry = known.get(str(p))
    if (isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns
            and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64):
        return entry["sha256"]
    digest = file_sha256(p)
    if time.time_ns() - st.st_mtime_ns > 2_000_000_000 and os.stat(p).st_mtime_ns == st.st_mtime_ns:
        known.pop(str(p), None)
        known[str(p)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        try:
            atomic_write_json(store, dict(list(known.items())[-1000:]))  # the newest 1,000 files
        except (OSError, WriteError):
            pass
    return digest


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """The tensors of a weight file: ``.safetensors``, or a ``.pt``/``.pth``/``.bin``/``.ckpt`` state dict read with
    ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: another suffix, a file torch/safetensors cannot read (truncated, a pickle of code objects: the
            message says to save ``model.state_dict()``), or a file holding other than a flat ``{name: tensor}``
            dict (naming its top-level keys, e.g. a training checkpoint's ``state_dict``/``ema``).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"teacher_weights '{p}' does not exist. Fix: give the path of the teacher's weight "
                                f"file (.safetensors, .pt or .pth).")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:  # noqa: BLE001 - safetensors' errors for a damaged file, named here
            raise ValueError(f"teacher_weights '{p}' is not a readable safetensors file ({e}). Fix: download or "
                             f"save it again.") from None
    if p.suffix not in TORCH_WEIGHT_SUFFIXES:
        raise ValueError(f"teacher_weights '{p}' has suffix {p.suffix!r}; valid: .safetensors or "
                         f"{', '.join(TORCH_WEIGHT_SUFFIXES)} (a state dict saved with torch.save).")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # objects beyond tensors: unpickling them would import or run code
        why = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln), error_text(e))
        raise ValueError(f"teacher_weights '{p}' holds pickled objects beyond tensors, which torch.load("
                         f"weights_only=True) refuses ({why}); distill never unpickles code. Fix: in the model's own "
                         f"environment save the weights alone: torch.save(model.state_dict(), 'weights.pt') (or "
                         f"safetensors' save_file).") from None
    except Exception as e:  # noqa: BLE001 - a truncated or damaged file
        raise ValueError(f"teacher_weights '{p}' cannot be read by torch.load ({error_text(e)}). Fix: download or "
                         f"save it again (torch.save(model.state_dict(), 'weights.pt')).") from None
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"teacher_weights '{p}' holds a {type(obj).__name__}, not a state dict of tensors. Fix: save "
                         f"model.state_dict().")
    others = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise ValueError(f"teacher_weights '{p}' is not a flat state dict: keys {others[:6]} hold "
                         f"{type(obj[others[0]]).__name__}s, not tensors (a training checkpoint?). Fix: save the "
                         f"model's part alone, e.g. torch.save(ckpt[{others[0]!r}], 'weights.pt').")
    return dict(obj)


def load_weights(model: nn.Module, path, prefix: Optional[str] = None) -> str:
    """Load a weight file into ``model`` (strict: every key and shape must match); returns the file's sha256.

    Args:
        model: the freshly built teacher network.
        path: see `read_state_dict`.
        prefix: strip this key prefix (e.g. ``'module.'`` of a DDP save, ``'ema_model.'``); keys without it are
            dropped (another network in the same file).

    Raises:
        ValueError: no key has ``prefix``, or keys or shapes do not match the model (the first few of each listed,
            with the fix).
    """
    sd = read_state_dict(path)
    if prefix:
        stripped = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not stripped:
            raise ValueError(f"teacher_weights_prefix {prefix!r} starts none of the {len(sd)} keys of '{path}' "
                             f"(e.g. {', '.join(list(sd)[:3])}). Fix: set the prefix the keys share, or null.")
        sd = stripped
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        common = _common_prefix(unexpected)
        hint = (f" The file's keys share the prefix {common!r}: set teacher_weights_prefix: {common!r}."
                if common and not prefix else "")
        raise ValueError(
            f"teacher_weights '{path}' do not fit the network built by the factory: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(shapes)} of another shape ({'; '.join(shapes[:3])}).{hint} Fix: teacher_kwargs that build the "
            f"network the weights were saved from, or teacher_weights_prefix.")
    model.load_state_dict(sd, strict=True)
    return cached_file_sha256(path)


def _common_prefix(keys: list[str]) -> str:
    """The dotted prefix (ending in '.') every key shares, or ''."""
    if not keys:
        return ""
    first = keys[0].split(".")[0] + "."
    return first if all(k.startswith(first) for k in keys) else ""


def qualified_name(model: nn.Module) -> str:
    """``'package.module.ClassName'`` of a module's class."""
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"
