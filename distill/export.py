"""Export the distilled student in timm's own layout (``config.json`` + ``model.safetensors``) with a model card
(``README.md``), and push an export to the Hugging Face Hub.

Only the backbone is written (the live weights, or with ``ema`` the run's EMA of them); the regressor is discarded.
``pretrained_cfg`` tells the truth about training: the student's input size and mean/std, a tag, a description
naming the teacher, blocks and timesteps, and none of the provenance timm's default config of the architecture
carries (``origin_url``, ``paper_ids`` of supervised ImageNet weights: `INHERITED_PROVENANCE`). Reload with
``timm.create_model('local-dir:OUT', pretrained=True, num_classes=K)``. With ``onnx``, the same timm model as
reloaded from the export is also written as ``model.onnx`` (pooled features; `distill.deploy`) and checked
against it with onnxruntime.

An export deletes only what it can prove it wrote: an existing ``-o/--output-dir`` is replaced (``overwrite``) only when it is
an earlier export (`export_problem`), and never when it is the run directory or holds it.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional

from .atomic import atomic_dir, atomic_write_json
from .card import METHOD_PAPER, model_card, write_model_card  # noqa: F401 - the card's names, importable from here
from .errors import ExportMismatchError, HubUploadError, RunExistsError, UnreadableFileError, option
from .deploy import (ONNX_ATOL, ONNX_DATA_FILE, ONNX_FILE, ONNX_INPUT, ONNX_OPSET, ONNX_OUTPUT, export_onnx,
                     onnx_max_abs_diff, require_onnx)
from .integrity import error_text, read_json, safetensors_problem
from .logs import count
from .rundir import EMA_FILE, SUMMARY, is_run, load_trained
from .version import __version__

_logger = logging.getLogger(__name__)

#: the files ``distill export`` writes
EXPORT_FILES = ("config.json", "model.safetensors", "README.md")
#: the files ``distill export --onnx`` adds (the ``.data`` file only for a model above 2 GB)
ONNX_FILES = (ONNX_FILE, ONNX_DATA_FILE)
#: pretrained_cfg keys that describe the weights timm would download for the architecture (its supervised
#: ImageNet training), not these weights: removed from an export and replaced by distill's own
INHERITED_PROVENANCE = ("origin_url", "paper_ids", "paper_name", "license", "notes", "description", "tag",
                        "hf_hub_id", "hf_hub_filename", "url", "file", "source", "state_dict")


def _listing(path: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return ", ".join(names[:8]) + (f" ... ({len(names)} entries)" if len(names) > 8 else "")


def export_problem(path: Path) -> Optional[str]:
    """Why the existing ``path`` is not an export written by distill, or None when it is: a directory holding only
    `EXPORT_FILES`, whose ``config.json`` has the ``distill`` key."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return "it is a file, not a directory"
    foreign = sorted(p.name for p in path.iterdir() if p.name not in EXPORT_FILES + ONNX_FILES)
    if foreign:
        return f"it holds {_listing(path)}; an export holds only {' and '.join(EXPORT_FILES)}"
    try:
        cfg = read_json(path / "config.json")
    except (OSError, ValueError) as e:
        return f"its config.json cannot be read ({error_text(e)})"
    if not isinstance(cfg, dict) or "distill" not in cfg:
        return "its config.json has no 'distill' key (it was not written by distill export)"
    card = path / "README.md"
    if card.exists() and _sha256(card.read_bytes()) != cfg["distill"].get("card_sha256"):
        return "its README.md is not the model card distill wrote (edited, or added by hand)"
    return None


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def check_export_target(run_dir: str, out: str, overwrite: bool) -> None:
    """Refuse an export target that holds data the export did not write; returns when ``out`` may be written.

    Raises:
        RunExistsError: ``out`` is the run directory, a folder holding it, or a directory holding another run.
        FileExistsError: ``out`` exists (without ``overwrite``), or is not an earlier export (with it); the message
            names what is in it. Nothing is deleted.
    """
    run, target = Path(run_dir).resolve(), Path(out).resolve()
    fix = f"Fix: choose another {option('output_dir')}, e.g. {Path(run_dir) / 'student'}."
    if target == run or target in run.parents:
        where = "is the run directory" if target == run else f"holds the run directory '{run_dir}'"
        raise RunExistsError(f"export target '{out}' {where}; exporting there would replace the run (checkpoints, "
                             f"config, metrics). Nothing was written. {fix}")
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return
    if target.is_dir() and (is_run(target) or any(is_run(p) for p in target.iterdir() if p.is_dir())):
        raise RunExistsError(f"export target '{out}' holds a distill run ({_listing(target)}); an export never "
                             f"replaces a run. Nothing was deleted. {fix}")
    if not overwrite:
        what = _listing(target) if target.is_dir() else "a file"
        raise FileExistsError(f"export target '{out}' already exists ({what}); pass {option('overwrite', flag=True)} "
                              f"to replace an earlier export, or choose another {option('output_dir')}.")
    problem = export_problem(target)
    if problem:
        raise FileExistsError(f"{option('overwrite', flag=True)} refused: export target '{out}' is not an export "
                              f"written by distill: {problem}. Nothing was deleted. {fix}")


