"""Datasets and the conversions that turn one image batch into what the teacher and the student need.

Datasets return ``(image, label)`` with ``image`` a ``uint8`` tensor ``[C, H, W]`` and ``label`` an int (``-1`` when
the dataset has no labels); every image of a dataset has one size. Sources (`build_dataset`):

- ``fashion-mnist`` (`fmnist`), ``image-folder`` (`folder`: class folders, nested, splits ``train/``
  ``val/`` ``test/``, or flat and unlabelled), ``file-list`` (`filelist`: CSV of ``path[,label]``), ``hf``
  (`hf`: Hugging Face ``datasets``);
- one decoder for all of them, `decode_image` (`decode`: every PIL mode to 8 bits, decode-time resize);
- batches and conversions (`batch`), label subsets (`subsets`), the input-file fingerprint of the
  feature-cache key (`fingerprint`).
- segmentation: image + mask pairs (`segmentation`), mask files and the mask resampler (`masks`), sets
  as downloaded: CamVid, VOC, ADE20K, Cityscapes (`seglayouts`); imported from there, not from this package.
"""
from ..errors import DatasetNotFoundError
from ..vocab import DATASETS
from .batch import (IndexedDataset, _match_channels, _resize, collate, collate_indexed, dataset_mean_std,
                    to_student, to_teacher, to_unit)
from .decode import ALPHA_BACKGROUND, decode_image, fit, to_8bit
from .filelist import FileList, read_file_list, split_csv
from .fingerprint import base_dataset, data_fingerprint, file_record
from .fmnist import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FashionMNIST, read_idx
from .folder import IMAGE_EXTENSIONS, ImageFolder, list_images, split_folder
from .hf import HFImages, load_hf_split
from .images import DecodedImages
from .sources import build_dataset
from .subsets import dataset_labels, label_subset, stratified_indices

__all__ = [
    "ALPHA_BACKGROUND", "DATASETS", "DatasetNotFoundError", "DecodedImages", "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR", "FashionMNIST", "FileList", "HFImages", "IMAGE_EXTENSIONS", "ImageFolder", "IndexedDataset",
    "base_dataset", "build_dataset", "collate", "collate_indexed", "data_fingerprint", "dataset_labels",
    "dataset_mean_std", "decode_image", "file_record", "fit", "label_subset", "list_images", "load_hf_split",
    "read_file_list", "read_idx", "split_csv", "split_folder", "stratified_indices", "to_8bit", "to_student",
    "to_teacher", "to_unit",
]
