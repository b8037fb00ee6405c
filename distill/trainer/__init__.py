"""The distillation loop (`train`) and its parts: target sources, the step, checkpoints, the policy log.

``distill.trainer`` was one module; the names imported from it before stay importable here.
"""
from ..build import (TargetLayout, build_model, build_optimizer, build_policy, build_scheduler,  # noqa: F401
                     build_teacher, build_train_data, check_channels, check_labelled, resolve_mean_std, target_layout)
from ..errors import NonFiniteLossError, RunExistsError, UntrustedCheckpointError  # noqa: F401
from ..rundir import latest_checkpoint, list_checkpoints, load_trained, prepare_run_dir  # noqa: F401
from .checkpoint import load_checkpoint, save_checkpoint  # noqa: F401
from .loop import Session, setup, train  # noqa: F401
from .policy_log import PolicyLog  # noqa: F401
from .step import Batch, StepInput, make_views, nonfinite_terms, train_step  # noqa: F401
from .targets import CacheTargets, LiveTeacherTargets, PolicyTargets  # noqa: F401
from .timesteps import resolve_timesteps  # noqa: F401