def export_student(run_dir: str, out: str, checkpoint: Optional[str] = None, overwrite: bool = False,
                   ema: bool = False, onnx: bool = False, opset: int = ONNX_OPSET) -> Path:
    """Write the student of ``run_dir`` to ``out`` in timm format, with a model card (`write_model_card`).
    The checkpoint is ``checkpoint``, or the newest one whose weights load (newer damaged ones are skipped with a
    warning); it is logged and recorded in ``config.json`` (``distill.checkpoint``). ``ema``: write the
    checkpoint's EMA of the student (recipe ``ema: true``) instead of its live weights. ``onnx``: also write
    ``model.onnx`` (opset ``opset``): the export reloaded by timm (``num_classes=0``), input ``image``
    ``[batch, 3, S, S]`` normalised with the export's mean/std, output ``output`` ``[batch, num_features]`` (pooled
    features), dynamic batch; checked with onnxruntime on 3 random images (max abs difference to the torch model
    recorded in ``config.json`` as ``distill.onnx``; above `ONNX_ATOL` it is an error).

    Raises:
        RunExistsError, FileExistsError: ``out`` may not be written (see `check_export_target`).
        FileNotFoundError: not a run directory, or no checkpoint; with ``ema``, a checkpoint without an EMA.
        UnreadableFileError: the checkpoint's weights are damaged (the message names the checkpoint and file).
        WriteError: the export could not be written (disk full, read-only, ...): what, where and the space needed.
        MissingDependencyError: ``onnx`` and the ``onnx`` extra is not installed (checked before anything is read).
        ExportMismatchError: ``onnx`` and onnxruntime's output differs from the torch model's by more than
            ``ONNX_ATOL`` (the CLI exits 3).
    """
    import timm.models

    if onnx:
        require_onnx(runtime=True)
    check_export_target(run_dir, out, overwrite)
    out_p = Path(out)
    model, recipe, resolved = load_trained(run_dir, checkpoint)
    backbone = model.student.model
    if ema:
        _load_ema(backbone, Path(resolved["checkpoint"]), recipe.ema)
    weights = "EMA of the student's weights" if ema else "student weights"
    _logger.info("exporting the %s of %s", weights, resolved["checkpoint"])
    S = recipe.student_size
    teacher = public_name(recipe.teacher) if isinstance(recipe.teacher, str) else "UNet2DModel(config dict)"
    step = Path(resolved["checkpoint"]).name.split("-")[-1]
    timesteps = resolved.get("timesteps_used", recipe.timesteps)  # what the run used (auto modes resolved)
    description = (f"{recipe.student} distilled with distill {__version__} from teacher {teacher} (blocks "
                   f"{recipe.teacher_blocks}, timesteps {timesteps}) on {recipe.dataset} for {count(int(step), 'step')} at {S}px"
                   f"{' (EMA weights, decay ' + str(recipe.ema_decay) + ')' if ema else ''}.")
    tag = f"distill-{Path(str(teacher)).name}-{recipe.dataset}"
    data_config = {"input_size": (3, S, S), "mean": tuple(resolved["mean"]), "std": tuple(resolved["std"]),
                   "crop_pct": 1.0, "interpolation": "bilinear", "crop_mode": "center"}
    own = {"tag": tag, "description": description, "license": "same as teacher and data", "notes": (description,),
           "paper_ids": METHOD_PAPER[0],
           "paper_name": METHOD_PAPER[1]}
    model_config = {"pretrained_cfg": own}
    needed = sum(t.numel() * t.element_size() for t in backbone.state_dict().values()) * (2 if onnx else 1)
    with atomic_dir(out_p, replace=overwrite, what=f"the student of {resolved['checkpoint']}", needed=needed) as tmp:
        timm.models.save_for_hf(backbone, str(tmp), model_config=model_config, data_config=data_config,
                                safe_serialization=True)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        # the architecture's default pretrained_cfg describes timm's supervised weights: keep none of it
        cfg["pretrained_cfg"] = {k: v for k, v in cfg["pretrained_cfg"].items() if k not in INHERITED_PROVENANCE}
        cfg["pretrained_cfg"].update(own)
        onnx_meta = _write_onnx(tmp, S, opset) if onnx else None
        cfg["distill"] = {  # extra top-level key: timm ignores it, people and tools can read it
            "version": __version__, "teacher": teacher, "teacher_sha256": resolved.get("teacher_sha256"),
            "teacher_blocks": recipe.teacher_blocks, "timesteps": timesteps,
            "dataset": recipe.dataset, "data_root": published_root(recipe.data_root),
            "data_sha256": resolved.get("data_sha256"),
            "steps": int(step), "batch_size": recipe.batch_size, "num_processes": resolved.get("num_processes", 1),
            "student_size": S, "data_channels": resolved["data_channels"],
            "weights": "ema" if ema else "live", "ema_decay": recipe.ema_decay if ema else None,
            # names, not local paths: config.json is published with --push-to-hub
            "run": Path(run_dir).resolve().name, "checkpoint": Path(resolved["checkpoint"]).name,
        }
        if onnx_meta:
            cfg["distill"]["onnx"] = onnx_meta
        atomic_write_json(cfg_path, cfg)
        write_model_card(tmp, _run_probe_rows(Path(run_dir)), _run_monitor(Path(run_dir)))
    return out_p


