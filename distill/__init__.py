"""distill: turn the features of pretrained diffusion models into compact timm student backbones."""
from .cache import CacheMismatchError, FeatureCache, extract_features_cache
from .config import Recipe, load_recipe, make_recipe
from .data import FashionMNIST, ImageFolder, build_dataset, label_subset, stratified_indices, to_student, to_teacher
from .evaluate import probe_exported, probe_fn, probe_random_init
from .export import export_student, load_exported
from .finetune import FinetuneConfig, finetune, finetune_sweep
from .select import grid_probe, pooled_teacher_features
from .losses import attention_map, attention_transfer_loss, cosine_loss, feature_distillation_loss, mse_loss, whiten
from .policy import TimestepPolicy
from .probe import ensemble_probe, extract_features, knn_probe, linear_probe, multi_linear_probe
from .regressor import FeatureRegressor
from .report import write_report
from .select import label_free_scores, rank_correlation
from .student import DistillModel, Student
from .teacher import DiffusionTeacher, load_teacher, packaged_teachers
from .trainer import load_trained, train

__version__ = "0.1.0"

__all__ = [
    "CacheMismatchError", "FeatureCache", "extract_features_cache",
    "Recipe", "load_recipe", "make_recipe",
    "FashionMNIST", "ImageFolder", "build_dataset", "label_subset", "stratified_indices", "to_student", "to_teacher",
    "probe_exported", "probe_fn", "probe_random_init",
    "export_student", "load_exported",
    "FinetuneConfig", "finetune", "finetune_sweep",
    "grid_probe", "pooled_teacher_features",
    "TimestepPolicy",
    "attention_map", "attention_transfer_loss", "cosine_loss", "feature_distillation_loss", "mse_loss", "whiten",
    "ensemble_probe", "extract_features", "knn_probe", "linear_probe", "multi_linear_probe",
    "FeatureRegressor", "write_report", "label_free_scores", "rank_correlation", "DistillModel", "Student",
    "DiffusionTeacher", "load_teacher", "packaged_teachers",
    "load_trained", "train",
]
