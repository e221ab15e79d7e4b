"""CheXpert-format data: CSV reading with uncertainty policies, image loading (JPEG, PNG, DICOM),
augmentations, and the embedded synthetic data set (:mod:`mxa_model.data.synth`)."""

from .chexpert import (
    CheXpertDataset,
    DataFormatError,
    Record,
    UncertaintyPolicy,
    filter_views,
    patient_split,
    read_csv,
)
from .images import ImageReadError, load_image
from .labels import COMPETITION_LABELS, DATASET_FOLDER, LABELS
from .transforms import eval_transform, train_transform

__all__ = [
    "COMPETITION_LABELS", "CheXpertDataset", "DATASET_FOLDER", "DataFormatError", "ImageReadError", "LABELS",
    "Record", "UncertaintyPolicy", "eval_transform", "filter_views", "load_image", "patient_split", "read_csv",
    "train_transform",
]
