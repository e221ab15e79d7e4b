"""The synthetic CheXpert data set: format, label semantics, determinism and that the findings are drawn."""

import collections
import csv

import numpy as np
import pytest
from PIL import Image

from mxa_model.data.labels import COLUMNS, DATASET_FOLDER, LABELS
from mxa_model.data.synth import _render, generate

SIZE = 64
CELLS = {"1.0", "0.0", "-1.0", ""}
PATHOLOGIES = [label for label in LABELS if label not in ("No Finding", "Support Devices")]


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        return header, [dict(zip(header, row)) for row in reader]


def boxes_by_image(root):
    boxes = collections.defaultdict(list)
    for row in read_csv(root / "findings.csv")[1]:
        boxes[row["Path"]].append((row["Label"], *(int(row[k]) for k in ("x0", "y0", "x1", "y1"))))
    return boxes


def patient(path):
    return path.split("/")[2]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The same small data set three times (twice with 2 workers, once with 1), and with another seed."""
    runs = {}
    for name, seed, workers in (("a", 0, 2), ("b", 0, 2), ("serial", 0, 1), ("other", 1, 2)):
        runs[name] = generate(tmp_path_factory.mktemp(name), n_train=40, n_valid=12, img_size=SIZE, seed=seed,
                              workers=workers, progress=False)
    return runs


@pytest.fixture(scope="module")
def larger(tmp_path_factory):
    """Enough images for every finding to be planted several times."""
    return generate(tmp_path_factory.mktemp("larger"), n_train=240, n_valid=10, img_size=SIZE, progress=False)


def test_returns_the_dataset_folder(small):
    assert small["a"].name == DATASET_FOLDER
    assert {p.name for p in small["a"].iterdir()} == {"train", "valid", "train.csv", "valid.csv", "findings.csv"}


@pytest.mark.parametrize("other, same", [("b", True), ("serial", True), ("other", False)])
def test_deterministic(small, other, same):
    root = small["a"]
    paths = [row["Path"] for row in read_csv(root / "train.csv")[1][:4]]
    for name in ("train.csv", "valid.csv", "findings.csv"):
        assert ((root / name).read_bytes() == (small[other] / name).read_bytes()) == same
    for path in paths if same else paths[:1]:  # patient00001/study1 is there whatever the seed
        assert ((root.parent / path).read_bytes() == (small[other].parent / path).read_bytes()) == same


def test_csv_format(small):
    root = small["a"]
    for split in ("train", "valid"):
        header, rows = read_csv(root / f"{split}.csv")
        assert tuple(header) == COLUMNS
        assert len(rows) == {"train": 40, "valid": 12}[split]
        for row in rows:
            assert row["Path"].startswith(f"{DATASET_FOLDER}/{split}/patient")
            assert row["Path"].endswith("/view1_frontal.jpg")
            image = Image.open(root.parent / row["Path"])
            assert (image.format, image.mode, image.size) == ("JPEG", "L", (SIZE, SIZE))
            assert row["Sex"] in ("Male", "Female") and row["Age"].isdigit()
            assert row["Frontal/Lateral"] == "Frontal" and row["AP/PA"] in ("AP", "PA")
            assert {row[label] for label in LABELS} <= CELLS
            assert row["No Finding"] in ("1.0", "")
            no_finding = not any(row[label] in ("1.0", "-1.0") for label in PATHOLOGIES)
            assert (row["No Finding"] == "1.0") == no_finding


def test_label_cells_like_chexpert(small):
    train = read_csv(small["a"] / "train.csv")[1]
    valid = read_csv(small["a"] / "valid.csv")[1]
    train_cells = collections.Counter(row[label] for row in train for label in LABELS[1:])
    assert train_cells["-1.0"] > 0 and train_cells["0.0"] > 0
    assert train_cells[""] > train_cells["0.0"]  # an absent finding is mostly not mentioned
    assert all(row[label] in ("1.0", "0.0") for row in valid for label in LABELS[1:])


def test_patients(small):
    train = read_csv(small["a"] / "train.csv")[1]
    valid = read_csv(small["a"] / "valid.csv")[1]
    assert not {patient(row["Path"]) for row in train} & {patient(row["Path"]) for row in valid}
    studies = collections.Counter(patient(row["Path"]) for row in train)
    assert max(studies.values()) > 1


def test_findings_boxes(small):
    root = small["a"]
    header, findings = read_csv(root / "findings.csv")
    assert header == ["Path", "Label", "x0", "y0", "x1", "y1"]
    rows = {row["Path"]: row for split in ("train", "valid") for row in read_csv(root / f"{split}.csv")[1]}
    planted = set()
    for box in findings:
        x0, y0, x1, y1 = (int(box[k]) for k in ("x0", "y0", "x1", "y1"))
        assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
        # only present findings are planted: reported positive or uncertain
        assert rows[box["Path"]][box["Label"]] in ("1.0", "-1.0")
        planted.add((box["Path"], box["Label"]))
    positives = {(path, label) for path, row in rows.items() for label in LABELS[1:] if row[label] == "1.0"}
    assert positives and positives <= planted


@pytest.mark.parametrize("label", ["Cardiomegaly", "Pleural Effusion", "Consolidation", "Lung Lesion"])
def test_findings_are_visible(larger, label):
    """Inside a planted finding's box an image is brighter than the same region of the images without
    that finding (each image standardized, so that exposure differences cancel)."""
    rows = read_csv(larger / "train.csv")[1]
    boxes = boxes_by_image(larger)

    def load(row):
        image = np.asarray(Image.open(larger.parent / row["Path"]), np.float32)
        return (image - image.mean()) / image.std()

    with_finding = [(load(row), box) for row in rows for box in boxes[row["Path"]] if box[0] == label]
    without = np.stack([load(row) for row in rows if row[label] in ("0.0", "")][:80])
    assert len(with_finding) >= 5
    differences = [image[y0:y1, x0:x1].mean() - without[:, y0:y1, x0:x1].mean()
                   for image, (_, x0, y0, x1, y1) in with_finding]
    assert np.mean(differences) > 0.05


@pytest.mark.parametrize("label", LABELS[1:])
def test_a_finding_changes_only_its_boxes(label):
    """The same study drawn without and with one finding (the findings draw from their own RNG): the
    images differ only inside the finding's boxes, brighter there (darker for a pneumothorax)."""
    absent = dict.fromkeys(LABELS[1:], False)
    for study in range(3):
        def draw(truth):
            return _render(SIZE, truth, *(np.random.default_rng([study, stream]) for stream in range(3)))

        without, no_boxes = draw(absent)
        image, boxes = draw({**absent, label: True})
        assert not no_boxes and boxes and {box[0] for box in boxes} == {label}
        inside = np.zeros(image.shape, bool)
        for _, (x0, y0, x1, y1) in boxes:
            inside[y0:y1, x0:x1] = True
        difference = image.astype(np.int16) - without
        assert np.abs(difference[~inside]).max() <= 3
        assert (-1 if label == "Pneumothorax" else 1) * difference[inside].mean() > 0.5
