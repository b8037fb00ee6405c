"""Choosing the teacher's block and timestep (DDAE, Xiang et al. ICCV 2023): procedures that return results.

- `grid`: linear probes of the teacher's pooled features over blocks x timesteps, one teacher forward per
  batch (``grid_probe``), with its memory estimate; ``pooled_teacher_features``.
- `label_free`: alignment + uniformity of two noisings, no labels (``label_free_scores``).
- `auto`: ``distill select`` (``run_selection``) and a recipe's ``timesteps: auto-grid | auto-label-free``
  (``auto_select_timestep``).
- `outputs`: the files a selection writes and its Markdown summary.
- `teacher_probe`: ``distill probe teacher:NAME`` (``probe_teacher``).
"""
from .auto import auto_select_timestep, check_candidates, per_timestep, run_selection, selection_split
from .grid import (available_memory_gb, check_grid_memory, estimate_grid_memory, grid_probe,
                   pooled_teacher_features, teacher_grid_probe)
from .label_free import alignment_loss, label_free_scores, rank_correlation, uniformity_loss
from .outputs import (SelectionResult, format_selection, write_grid_outputs, write_label_free_outputs,
                      write_rows_csv, yaml_value)
from .teacher_probe import format_teacher_probe, probe_teacher

__all__ = [
    "auto_select_timestep", "check_candidates", "per_timestep", "run_selection", "selection_split",
    "available_memory_gb", "check_grid_memory", "estimate_grid_memory", "grid_probe", "pooled_teacher_features",
    "teacher_grid_probe",
    "alignment_loss", "label_free_scores", "rank_correlation", "uniformity_loss",
    "SelectionResult", "format_selection", "write_grid_outputs", "write_label_free_outputs", "write_rows_csv",
    "yaml_value",
    "format_teacher_probe", "probe_teacher",
]
