"""Export the distilled student in timm's own layout (``config.json`` + ``model.safetensors``) with a model card
(``README.md``), and push an export to the Hugging Face Hub.

Only the backbone is written (the live weights, or with ``ema`` the run's EMA of them); the regressor is discarded.
``pretrained_cfg`` tells the truth about training: the student's input size and mean/std, a tag, a description
naming the teacher, blocks and timesteps, and none of the provenance timm's default config of the architecture
carries (``origin_url``, ``paper_ids`` of supervised ImageNet weights: :data:`INHERITED_PROVENANCE`). Reload with
``timm.create_model('local-dir:OUT', pretrained=True, num_classes=K)``.

An export deletes only what it can prove it wrote: an existing ``-o/--output-dir`` is replaced (``overwrite``) only when it is
an earlier export (:func:`export_problem`), and never when it is the run directory or holds it.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional

from .atomic import atomic_dir, atomic_write_json, atomic_write_text
from .errors import HubUploadError, RunExistsError, UnreadableFileError
from .integrity import error_text, read_json, safetensors_problem
from .rundir import EMA_FILE, SUMMARY, is_run, load_trained
from .version import __version__

_logger = logging.getLogger(__name__)

#: the files ``distill export`` writes
EXPORT_FILES = ("config.json", "model.safetensors", "README.md")
#: pretrained_cfg keys that describe the weights timm would download for the architecture (its supervised
#: ImageNet training), not these weights: removed from an export and replaced by distill's own
INHERITED_PROVENANCE = ("origin_url", "paper_ids", "paper_name", "license", "notes", "description", "tag",
                        "hf_hub_id", "hf_hub_filename", "url", "file", "source", "state_dict")
#: the method the student was trained with (pretrained_cfg ``paper_ids`` / ``paper_name`` of an export)
METHOD_PAPER = ("arXiv:2307.07487", "DreamTeacher: Pretraining Image Backbones with Deep Generative Models")


def _listing(path: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return ", ".join(names[:8]) + (f" ... ({len(names)} entries)" if len(names) > 8 else "")


def export_problem(path: Path) -> Optional[str]:
    """Why the existing ``path`` is not an export written by distill, or None when it is: a directory holding only
    :data:`EXPORT_FILES`, whose ``config.json`` has the ``distill`` key."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return "it is a file, not a directory"
    foreign = sorted(p.name for p in path.iterdir() if p.name not in EXPORT_FILES)
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
    fix = f"Fix: choose another -o/--output-dir, e.g. {Path(run_dir) / 'student'}."
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
        raise FileExistsError(f"export target '{out}' already exists ({what}); pass --overwrite to replace an "
                              f"earlier export, or choose another -o/--output-dir.")
    problem = export_problem(target)
    if problem:
        raise FileExistsError(f"--overwrite refused: export target '{out}' is not an export written by distill: "
                              f"{problem}. Nothing was deleted. {fix}")


