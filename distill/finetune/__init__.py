"""Fine-tune a backbone on a labelled dataset with a fraction of the labels: an exported student or a timm model at
random init (the scratch baseline), under the same step budget, input pipeline, augmentation and schedule.

One run: ``build_dataset`` train split -> seeded stratified ``label_subset`` -> batches drawn from an endless
seeded shuffle (a fixed number of *steps*, so 1% and 100% of the labels get the same budget) -> kornia
augmentation on its own RNG stream -> ``to_student`` (size, mean/std) -> timm model with a new head ->
cross-entropy, timm optimizer factory, warmup + cosine -> top-1/top-5 on the full test split every
``eval_every`` steps and at the end. The run directory holds ``result.json`` (everything needed for a results
table), ``train_log.csv`` (training loss) and, with ``save_model``, the fine-tuned model in timm format.

A distilled student and its scratch baseline seeded alike see the same images in the same order with the same
augmentation draws and the same learning rate at every step; only the initial weights differ.

The loop, the output directory and the sweep are shared with segmentation (`distill.tune`); this package holds
what classification adds. Modules: `config` (`FinetuneConfig`), `model` (what is fine-tuned and
its preprocessing), `data` (label subset), `run` (`ClassificationTask`, one run, evaluation),
`sweep` (one run per fraction and seed).
"""
import inspect
import sys
import types

from .config import FinetuneConfig
from ..export import export_data_root
from ..augment import SeededAugment
from ..tune import LOG_FILE, RESULT_FILE, StepBatchSampler, machine_description, prepare_output_dir, run_dir_name
from .data import FinetuneData, finetune_data
from .model import ModelSource, build_model, check_timm_name, parse_model_source, resolve_preprocessing
from .run import ClassificationTask, evaluate, finetune, result_line
from .sweep import finetune_sweep

__all__ = ["FinetuneConfig", "ClassificationTask", "finetune", "finetune_sweep", "finetune_data", "build_model", "parse_model_source",
           "evaluate", "StepBatchSampler", "SeededAugment", "run_dir_name",
           "FinetuneData", "export_data_root", "ModelSource", "check_timm_name", "resolve_preprocessing",
           "LOG_FILE", "RESULT_FILE", "machine_description", "prepare_output_dir", "result_line"]


class _CallableFinetuneModule(types.ModuleType):
    """This subpackage, callable as the function `finetune`.

    ``distill.finetune`` is the documented function (``distill.finetune(cfg, output_dir)``) and also the name of
    this subpackage. Python's import system binds a subpackage to its parent's attribute of the same name once the
    subpackage is imported (``from distill import FinetuneConfig``, ``import distill.finetune.run``), so
    ``from distill import FinetuneConfig, finetune`` gave this module, and calling it raised "'module' object is
    not callable". Calling the module calls the function instead, whichever object the name holds; submodule
    imports (``import distill.finetune.run as r``) and dotted paths keep working.
    """

    def __call__(self, *args, **kwargs):
        return finetune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableFinetuneModule
__signature__ = inspect.signature(finetune)  # inspect / IDEs / Jupyter show the function's parameters