def _write_onnx(export_dir: Path, size: int, opset: int) -> dict:
    """Write ``export_dir/model.onnx`` from the timm model as reloaded from ``export_dir`` and check it with
    onnxruntime; returns what ``config.json`` records of it (``distill.onnx``)."""
    import timm

    model = timm.create_model(f"local-dir:{export_dir}", pretrained=True, num_classes=0).eval()
    path = export_onnx(model, export_dir / ONNX_FILE, (3, size, size), opset=opset)
    diff = onnx_max_abs_diff(path, model, input_size=(3, size, size))
    if not diff <= ONNX_ATOL:
        raise ExportMismatchError(f"the ONNX export differs from the timm model by up to {diff:.3g} (more than "
                                  f"{ONNX_ATOL:g}) on the same input; nothing was written. Fix: try another opset "
                                  f"({option('opset')}), or report the model's name to distill.")
    _logger.info("wrote %s (opset %d), max |onnxruntime - torch| = %.3g", ONNX_FILE, opset, diff)
    return {"file": ONNX_FILE, "opset": int(opset), "input": ONNX_INPUT, "output": ONNX_OUTPUT,
            "input_shape": ["batch", 3, size, size], "output_shape": ["batch", model.num_features],
            "max_abs_diff_onnxruntime": diff}


def public_name(teacher: str) -> str:
    """A teacher as an export records it: an absolute local path shortened to its last component
    (``/home/me/unet`` -> ``unet``, ``python:/home/me/t.py:make`` -> ``python:t.py:make``); hub ids, packaged
    names and relative paths as given (``teacher_sha256`` identifies the weights)."""
    m = re.fullmatch(r"(python:)?(/[^:]*)(:.*)?", teacher)
    return f"{m.group(1) or ''}{Path(m.group(2)).name}{m.group(3) or ''}" if m else teacher


def published_root(data_root: Optional[str]) -> Optional[str]:
    """``data_root`` as an export records it: as the recipe gave it when relative (``data/x``, ``~/data/x``), None
    when absolute (a local path is not published; ``distill probe`` / ``finetune`` of the export then ask for
    ``--data-root``)."""
    return data_root if data_root and not Path(data_root).is_absolute() else None


