"""The CheXpert CSV format: columns, the 14 findings and the label cell values."""

from __future__ import annotations

DATASET_FOLDER = "CheXpert-v1.0-small"  # CSV paths start with this folder's name
META_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
COLUMNS = META_COLUMNS + LABELS
# the five findings of the CheXpert competition
COMPETITION_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0  # a blank cell: not mentioned
FINDINGS_FILE = "findings.csv"  # boxes of the planted findings, beside the CSVs of the embedded data set
