"""Supervised fine-tuning: one loop (`fit`) with tasks on top (`Task`; classification in
`distill.finetune`, segmentation in `distill.segment`).

Modules: `config` (`TuneConfig`, the settings every task reads), `task` (the contract),
`loop` (`fit`), `sampler` (`StepBatchSampler`), `outdir` (the output directory:
file names, checks, overwrite rules, run lock, reading ``result.json``), `trainlog` (``train_log.csv`` and the
tracker), `progress` (bars and plain lines), `sweep` (one run per fraction and seed).
"""
from .config import TuneConfig
from .loop import fit, is_main_process, machine_description, make_accelerator
from .outdir import (GRID_FILE, LOG_FILE, MODEL_DIR, MODEL_TAG, RESULT_FILE, check_output_dir, lock_output_dir,
                     prepare_output_dir, read_result, result_problem, saved_model_problem, write_result)
from .sampler import StepBatchSampler
from .sweep import run_dir_name, sweep
from .task import Task

__all__ = ["TuneConfig", "Task", "fit", "is_main_process", "machine_description", "make_accelerator", "StepBatchSampler", "sweep",
           "run_dir_name", "GRID_FILE", "LOG_FILE", "MODEL_DIR", "MODEL_TAG", "RESULT_FILE", "check_output_dir",
           "lock_output_dir", "prepare_output_dir", "read_result", "result_problem", "saved_model_problem",
           "write_result"]