def _load_ema(backbone, ckpt: Path, trained_with_ema: bool) -> None:
    """Load ``ckpt/ema.safetensors`` into ``backbone`` (strict).

    Raises:
        FileNotFoundError: the checkpoint has no EMA (the message says whether the run was trained without one).
        UnreadableFileError: the file is damaged or does not fit the student.
    """
    from safetensors.torch import load_file

    path, ema = ckpt / EMA_FILE, option("ema", flag=True)
    if not path.is_file():
        why = ("the run was trained without an EMA (recipe ema: false)" if not trained_with_ema else
               "the checkpoint holds none (written before ema was turned on?)")
        raise FileNotFoundError(f"{ema}: checkpoint '{ckpt}' has no {EMA_FILE}: {why}. Fix: export without {ema} "
                                f"(the live weights), or train with --set ema=true.")
    problem = safetensors_problem(path)
    if problem:
        raise UnreadableFileError(f"{ema}: '{path}' is {problem}. Fix: export another {option('checkpoint')}, or "
                                  f"without {ema}.", path)
    try:
        backbone.load_state_dict(load_file(str(path)), strict=True)
    except (RuntimeError, KeyError) as e:
        raise UnreadableFileError(f"{ema}: '{path}' does not fit the student: {error_text(e, 300)}", path) from e


def _run_monitor(run_dir: Path) -> Optional[dict]:
    """The run's last kNN monitor row (its ``summary.json``), else None."""
    try:
        return read_json(run_dir / SUMMARY).get("monitor")
    except (OSError, ValueError, AttributeError):
        return None


def _run_probe_rows(run_dir: Path) -> list:
    """Probe rows the run directory already holds (``results.json`` of ``distill run``), else []."""
    try:
        rows = read_json(run_dir / "results.json").get("results", [])
        return rows if isinstance(rows, list) else []
    except (OSError, ValueError, AttributeError):
        return []


#: a Hub repository id: ``name`` or ``namespace/name`` (letters, digits, ``-``, ``_``, ``.``; at most 96 each)
REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def push_to_hub(export_dir: str, repo_id: str, private: bool = False, token: Optional[str] = None,
                commit_message: Optional[str] = None, make_private: bool = False) -> str:
    """Upload an export (its ``config.json``, ``model.safetensors`` and ``README.md``, as written) to the Hugging
    Face Hub model repository ``repo_id`` (created if missing) with ``huggingface_hub.HfApi``; returns the repo URL.
    Loading it back: ``timm.create_model('hf-hub:REPO_ID', pretrained=True)``. The token is ``token``, else the
    one ``hf auth login`` / ``HF_TOKEN`` gives.

    ``private``: a new repository is created private; an existing one must already be private (the Hub ignores
    ``create_repo(private=True)`` for an existing repository, so a public one would publish the weights): it is
    refused before anything is uploaded, or with ``make_private`` made private first
    (``HfApi.update_repo_settings(private=True)``).

    Raises:
        ValueError: ``repo_id`` is not ``namespace/name``; or ``private`` and the repository exists and is public
            (without ``make_private``); nothing was uploaded.
        FileNotFoundError, UnreadableFileError: ``export_dir`` is not a whole export (`read_export`).
        HubUploadError: the Hub refused or could not be reached (the message names the repo, the cause and the
            fix).
    """
    from huggingface_hub import HfApi

    if not REPO_ID_RE.match(repo_id or "") or ".." in repo_id:
        raise ValueError(f"{option('push_to_hub')} {repo_id!r} is not a Hub repository id; valid: NAMESPACE/NAME "
                         f"(letters, digits, '-', '_', '.'), e.g. your-user/resnet18-distill-fmnist.")
    read_export(export_dir, "export")
    if not (Path(export_dir) / "README.md").is_file():  # an export of an older distill: give it its card
        write_model_card(export_dir)
    api = HfApi(token=token)
    fix = (f"Fix: log in (`hf auth login` or HF_TOKEN) with write access to that namespace, and check the network; "
           f"the export in '{export_dir}' is unchanged.")
    try:
        public = (private or make_private) and _is_public(api, repo_id)
    except Exception as e:  # noqa: BLE001 - huggingface_hub's HTTP and connection errors, named here
        raise HubUploadError(f"{option('push_to_hub')} {repo_id}: cannot read the repository's visibility "
                             f"({error_text(e, 300)}); nothing was uploaded. {fix}") from e
    if public and not make_private:
        private_ = option("private", flag=True)
        raise ValueError(f"{option('push_to_hub')} {repo_id} {private_}: the repository already exists and is "
                         f"public, and the Hub keeps an existing repository's visibility, so the upload would publish "
                         f"the model. Nothing was uploaded. Fix: add {option('make_private', flag=True)} to make it "
                         f"private first, push to a new repository, or drop {private_} to publish it.")
    try:
        if public:
            api.update_repo_settings(repo_id, private=True, repo_type="model")
            _logger.warning("%s: repository %s was public; it is private now", option("make_private", flag=True),
                            repo_id)
        url = api.create_repo(repo_id, repo_type="model", private=private or make_private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(export_dir),
                          allow_patterns=list(EXPORT_FILES),
                          commit_message=commit_message or f"distill {__version__} export")
    except Exception as e:  # noqa: BLE001 - huggingface_hub's HTTP and connection errors, named here
        raise HubUploadError(f"{option('push_to_hub')} {repo_id}: the upload failed ({error_text(e, 300)}). "
                             f"{fix}") from e
    return str(url)


