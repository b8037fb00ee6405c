"""Which timesteps a run uses: the recipe's list, or a selection made once at the start of the run."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from ..build import check_labelled
from ..config import Recipe
from ..select import auto_select_timestep


def resolve_timesteps(recipe: Recipe, ds, channels: int, run_dir: Path, accelerator, progress: bool = True):
    """The timesteps a run uses and how they were chosen: ``(timesteps, selection info or None)``.

    A list is used as is. ``auto-grid`` / ``auto-label-free`` run the selection once (main process) into
    ``run_dir/selection/`` and reuse it on resume. ``policy`` returns the candidates (checked to have labels).

    Raises:
        ValueError: ``policy`` or ``auto-grid`` on unlabelled data.
    """
    mode = recipe.timesteps
    if isinstance(mode, list):
        return list(mode), None
    if mode == "policy":
        check_labelled(ds, "timesteps: policy", "the policy's reward is a classifier's cross-entropy on teacher "
                       "features", "use labelled data, or timesteps: auto-label-free or a fixed list such as [11]")
        return list(recipe.timestep_candidates), {"method": "policy", "candidates": list(recipe.timestep_candidates)}
    if mode == "auto-grid":
        check_labelled(ds, "timesteps: auto-grid", "the grid trains linear probes", "use timesteps: auto-label-free")
    sel_dir = run_dir / "selection"
    path = sel_dir / "selection.json"
    if accelerator.is_main_process and not path.exists():
        # on a forked RNG: a resumed run skips the selection, so it must not move the stream the teacher (a
        # config-dict teacher is random-init) and the model are then built from
        state = (random.getstate(), np.random.get_state())
        with torch.random.fork_rng(devices=[]):
            res = auto_select_timestep(recipe, ds, channels, sel_dir, progress)
        random.setstate(state[0])
        np.random.set_state(state[1])
        accelerator.print(f"{mode}: timestep {res['timestep']} (scores per timestep {res['scores']}; "
                          f"{res['teacher_forwards']} teacher forwards, {res['seconds']} s); files in {sel_dir}")
    accelerator.wait_for_everyone()
    sel = json.loads(path.read_text())
    return [int(sel["timestep"])], sel
