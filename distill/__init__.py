"""distill: turn the features of pretrained diffusion models into compact timm student backbones."""
from .config import Recipe, load_recipe, make_recipe
from .data import FashionMNIST, ImageFolder, build_dataset, label_subset, stratified_indices, to_student, to_teacher
from .evaluate import probe_exported, probe_fn, probe_random_init
from .export import export_student, load_exported
from .losses import attention_map, attention_transfer_loss, cosine_loss, feature_distillation_loss, mse_loss, whiten
from .probe import extract_features, knn_probe, linear_probe, multi_linear_probe
from .regressor import FeatureRegressor
from .student import DistillModel, Student
from .teacher import DiffusionTeacher, load_teacher, packaged_teachers
from .trainer import load_trained, train

__version__ = "0.1.0"

__all__ = [
    "Recipe", "load_recipe", "make_recipe",
    "FashionMNIST", "ImageFolder", "build_dataset", "label_subset", "stratified_indices", "to_student", "to_teacher",
    "probe_exported", "probe_fn", "probe_random_init",
    "export_student", "load_exported",
    "attention_map", "attention_transfer_loss", "cosine_loss", "feature_distillation_loss", "mse_loss", "whiten",
    "extract_features", "knn_probe", "linear_probe", "multi_linear_probe",
    "FeatureRegressor", "DistillModel", "Student",
    "DiffusionTeacher", "load_teacher", "packaged_teachers",
    "load_trained", "train",
]
