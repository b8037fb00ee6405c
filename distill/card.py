"""The model card of an export (``README.md``: Hugging Face front matter + Markdown), with every value escaped.

A card is published with the weights (``distill export --push-to-hub``), and its values come from the run: the
teacher's path or hub id, block names, the dataset, probe names. A value holding backticks, ``|``, HTML or a
Markdown link would otherwise end up live in the published page (a link, an image, a broken table). So every value
is printed through `md_code` (an inline code span: no HTML, link or emphasis is parsed inside one) or
`md_text` (backslash escapes, CommonMark section 2.4). Own code rather than a library: Python-Markdown and
markdown-it render Markdown but offer no escaping of untrusted text for it.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Optional

from .atomic import atomic_write_json, atomic_write_text
from .integrity import read_json

#: the method the student was trained with (pretrained_cfg ``paper_ids`` / ``paper_name`` of an export)
METHOD_PAPER = ("arXiv:2307.07487", "DreamTeacher: Pretraining Image Backbones with Deep Generative Models")
#: the self-supervised baseline's method (``bench/ssl_baseline.py`` exports, ``distill.method == 'simclr'``)
SIMCLR_PAPER = ("arXiv:2002.05709", "A Simple Framework for Contrastive Learning of Visual Representations")
#: characters `md_text` escapes: Markdown syntax (emphasis, code, links, images, HTML, tables, headings,
#: strikethrough, math on the Hub) and the ``:`` / ``@`` that start GFM's bare-URL and e-mail autolinks
MD_SPECIAL = set("\\`*_[]()<>|!&~#{}$:@")


def md_text(value) -> str:
    """``value`` as inert Markdown text: whitespace (newlines too) folded to single spaces, every character of
    `MD_SPECIAL` and the dot of ``www.`` backslash-escaped, so it renders as itself (no link, HTML, emphasis,
    table cell or heading)."""
    text = " ".join(str(value).split())
    text = "".join("\\" + c if c in MD_SPECIAL else c for c in text)
    return re.sub(r"(?i)(www)\.", r"\1\\.", text)


def md_code(value, table: bool = True) -> str:
    """``value`` as an inline code span that shows it verbatim: fenced by one backtick more than its longest run of
    backticks (padded with a space when it starts or ends with one), whitespace folded, and in a table cell
    (``table``) each ``|`` written ``\\|`` (GFM splits cells before it parses code spans)."""
    text = " ".join(str(value).split())
    if table:
        text = text.replace("|", "\\|")
    fence = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def model_card(cfg: dict, probe_rows: Optional[list] = None, monitor: Optional[dict] = None) -> str:
    """The ``README.md`` of an export (Hugging Face model card: YAML front matter + Markdown) from its
    ``config.json`` ``cfg``: what it is, how it was made, how to load it in timm, and the probe numbers when known
    (``probe_rows`` as ``distill probe`` / ``distill run`` give them; ``monitor``: the last kNN monitor row). Every
    value from ``cfg``, the rows or the monitor is escaped (`md_code`, `md_text`)."""
    d, p = cfg.get("distill", {}), cfg.get("pretrained_cfg", {})
    t, c = md_text, md_code
    arch = cfg.get("architecture", "?")
    size = p.get("input_size", [3, d.get("student_size", "?"), d.get("student_size", "?")])
    size = size[-1] if isinstance(size, (list, tuple)) and size else size
    ema = d.get("weights") == "ema"
    if d.get("method") == "simclr":  # bench/ssl_baseline.py: the self-supervised baseline, no teacher
        tags, title = ["- self-supervised", "- simclr"], f"# {t(arch)} pretrained with SimCLR"
        how = (f"trained with SimCLR ({SIMCLR_PAPER[0]}; lightly's NT-Xent loss and projection head) by distill's "
               f"`bench/ssl_baseline.py`, the self-supervised baseline its distilled students are compared with at "
               f"the same compute")
        seconds = d.get("seconds")
        made = [f"| method | SimCLR, two augmented views per image"
                f"{', ' + t(round(float(seconds))) + ' s of training' if isinstance(seconds, (int, float)) else ''} |"]
        licence = "check the dataset's terms"
    else:
        tags, title = ["- distill", "- knowledge-distillation"], f"# {t(arch)} distilled from a diffusion model"
        how = (f"whose weights were trained by distill {t(d.get('version', '?'))} to regress the features of the "
               f"diffusion model {c(d.get('teacher'), False)} (DreamTeacher-style feature distillation, "
               f"{METHOD_PAPER[0]})")
        made = [f"| teacher | {c(d.get('teacher'))} (sha256 of its weights {c(str(d.get('teacher_sha256'))[:16])}...) |",
                f"| teacher blocks, timesteps | {t(d.get('teacher_blocks'))}, {t(d.get('timesteps'))} |"]
        licence = "check the teacher's and the dataset's terms"
    intro = (f"A [timm](https://github.com/huggingface/pytorch-image-models) {c(arch, False)} backbone {how}. It is a "
             f"feature extractor (`num_classes=0`): no classifier was trained. It is not timm's supervised "
             f"{c(arch, False)}; none of those weights were used.")
    lines = ["---", "library_name: timm", "license: other", "tags:", "- image-feature-extraction", "- timm",
             *tags, "---", "", title, "", intro, "",
             "## How it was made", "",
             "| | |", "|---|---|", *made,
             f"| data | {c(d.get('dataset'))} (images only, labels unused"
             f"{'; sha256 ' + c(str(d.get('data_sha256'))[:16]) + '...' if d.get('data_sha256') else ''}) |",
             f"| steps x batch x processes | {t(d.get('steps'))} x {t(d.get('batch_size'))} x "
             f"{t(d.get('num_processes', 1))} |",
             f"| weights | {'EMA (decay ' + t(d.get('ema_decay')) + ')' if ema else 'live (not EMA)'}"
             f"{' of checkpoint ' + c(Path(str(d.get('checkpoint'))).name) if d.get('checkpoint') else ''} |",
             f"| input | {t(size)} px RGB, mean {t(list(p.get('mean', [])))}, std {t(list(p.get('std', [])))} "
             f"{'(grayscale images replicated to 3 channels) ' if d.get('data_channels') == 1 else ''}|",
             f"| license | {t(p.get('license'))}: {licence} |", "",
             "## Load it in timm", "", "```python", "import timm", "",
             "model = timm.create_model('hf-hub:USER/REPO', pretrained=True, num_classes=0)  # or 'local-dir:PATH'",
             "cfg = timm.data.resolve_model_data_config(model)   # input size and mean/std used in training",
             "transform = timm.data.create_transform(**cfg)", "features = model(transform(image).unsqueeze(0))  # [1, "
             f"{int(cfg['num_features']) if isinstance(cfg.get('num_features'), int) else 'D'}]", "```", "",
             "Fine-tune it as any timm model (`num_classes=K` adds a new head), e.g. timm's `train.py --model "
             "hf-hub:USER/REPO --pretrained`.", "", "## Evaluation", ""]
    if probe_rows:
        rows = [r for r in probe_rows if isinstance(r, dict)]
        lines += ["Frozen features, measured by `distill run` / `distill probe` on the dataset's test split:", "",
                  "| model | linear probe top-1 | kNN top-1 | probe train / test images | weights |",
                  "|---|---|---|---|---|"]
        lines += [f"| {t(r.get('name'))} | {t(r.get('linear_top1'))} | {t(r.get('knn_top1'))} (k={t(r.get('k'))}) | "
                  f"{t(r.get('num_train'))} / {t(r.get('num_test'))} | {t(r.get('weights', '?'))} |" for r in rows]
        tested = list(dict.fromkeys(str(r["test"]) for r in rows if r.get("test")))
        if tested:
            lines += ["", "; ".join(tested) + "."]  # written by distill from counts: nothing to escape
    elif monitor:
        lines += [f"Only the training monitor: kNN top-1 {t(monitor.get('knn_top1'))}% (k={t(monitor.get('k'))}) at "
                  f"step {t(monitor.get('step'))}, on {t(monitor.get('train_images'))} train / "
                  f"{t(monitor.get('test_images'))} test images. Probe it with `distill probe PATH`."]
    else:
        lines += ["Not measured at export. Probe it with `distill probe PATH` (linear + kNN on frozen features)."]
    return "\n".join(lines) + "\n"


def write_model_card(export_dir, probe_rows: Optional[list] = None, monitor: Optional[dict] = None) -> Path:
    """Write ``export_dir/README.md`` (`model_card`) from its ``config.json``, the probe rows given, and
    ``monitor`` (the training run's last kNN monitor row) when there are no probe rows; atomically. Its sha256 is
    recorded in ``config.json`` (``distill.card_sha256``), so an overwrite can tell an edited card from its own."""
    export_dir = Path(export_dir)
    cfg = read_json(export_dir / "config.json")
    cfg.setdefault("distill", {})
    text = model_card(cfg, probe_rows, None if probe_rows else monitor)
    cfg["distill"]["card_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    atomic_write_json(export_dir / "config.json", cfg)
    return atomic_write_text(export_dir / "README.md", text)