def export_student(run_dir: str, out: str, checkpoint: Optional[str] = None, overwrite: bool = False,
                   ema: bool = False) -> Path:
    """Write the student of ``run_dir`` to ``out`` in timm format, with a model card (:func:`write_model_card`).
    The checkpoint is ``checkpoint``, or the newest one whose weights load (newer damaged ones are skipped with a
    warning); it is logged and recorded in ``config.json`` (``distill.checkpoint``). ``ema``: write the
    checkpoint's EMA of the student (recipe ``ema: true``) instead of its live weights.

    Raises:
        RunExistsError, FileExistsError: ``out`` may not be written (see :func:`check_export_target`).
        FileNotFoundError: not a run directory, or no checkpoint; with ``ema``, a checkpoint without an EMA.
        UnreadableFileError: the checkpoint's weights are damaged (the message names the checkpoint and file).
        WriteError: the export could not be written (disk full, read-only, ...): what, where and the space needed.
    """
    import timm.models

    check_export_target(run_dir, out, overwrite)
    out_p = Path(out)
    model, recipe, resolved = load_trained(run_dir, checkpoint)
    backbone = model.student.model
    if ema:
        _load_ema(backbone, Path(resolved["checkpoint"]), recipe.ema)
    weights = "EMA of the student's weights" if ema else "student weights"
    _logger.info("exporting the %s of %s", weights, resolved["checkpoint"])
    S = recipe.student_size
    teacher = recipe.teacher if isinstance(recipe.teacher, str) else "UNet2DModel(config dict)"
    step = Path(resolved["checkpoint"]).name.split("-")[-1]
    timesteps = resolved.get("timesteps_used", recipe.timesteps)  # what the run used (auto modes resolved)
    description = (f"{recipe.student} distilled with distill {__version__} from teacher {teacher} (blocks "
                   f"{recipe.teacher_blocks}, timesteps {timesteps}) on {recipe.dataset} for {step} steps at {S}px"
                   f"{' (EMA weights, decay ' + str(recipe.ema_decay) + ')' if ema else ''}.")
    tag = f"distill-{Path(str(teacher)).name}-{recipe.dataset}"
    data_config = {"input_size": (3, S, S), "mean": tuple(resolved["mean"]), "std": tuple(resolved["std"]),
                   "crop_pct": 1.0, "interpolation": "bilinear", "crop_mode": "center"}
    own = {"tag": tag, "description": description, "license": "same as teacher and data", "notes": (description,),
           "paper_ids": METHOD_PAPER[0],
           "paper_name": METHOD_PAPER[1]}
    model_config = {"pretrained_cfg": own}
    needed = sum(t.numel() * t.element_size() for t in backbone.state_dict().values())
    with atomic_dir(out_p, replace=overwrite, what=f"the student of {resolved['checkpoint']}", needed=needed) as tmp:
        timm.models.save_for_hf(backbone, str(tmp), model_config=model_config, data_config=data_config,
                                safe_serialization=True)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        # the architecture's default pretrained_cfg describes timm's supervised weights: keep none of it
        cfg["pretrained_cfg"] = {k: v for k, v in cfg["pretrained_cfg"].items() if k not in INHERITED_PROVENANCE}
        cfg["pretrained_cfg"].update(own)
        cfg["distill"] = {  # extra top-level key: timm ignores it, people and tools can read it
            "version": __version__, "teacher": teacher, "teacher_sha256": resolved.get("teacher_sha256"),
            "teacher_blocks": recipe.teacher_blocks, "timesteps": timesteps,
            "dataset": recipe.dataset, "data_root": recipe.data_root, "data_sha256": resolved.get("data_sha256"),
            "steps": int(step), "batch_size": recipe.batch_size, "num_processes": resolved.get("num_processes", 1),
            "student_size": S, "data_channels": resolved["data_channels"],
            "weights": "ema" if ema else "live", "ema_decay": recipe.ema_decay if ema else None,
            "run_dir": str(Path(run_dir).resolve()), "checkpoint": resolved["checkpoint"],
        }
        atomic_write_json(cfg_path, cfg)
        write_model_card(tmp, _run_probe_rows(Path(run_dir)))
    return out_p


def _load_ema(backbone, ckpt: Path, trained_with_ema: bool) -> None:
    """Load ``ckpt/ema.safetensors`` into ``backbone`` (strict).

    Raises:
        FileNotFoundError: the checkpoint has no EMA (the message says whether the run was trained without one).
        UnreadableFileError: the file is damaged or does not fit the student.
    """
    from safetensors.torch import load_file

    path = ckpt / EMA_FILE
    if not path.is_file():
        why = ("the run was trained without an EMA (recipe ema: false)" if not trained_with_ema else
               "the checkpoint holds none (written before ema was turned on?)")
        raise FileNotFoundError(f"--ema: checkpoint '{ckpt}' has no {EMA_FILE}: {why}. Fix: export without --ema "
                                f"(the live weights), or train with --set ema=true.")
    problem = safetensors_problem(path)
    if problem:
        raise UnreadableFileError(f"--ema: '{path}' is {problem}. Fix: export another --checkpoint, or without "
                                  f"--ema.", path)
    try:
        backbone.load_state_dict(load_file(str(path)), strict=True)
    except (RuntimeError, KeyError) as e:
        raise UnreadableFileError(f"--ema: '{path}' does not fit the student: {error_text(e, 300)}", path) from e


