"""CheXpert-format data: CSV reading with uncertainty policies, image loading (JPEG, PNG, DICOM) as uint8,
the loader workers' crops (:mod:`~mxa_model.data.transforms`), the batched augmentations on the device
(:mod:`~mxa_model.data.augment`), the run's loaders (:mod:`~mxa_model.data.loader`), the decoded cache
(:mod:`~mxa_model.data.cache`), and the embedded synthetic data set (:mod:`mxa_model.data.synth`)."""

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
from .augment import BatchAugment
from .transforms import eval_transform, normalize, train_transform

__all__ = [
    "BatchAugment", "COMPETITION_LABELS", "CheXpertDataset", "DATASET_FOLDER", "DataFormatError",
    "ImageReadError", "LABELS", "Record", "UncertaintyPolicy", "eval_transform", "filter_views", "load_image",
    "normalize", "patient_split", "read_csv", "train_transform",
]