def _is_public(api, repo_id: str) -> bool:
    """Whether the model repository ``repo_id`` exists and is public (``HfApi.repo_info(...).private``); False
    when it does not exist (``create_repo`` then makes it as asked)."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = api.repo_info(repo_id, repo_type="model")
    except RepositoryNotFoundError:
        return False
    return not info.private


def export_data_root(distill_meta: dict, dataset: str) -> Optional[str]:
    """The data root an export was distilled on (its config.json 'distill' key), when the dataset is the same and the
    folder exists here; else None (the dataset's default, or an error asking for --data-root)."""
    root = distill_meta.get("data_root")
    if root and distill_meta.get("dataset") == dataset and Path(root).expanduser().is_dir():
        return str(Path(root).expanduser())
    return None


def read_export(path: str, arg: str = "exported student") -> dict:
    """The ``config.json`` of an exported student, after checking that its files are whole (``arg`` names the
    directory's role in the messages, e.g. ``--model``).

    Raises:
        FileNotFoundError: no ``config.json``, or no ``model.safetensors`` (nor a ``pytorch_model.bin``).
        UnreadableFileError: ``config.json`` is not a JSON object, or ``model.safetensors`` is empty, truncated or
            damaged (the message names the file and says to export again).
    """
    p = Path(path)
    fix = f"export it again: distill export RUN -o {p} --overwrite."
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{arg} '{p}' is not an exported student (no config.json); run `distill export` first.")
    cfg = read_json(p / "config.json", f"{arg} config", fix)
    if not isinstance(cfg, dict):
        raise UnreadableFileError(f"{arg} config '{p / 'config.json'}' is not a JSON object. Fix: {fix}", p)
    if not (p / "model.safetensors").is_file():
        if (p / "pytorch_model.bin").is_file():  # a timm export of other origin
            return cfg
        raise FileNotFoundError(f"{arg} '{p}' has config.json but no model.safetensors. Fix: {fix}")
    problem = safetensors_problem(p / "model.safetensors")
    if problem:
        raise UnreadableFileError(f"{arg} weights '{p / 'model.safetensors'}' are {problem}. Fix: {fix}",
                                  p / "model.safetensors")
    return cfg


def load_exported(path: str, num_classes: int = 0):
    """``timm.create_model('local-dir:PATH', pretrained=True, num_classes=...)``, its files checked first
    (`read_export`).

    Raises:
        FileNotFoundError, UnreadableFileError: see `read_export`; or the weights do not fit the
            architecture its config.json names.
    """
    import timm

    p = Path(path)
    read_export(str(p))
    try:
        return timm.create_model(f"local-dir:{p}", pretrained=True, num_classes=num_classes)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise UnreadableFileError(f"cannot load exported student '{p}': {error_text(e, 300)}. Fix: export it again "
                                  f"(distill export RUN -o {p} --overwrite).", p) from e