def _run_probe_rows(run_dir: Path) -> list:
    """Probe rows the run directory already holds (``results.json`` of ``distill run``), else []."""
    try:
        rows = read_json(run_dir / "results.json").get("results", [])
        return rows if isinstance(rows, list) else []
    except (OSError, ValueError, AttributeError):
        return []


def model_card(cfg: dict, probe_rows: Optional[list] = None, monitor: Optional[dict] = None) -> str:
    """The ``README.md`` of an export (Hugging Face model card: YAML front matter + Markdown) from its
    ``config.json`` ``cfg``: what it is, how it was made, how to load it in timm, and the probe numbers when known
    (``probe_rows`` as ``distill probe`` / ``distill run`` give them; ``monitor``: the last kNN monitor row)."""
    d, p = cfg.get("distill", {}), cfg.get("pretrained_cfg", {})
    arch = cfg.get("architecture", "?")
    size = p.get("input_size", [3, d.get("student_size", "?"), d.get("student_size", "?")])
    lines = ["---", "library_name: timm", "license: other", "tags:", "- image-feature-extraction", "- timm",
             "- distill", "- knowledge-distillation", "---", "",
             f"# {arch} distilled from a diffusion model", "",
             f"A [timm](https://github.com/huggingface/pytorch-image-models) `{arch}` backbone whose weights were "
             f"trained by distill {d.get('version', '?')} to regress the features of the "
             f"diffusion model `{d.get('teacher')}` (DreamTeacher-style feature distillation, "
             f"{METHOD_PAPER[0]}). It is a feature extractor (`num_classes=0`): no classifier was trained. It is "
             f"not timm's supervised `{arch}`; none of those weights were used.", "",
             "## How it was made", "",
             "| | |", "|---|---|",
             f"| teacher | `{d.get('teacher')}` (sha256 of its weights `{str(d.get('teacher_sha256'))[:16]}...`) |",
             f"| teacher blocks, timesteps | {d.get('teacher_blocks')}, {d.get('timesteps')} |",
             f"| data | `{d.get('dataset')}` (images only, labels unused; sha256 `{str(d.get('data_sha256'))[:16]}...`) |",
             f"| steps x batch x processes | {d.get('steps')} x {d.get('batch_size')} x {d.get('num_processes')} |",
             f"| weights | {'EMA (decay ' + str(d.get('ema_decay')) + ')' if d.get('weights') == 'ema' else 'live (not EMA)'} "
             f"of checkpoint `{Path(str(d.get('checkpoint'))).name}` |",
             f"| input | {size[-1]} px RGB, mean {list(p.get('mean', []))}, std {list(p.get('std', []))} "
             f"{'(grayscale images replicated to 3 channels) ' if d.get('data_channels') == 1 else ''}|",
             f"| license | {p.get('license')}: check the teacher's and the dataset's terms |", "",
             "## Load it in timm", "", "```python", "import timm", "",
             "model = timm.create_model('hf-hub:USER/REPO', pretrained=True, num_classes=0)  # or 'local-dir:PATH'",
             "cfg = timm.data.resolve_model_data_config(model)   # input size and mean/std used in training",
             "transform = timm.data.create_transform(**cfg)", "features = model(transform(image).unsqueeze(0))  # [1, "
             f"{cfg.get('num_features', 'D')}]", "```", "",
             "Fine-tune it as any timm model (`num_classes=K` adds a new head), e.g. timm's `train.py --model "
             "hf-hub:USER/REPO --pretrained`.", "", "## Evaluation", ""]
    if probe_rows:
        rows = [r for r in probe_rows if isinstance(r, dict)]
        lines += ["Frozen features, measured by `distill run` / `distill probe` on the dataset's test split:", "",
                  "| model | linear probe top-1 | kNN top-1 | probe train / test images | weights |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r.get('name')} | {r.get('linear_top1')} | {r.get('knn_top1')} (k={r.get('k')}) | "
                  f"{r.get('num_train')} / {r.get('num_test')} | {r.get('weights', '?')} |" for r in rows]
        tested = list(dict.fromkeys(str(r["test"]) for r in rows if r.get("test")))
        if tested:
            lines += ["", "; ".join(tested) + "."]
    elif monitor:
        lines += [f"Only the training monitor: kNN top-1 {monitor.get('knn_top1')}% (k={monitor.get('k')}) at step "
                  f"{monitor.get('step')}, on {monitor.get('train_images')} train / {monitor.get('test_images')} test "
                  f"images. Probe it with `distill probe PATH`."]
    else:
        lines += ["Not measured at export. Probe it with `distill probe PATH` (linear + kNN on frozen features)."]
    return "\n".join(lines) + "\n"


def write_model_card(export_dir, probe_rows: Optional[list] = None) -> Path:
    """Write ``export_dir/README.md`` (:func:`model_card`) from its ``config.json``, the probe rows given, and the
    training run's last monitor row (its ``summary.json``) when there are no probe rows; atomically. Its sha256 is
    recorded in ``config.json`` (``distill.card_sha256``), so an overwrite can tell an edited card from its own."""
    export_dir = Path(export_dir)
    cfg = read_json(export_dir / "config.json")
    cfg.setdefault("distill", {})
    monitor = None
    if not probe_rows:
        try:
            monitor = read_json(Path(cfg["distill"]["run_dir"]) / SUMMARY).get("monitor")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            monitor = None
    text = model_card(cfg, probe_rows, monitor)
    cfg["distill"]["card_sha256"] = _sha256(text.encode("utf-8"))
    atomic_write_json(export_dir / "config.json", cfg)
    return atomic_write_text(export_dir / "README.md", text)


#: a Hub repository id: ``name`` or ``namespace/name`` (letters, digits, ``-``, ``_``, ``.``; at most 96 each)
REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def push_to_hub(export_dir: str, repo_id: str, private: bool = False, token: Optional[str] = None,
                commit_message: Optional[str] = None) -> str:
    """Upload an export (its ``config.json``, ``model.safetensors`` and ``README.md``, as written) to the Hugging
    Face Hub model repository ``repo_id`` (created if missing) with ``huggingface_hub.HfApi``; returns the repo URL.
    Loading it back: ``timm.create_model('hf-hub:REPO_ID', pretrained=True)``. The token is ``token``, else the
    one ``huggingface-cli login`` / ``HF_TOKEN`` gives.

    Raises:
        ValueError: ``repo_id`` is not ``namespace/name``.
        FileNotFoundError, UnreadableFileError: ``export_dir`` is not a whole export (:func:`read_export`).
        HubUploadError: the Hub refused or could not be reached (the message names the repo, the cause and the
            fix).
    """
    from huggingface_hub import HfApi

    if not REPO_ID_RE.match(repo_id or "") or ".." in repo_id:
        raise ValueError(f"--push-to-hub {repo_id!r} is not a Hub repository id; valid: NAMESPACE/NAME (letters, "
                         f"digits, '-', '_', '.'), e.g. your-user/resnet18-distill-fmnist.")
    read_export(export_dir, "export")
    if not (Path(export_dir) / "README.md").is_file():  # an export of an older distill: give it its card
        write_model_card(export_dir)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(export_dir),
                          allow_patterns=list(EXPORT_FILES),
                          commit_message=commit_message or f"distill {__version__} export")
    except Exception as e:  # noqa: BLE001 - huggingface_hub's HTTP and connection errors, named here
        raise HubUploadError(f"--push-to-hub {repo_id}: the upload failed ({error_text(e, 300)}). Fix: log in "
                              f"(`huggingface-cli login` or HF_TOKEN) with write access to that namespace, and check "
                              f"the network; the export in '{export_dir}' is unchanged.") from e
    return str(url)


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
    (:func:`read_export`).

    Raises:
        FileNotFoundError, UnreadableFileError: see :func:`read_export`; or the weights do not fit the
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
