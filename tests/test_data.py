"""The data pipeline: CheXpert CSV reading, uncertainty policies, splits, Dataset, images, transforms."""

import csv
import io
import math
import pickle

import numpy as np
import pydicom
import pydicom.data
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from torch._utils import ExceptionWrapper
from torch.utils.data import DataLoader

from mxa_bench.csv_read import chexpert_like_csv
from mxa_model import cli
from mxa_model.data.chexpert import (CheXpertDataset, DataFormatError, UncertaintyPolicy, filter_views,
                                     find_data_dir, patient_split, read_csv, resolve_path, write_csv)
from mxa_model.data.images import ImageReadError, load_image
from mxa_model.data.labels import COLUMNS, DATASET_FOLDER, LABELS
from mxa_model.data.transforms import eval_transform, train_transform

FOLDER = DATASET_FOLDER


def cells(patient=1, study=1, view="Frontal", projection="AP", labels=None, sex="Female", age="68", name=None):
    """One CSV row; ``labels`` maps label names to cells (default blank)."""
    name = name or f"view1_{view.lower()}.jpg"
    path = f"{FOLDER}/train/patient{patient:05d}/study{study}/{name}"
    labels = labels or {}
    return [path, sex, age, view, projection] + [labels.get(label, "") for label in LABELS]


def write_rows(path, rows, header=COLUMNS):
    path.write_text("\n".join(",".join(row) for row in [list(header), *rows]) + "\n")
    return path


def jpeg_bytes(size=(24, 20), value=128):
    buffer = io.BytesIO()
    Image.new("L", size, value).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def data_dir(tmp_path):
    """A CheXpert-like folder: 6 patients, frontal and lateral views, every image a small JPEG."""
    root = tmp_path / FOLDER
    rows = []
    for patient in range(1, 7):
        findings = {"Cardiomegaly": "-1.0", "Edema": "1.0", "Atelectasis": "0.0"}
        labels = findings if patient % 2 else {"No Finding": "1.0"}
        rows.append(cells(patient, view="Frontal", projection="AP" if patient < 4 else "PA", labels=labels))
        rows.append(cells(patient, view="Lateral", projection="", labels=labels))
    root.mkdir()
    write_rows(root / "train.csv", rows)
    for row in rows:
        image = tmp_path / row[0]
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(jpeg_bytes(value=40 * int(row[0].split("patient")[1][:5])))
    return root


# -- CSV -------------------------------------------------------------------------------------------


def test_label_cells_of_every_kind(tmp_path):
    values = {"No Finding": "1.0", "Cardiomegaly": "0.0", "Edema": "-1.0", "Consolidation": "",
              "Atelectasis": "1", "Pneumonia": "0", "Fracture": "-1", "Lung Opacity": " 1.0 "}
    csv_path = write_rows(tmp_path / "train.csv", [cells(labels=values)])
    (record,) = read_csv(csv_path).records
    got = dict(zip(LABELS, record.labels))
    assert got["No Finding"] == 1.0 and got["Atelectasis"] == 1.0 and got["Lung Opacity"] == 1.0
    assert got["Cardiomegaly"] == 0.0 and got["Pneumonia"] == 0.0
    assert got["Edema"] == -1.0 and got["Fracture"] == -1.0
    assert math.isnan(got["Consolidation"]) and math.isnan(got["Support Devices"])


def test_record_fields(tmp_path):
    root = tmp_path / FOLDER
    root.mkdir()
    csv_path = write_rows(root / "train.csv", [cells(7, 2, "Lateral", "", sex="Male", age=""),
                                               cells(8, 1, "Frontal", "PA", age="55")])
    records, skipped = read_csv(csv_path)
    assert skipped == []
    first, second = records
    assert first.path == root / "train/patient00007/study2/view1_lateral.jpg"
    assert first.csv_path == f"{FOLDER}/train/patient00007/study2/view1_lateral.jpg"
    assert (first.patient, first.study, first.sex, first.age, first.view, first.projection, first.row) == (
        "patient00007", "study2", "Male", None, "Lateral", "", 2)
    assert (second.age, second.view, second.projection, second.row) == (55, "Frontal", "PA", 3)


def test_resolve_path(tmp_path):
    root = tmp_path / "data" / FOLDER
    assert resolve_path(f"{FOLDER}/train/p/s/a.jpg", root) == root / "train/p/s/a.jpg"
    renamed = tmp_path / "chexpert"
    assert resolve_path(f"{FOLDER}/train/a.jpg", renamed) == renamed / "train/a.jpg"
    assert resolve_path("chexpert/valid/a.jpg", renamed) == renamed / "valid/a.jpg"
    assert resolve_path("Other/train/a.jpg", root) == root.parent / "Other/train/a.jpg"
    for cell in ("../secret/a.jpg", f"{FOLDER}/../../a.jpg", "/etc/passwd", "C:\\data\\a.jpg", "a\\..\\..\\b.jpg"):
        with pytest.raises(ValueError, match="escapes the data folder"):
            resolve_path(cell, root)


def test_absolute_and_backslash_paths_inside_the_data_folder(tmp_path):
    root = tmp_path / FOLDER
    root.mkdir()
    inside = root / "train/patient00001/study1/view1_frontal.jpg"
    assert resolve_path(str(inside), root) == inside
    link = tmp_path / "link"
    link.symlink_to(root)
    assert resolve_path(str(inside), link) == inside  # the folder given through a link, the CSV naming its target
    assert resolve_path(f"{FOLDER}\\train\\patient00001\\study1\\view1_frontal.jpg", root) == inside
    for cell in (str(tmp_path / "Other/a.jpg"), f"{root}/../{FOLDER}/a.jpg", "..\\a.jpg"):
        with pytest.raises(ValueError, match="escapes the data folder"):
            resolve_path(cell, root)
    absolute, windows = cells(1), cells(2)
    absolute[0] = str(inside)
    windows[0] = windows[0].replace("/", "\\")
    records = read_csv(write_rows(root / "train.csv", [absolute, windows])).records
    assert [(r.path, r.patient, r.study, r.csv_path) for r in records] == [
        (inside, "patient00001", "study1", absolute[0]),
        (root / "train/patient00002/study1/view1_frontal.jpg", "patient00002", "study1", windows[0])]


def test_read_csv_matches_an_independent_parse(tmp_path):
    root = tmp_path / FOLDER
    root.mkdir()
    csv_path = chexpert_like_csv(root / "train.csv", 300, seed=1)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    records = read_csv(csv_path).records
    assert len(records) == len(rows) == 300
    for record, row in zip(records, rows):
        _, split, patient, study, name = row["Path"].split("/")
        assert (record.path, record.csv_path, record.patient, record.study, record.sex, record.age, record.view,
                record.projection) == (root / split / patient / study / name, row["Path"], patient, study, row["Sex"],
                                       int(row["Age"]) if row["Age"] else None, row["Frontal/Lateral"], row["AP/PA"])
    label_cells = np.array([[row[label] for label in LABELS] for row in rows])
    values = {"": math.nan, "1.0": 1.0, "0.0": 0.0, "-1.0": -1.0}
    np.testing.assert_array_equal([r.labels for r in records], np.vectorize(values.get)(label_cells))  # NaN = NaN
    # the targets and masks of every policy that draws nothing, from the cells
    for name in ("ignore", "zeros", "ones"):
        for blank in ("zeros", "ignore"):
            policy = UncertaintyPolicy.parse(name, blank=blank)
            target, mask = CheXpertDataset(None, records=records, views=None, policy=policy).targets()
            uncertain, left_out = label_cells == "-1.0", label_cells == ""
            want_target = (label_cells == "1.0") | (uncertain & (name == "ones"))
            want_mask = ~((uncertain & (name == "ignore")) | (left_out & (blank == "ignore")))
            assert torch.equal(target, torch.from_numpy(want_target).float()), (name, blank)
            assert torch.equal(mask, torch.from_numpy(want_mask).float()), (name, blank)


def test_data_folder_may_be_the_folder_holding_it(tmp_path):
    inner = tmp_path / FOLDER
    inner.mkdir()
    for split in ("train", "valid"):
        write_rows(inner / f"{split}.csv", [cells()])
    assert find_data_dir(tmp_path) == inner and find_data_dir(inner) == inner
    assert find_data_dir(tmp_path, ["valid"]) == inner
    mine = write_rows(tmp_path / "mine.csv", [cells()])
    assert find_data_dir(inner, [mine]) == inner
    assert find_data_dir(tmp_path, [mine]) == inner  # its paths start with the data set folder's name
    with pytest.raises(FileNotFoundError, match=r"nothing\.csv: no such CSV file"):
        find_data_dir(inner, [tmp_path / "nothing.csv"])
    with pytest.raises(FileNotFoundError, match=rf"^{tmp_path / 'nowhere'}: no such folder; "):
        find_data_dir(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=rf"^{mine}: not a folder; "):
        find_data_dir(mine)


def test_train_checks_both_csvs_before_parsing_or_making_its_output(tmp_path, capsys):
    output = tmp_path / "run"
    unrelated = tmp_path / "datasets"
    unrelated.mkdir()
    inner = tmp_path / "above" / FOLDER
    inner.mkdir(parents=True)
    (inner / "train.csv").write_bytes(b"\xff\xfe not a CSV")  # parsing it fails: the checks come first
    expected = (f"the data folder (--data) must be the {FOLDER} folder holding train.csv and valid.csv, "
                "or the folder holding it")
    for data, culprit in ((unrelated, f"{unrelated}: no train.csv or valid.csv there"),
                          (inner.parent, f"{inner}: no valid.csv there")):
        assert cli.main(["train", "--data", str(data), "--output", str(output), "--quiet"]) == 1
        assert capsys.readouterr().err == f"mxa: error: {culprit}; {expected}\n"
        assert not output.exists()
    write_rows(inner / "valid.csv", [cells()])
    assert cli.main(["train", "--data", str(inner.parent), "--output", str(output), "--quiet"]) == 1
    printed = capsys.readouterr()
    assert f"using {inner}, the {FOLDER} folder inside --data {inner.parent}\n" in printed.out
    assert f"{inner / 'train.csv'}: row " in printed.err and "unreadable CSV" in printed.err


def test_eval_checks_its_split_csv_before_loading_anything(tmp_path, capsys):
    inner = tmp_path / FOLDER
    inner.mkdir()
    write_rows(inner / "train.csv", [cells()])
    checkpoint = tmp_path / "none.pt"  # missing too: the data is checked first
    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--data", str(tmp_path), "--split", "valid"]) == 1
    assert f"{inner}: no valid.csv there" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--data", str(tmp_path), "--split", "train"]) == 1
    printed = capsys.readouterr()
    assert f"using {inner}" in printed.out and str(checkpoint) in printed.err


def test_path_escaping_is_a_row_error(tmp_path):
    row = cells()
    row[0] = "../patient00001/study1/view1_frontal.jpg"
    csv_path = write_rows(tmp_path / "train.csv", [cells(), row])
    with pytest.raises(DataFormatError, match=r"train\.csv: row 3: path '\.\./patient00001.*escapes the data folder"):
        read_csv(csv_path)


def test_missing_columns(tmp_path):
    header = [c for c in COLUMNS if c not in ("Edema", "AP/PA")]
    csv_path = write_rows(tmp_path / "broken.csv", [], header=header)
    with pytest.raises(DataFormatError) as info:
        read_csv(csv_path)
    message = str(info.value)
    assert "\n" not in message and str(csv_path) in message
    assert "missing column(s): AP/PA, Edema" in message
    assert info.value.row is None
    again = pickle.loads(pickle.dumps(info.value))
    assert (again.path, again.row, again.reason, str(again)) == (csv_path, None, info.value.reason, message)
    assert str(DataFormatError("a whole message")) == "a whole message"  # how DataLoader re-raises it


@pytest.mark.parametrize("edit, culprit", [
    (lambda row: row.__setitem__(5 + LABELS.index("Edema"), "2.0"), "Edema value '2.0'"),
    (lambda row: row.__setitem__(5 + LABELS.index("Fracture"), "yes"), "Fracture value 'yes'"),
    (lambda row: row.__setitem__(5, "nan"), "No Finding value 'nan'"),
    (lambda row: row.append("extra"), "20 cells where the header has 19"),
    (lambda row: row.pop(), "18 cells where the header has 19"),
    (lambda row: row.__setitem__(3, "Oblique"), "Frontal/Lateral value 'Oblique'"),
    (lambda row: row.__setitem__(4, "XY"), "AP/PA value 'XY'"),
    (lambda row: row.__setitem__(2, "old"), "Age value 'old'"),
    (lambda row: row.__setitem__(0, "CheXpert-v1.0-small/train/view1_frontal.jpg"), "no patientN/studyN"),
])
def test_malformed_row_names_file_row_and_culprit(tmp_path, edit, culprit):
    bad = cells(2)
    edit(bad)
    csv_path = write_rows(tmp_path / "train.csv", [cells(1), bad, cells(3)])
    with pytest.raises(DataFormatError) as info:
        read_csv(csv_path)
    assert str(info.value).startswith(f"{csv_path}: row 3: ")
    assert culprit in str(info.value) and "\n" not in str(info.value)
    assert info.value.row == 3


def test_skip_mode_counts_and_keeps_the_rest(tmp_path):
    bad_label, bad_view = cells(2), cells(4)
    bad_label[5 + LABELS.index("Edema")] = "yes"
    bad_view[3] = "Side"
    csv_path = write_rows(tmp_path / "train.csv", [cells(1), bad_label, cells(3), bad_view, cells(5)])
    records, skipped = read_csv(csv_path, on_error="skip")
    assert [r.patient for r in records] == ["patient00001", "patient00003", "patient00005"]
    assert [(e.row, e.path) for e in skipped] == [(3, csv_path), (5, csv_path)]
    with pytest.raises(ValueError, match="unknown on_error 'ignore'"):
        read_csv(csv_path, on_error="ignore")


def test_blank_lines_and_empty_file(tmp_path):
    csv_path = tmp_path / "train.csv"
    csv_path.write_text(",".join(COLUMNS) + "\n\n" + ",".join(cells(1)) + "\n\n")
    assert len(read_csv(csv_path).records) == 1
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataFormatError, match="empty.csv: empty file"):
        read_csv(empty)


def test_write_csv_round_trip(tmp_path):
    values = {"No Finding": "1.0", "Edema": "-1.0", "Cardiomegaly": "0.0"}
    records = read_csv(write_rows(tmp_path / "a.csv", [cells(1, labels=values), cells(2, age="")])).records
    write_csv(tmp_path / "b.csv", records)
    again = read_csv(tmp_path / "b.csv").records
    strip = [(r.path, r.csv_path, r.patient, r.age, r.view, r.projection, str(r.labels)) for r in records]
    assert strip == [(r.path, r.csv_path, r.patient, r.age, r.view, r.projection, str(r.labels)) for r in again]


# -- uncertainty policies --------------------------------------------------------------------------

U, B = -1.0, math.nan
RAW = np.array([1.0, 0.0, U, B] + [U] * 10, dtype=np.float32)  # positive, negative, uncertain, blank, ...


def test_policy_ignore_zeros_ones():
    for name, value, weight in (("ignore", 0.0, 0.0), ("zeros", 0.0, 1.0), ("ones", 1.0, 1.0)):
        target, mask = UncertaintyPolicy.parse(name).targets(RAW)
        assert target.dtype == np.float32 and mask.dtype == np.float32
        assert target[:4].tolist() == [1.0, 0.0, value, 0.0]  # a blank cell is a negative...
        assert mask[:4].tolist() == [1.0, 1.0, weight, 1.0]  # ...that counts in the loss
        assert (target[4:] == value).all() and (mask[4:] == weight).all()


def test_policy_blank_ignore():
    target, mask = UncertaintyPolicy.parse("ones", blank="ignore").targets(RAW)
    assert target[3] == 0.0 and mask[3] == 0.0 and mask[2] == 1.0
    with pytest.raises(ValueError, match="unknown blank-cell policy 'ones'"):
        UncertaintyPolicy.parse("ones", blank="ones")


def test_policy_smoothing_ranges_and_determinism():
    policy = UncertaintyPolicy.parse("smooth-ones,Cardiomegaly=smooth-zeros")
    assert policy.smoothing
    raw = np.full((200, len(LABELS)), U, dtype=np.float32)
    target, mask = policy.targets(raw, np.random.default_rng(0))
    zeros = target[:, LABELS.index("Cardiomegaly")]
    ones = np.delete(target, LABELS.index("Cardiomegaly"), axis=1)
    assert (zeros >= 0.0).all() and (zeros <= 0.3).all() and zeros.std() > 0.05
    assert (ones >= 0.55).all() and (ones <= 0.85).all() and ones.std() > 0.05
    assert (mask == 1).all()
    again, _ = policy.targets(raw, np.random.default_rng(0))
    assert np.array_equal(target, again)
    certain, _ = policy.targets(np.ones_like(raw), np.random.default_rng(0))
    assert (certain == 1.0).all()  # smoothing touches uncertain cells only


def test_policy_overrides_and_parse_forms():
    policy = UncertaintyPolicy.parse("ones,Cardiomegaly=zeros,edema=smooth-ones")
    assert dict(zip(LABELS, policy.policies)) == {**dict.fromkeys(LABELS, "ones"),
                                                   "Cardiomegaly": "zeros", "Edema": "smooth-ones"}
    assert UncertaintyPolicy.parse("ones", overrides={"Cardiomegaly": "zeros", "Edema": "smooth-ones"}) == policy
    assert UncertaintyPolicy.parse(str(policy)) == policy
    assert UncertaintyPolicy.parse("Atelectasis=ignore").policies[LABELS.index("Pneumonia")] == "ones"
    assert UncertaintyPolicy() == UncertaintyPolicy.parse("ones")
    target, mask = policy.targets(np.full(len(LABELS), U, dtype=np.float32), np.random.default_rng(1))
    assert target[LABELS.index("Cardiomegaly")] == 0.0 and target[LABELS.index("Atelectasis")] == 1.0
    assert 0.55 <= target[LABELS.index("Edema")] <= 0.85


@pytest.mark.parametrize("spec, overrides, message", [
    ("onez", None, "unknown uncertainty policy 'onez'"),
    ("ones,Edema=maybe", None, "unknown uncertainty policy 'maybe'"),
    ("ones,Heart=zeros", None, "unknown label 'Heart'"),
    ("ones", {"Lungs": "zeros"}, "unknown label 'Lungs'"),
    ("ones,zeros", None, "two default uncertainty policies"),
])
def test_policy_errors(spec, overrides, message):
    with pytest.raises(ValueError, match=message):
        UncertaintyPolicy.parse(spec, overrides)


# -- selections ------------------------------------------------------------------------------------


def test_filter_views(data_dir):
    records = read_csv(data_dir / "train.csv").records
    assert {r.view for r in filter_views(records)} == {"Frontal"} and len(filter_views(records)) == 6
    assert {r.view for r in filter_views(records, "lateral")} == {"Lateral"}
    assert len(filter_views(records, None)) == 12
    assert len(filter_views(records, ("Frontal", "Lateral"))) == 12
    assert [r.projection for r in filter_views(records, projections=["pa"])] == ["PA"] * 3
    assert filter_views(records, "lateral", projections=("AP", "PA")) == []
    with pytest.raises(ValueError, match="unknown view 'oblique'"):
        filter_views(records, ("oblique",))
    with pytest.raises(ValueError, match="unknown projection 'XY'"):
        filter_views(records, projections=("XY",))


def test_patient_split(tmp_path):
    rows = [cells(p, s, view) for p in range(1, 21) for s in (1, 2) for view in ("Frontal", "Lateral")]
    records = read_csv(write_rows(tmp_path / "train.csv", rows)).records
    train, valid = patient_split(records, 0.25, seed=3)
    assert {r.patient for r in train}.isdisjoint({r.patient for r in valid})
    assert len({r.patient for r in valid}) == 5 and len(train) + len(valid) == len(records)
    assert [r.row for r in train] == sorted(r.row for r in train)  # the records' order is kept
    assert patient_split(records, 0.25, seed=3) == (train, valid)
    assert patient_split(records[::-1], 0.25, seed=3)[1] == valid[::-1]  # the same patients
    assert {r.patient for r in patient_split(records, 0.25, seed=4)[1]} != {r.patient for r in valid}
    assert len({r.patient for r in patient_split(records, 0.001)[1]}) == 1  # never an empty side...
    assert patient_split(records, 0.0) == (records, [])  # ...unless asked
    with pytest.raises(ValueError, match="valid_fraction 1.5"):
        patient_split(records, 1.5)


# -- Dataset ---------------------------------------------------------------------------------------


def test_dataset_items(data_dir):
    dataset = CheXpertDataset(data_dir, "train", transform=eval_transform(16))
    assert len(dataset) == 6 and dataset.labels == LABELS and dataset.csv_path == data_dir / "train.csv"
    image, target, mask, index = dataset[0]
    assert image.shape == (1, 16, 16) and image.dtype == torch.uint8
    assert target.shape == mask.shape == (len(LABELS),) and target.dtype == mask.dtype == torch.float32
    assert index == 0 and dataset[-1][3] == 5
    # patient 1: Cardiomegaly uncertain (U-Ones by default), Edema positive, Atelectasis negative, others blank
    assert target[LABELS.index("Cardiomegaly")] == 1 and target[LABELS.index("Edema")] == 1
    assert target.sum() == 2 and (mask == 1).all()
    assert (image.int() - 40).abs().max() <= 3  # the file's grey level, through JPEG and the resize
    ignore = CheXpertDataset(data_dir, "train", "ignore", views=None)
    assert len(ignore) == 12 and ignore.target(0)[1][LABELS.index("Cardiomegaly")] == 0
    raw = ignore.label_matrix()
    assert raw.shape == (12, len(LABELS)) and raw[0, LABELS.index("Cardiomegaly")] == -1 and raw[0, 0].isnan()
    with pytest.raises(IndexError):
        dataset[6]


def test_dataset_from_records_and_smoothing_per_epoch(data_dir):
    records = read_csv(data_dir / "train.csv").records
    policy = UncertaintyPolicy.parse("smooth-ones")
    dataset = CheXpertDataset(None, records=records, policy=policy, views=None)
    assert dataset.csv_path is None and len(dataset) == 12
    cardio = LABELS.index("Cardiomegaly")
    first = dataset.target(0)[0][cardio].item()
    assert 0.55 <= first <= 0.85 and dataset.target(0)[0][cardio].item() == first  # reproducible
    assert dataset.target(2)[0][cardio].item() != first  # another sample, another draw
    dataset.set_epoch(1)
    assert dataset.target(0)[0][cardio].item() != first  # another epoch, another draw
    dataset.set_epoch(0)
    assert dataset.target(0)[0][cardio].item() == first
    targets, masks = dataset.targets()
    assert torch.equal(targets[2], dataset.target(2)[0]) and masks.shape == (12, len(LABELS))
    plain = CheXpertDataset(None, records=records, views=None)
    assert torch.equal(plain.targets()[0][5], plain.target(5)[0])


def test_missing_and_truncated_images(data_dir):
    dataset = CheXpertDataset(data_dir, "train")
    missing, truncated = dataset.records[1].path, dataset.records[2].path
    missing.unlink()
    truncated.write_bytes(jpeg_bytes()[:200])
    with pytest.raises(ImageReadError, match=rf"{missing}: No such file.*\(.*train\.csv row 4\)"):
        dataset[1]
    with pytest.raises(ImageReadError, match=rf"(?i){truncated}: cannot read image: .*truncated.*train\.csv row 6"):
        dataset[2]
    with pytest.raises(ImageReadError, match="row 4"):
        CheXpertDataset(data_dir, "train", image_check=True)
    checked = CheXpertDataset(data_dir, "train", image_check=True, on_error="skip")
    assert len(checked) == 4 and [e.path for e in checked.skipped] == [missing, truncated]


def test_dataset_skip_mode_counts_bad_rows(data_dir):
    lines = (data_dir / "train.csv").read_text().splitlines()
    lines[1] = lines[1].replace("-1.0", "maybe")
    (data_dir / "bad.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match="bad.csv: row 2: Cardiomegaly value 'maybe'"):
        CheXpertDataset(data_dir, data_dir / "bad.csv")
    dataset = CheXpertDataset(data_dir, data_dir / "bad.csv", on_error="skip")
    assert len(dataset) == 5 and [e.row for e in dataset.skipped] == [2]


def test_dataloader_with_workers(data_dir):
    dataset = CheXpertDataset(data_dir, "train", policy=UncertaintyPolicy.parse("smooth-ones"),
                              transform=train_transform(16), views=None)
    assert len(pickle.loads(pickle.dumps(dataset))) == 12  # what spawned workers receive
    loader = DataLoader(dataset, batch_size=4, num_workers=2)
    batches = list(loader)
    assert len(batches) == 3
    images, targets, masks, indices = batches[0]
    assert images.shape == (4, 1, 16, 16) and targets.shape == masks.shape == (4, len(LABELS))
    assert indices.tolist() == [0, 1, 2, 3]
    assert torch.equal(torch.cat([b[1] for b in batches]), dataset.targets()[0])  # the same draws in workers
    # A worker's error reaches the main process as an ExceptionWrapper, re-raised as type(error)(message):
    # ImageReadError survives that. (Checked here without workers: after a worker's error, torch takes
    # about 5 s per worker to shut them down.)
    dataset.records[5].path.unlink()
    try:
        dataset[5]
    except ImageReadError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(ImageReadError, match=r"(?s)worker process 0.*view1_lateral.jpg: No such file.*row 7"):
        wrapped.reraise()


# -- images ----------------------------------------------------------------------------------------


def test_load_png_8_and_16_bit_and_rgb(tmp_path):
    gray = np.array([[0, 255], [51, 102]], dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    loaded = load_image(tmp_path / "g.png")
    assert loaded.shape == (1, 2, 2) and loaded.dtype == torch.uint8
    assert torch.equal(loaded[0], torch.from_numpy(gray))
    deep = np.array([[0, 65535], [1000, 30000]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    # 16 bits rounded to the nearest of 256 levels: 1000 / 65535 * 255 = 3.89, 30000 / 65535 * 255 = 116.7
    assert load_image(tmp_path / "d.png")[0].tolist() == [[0, 255], [4, 117]]
    Image.new("RGB", (3, 2), (255, 255, 255)).save(tmp_path / "c.png")
    assert torch.equal(load_image(tmp_path / "c.png"), torch.full((1, 2, 3), 255, dtype=torch.uint8))
    Image.new("RGB", (3, 2), (10, 200, 30)).save(tmp_path / "c.jpg", quality=100)
    jpeg = load_image(tmp_path / "c.jpg")  # colour JPEG: luminance, 0.299 R + 0.587 G + 0.114 B = 123.8
    assert jpeg.shape == (1, 2, 3) and (jpeg.int() - 124).abs().max() <= 2


def test_unreadable_images(tmp_path):
    with pytest.raises(ImageReadError, match="nothing.jpg: No such file"):
        load_image(tmp_path / "nothing.jpg")
    (tmp_path / "noise.jpg").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(ImageReadError, match="noise.jpg: cannot read image") as info:
        load_image(tmp_path / "noise.jpg")
    assert isinstance(info.value, OSError) and isinstance(info.value, ValueError)
    (tmp_path / "cut.jpg").write_bytes(jpeg_bytes((64, 64))[:300])
    with pytest.raises(ImageReadError, match="(?i)cut.jpg: .*truncated"):
        load_image(tmp_path / "cut.jpg")
    error = pickle.loads(pickle.dumps(ImageReadError(tmp_path / "x.png", "bad")))
    assert (error.path, error.reason, str(error)) == (tmp_path / "x.png", "bad", f"{tmp_path / 'x.png'}: bad")


RADIOGRAPH = pydicom.data.get_testdata_file("RG1_UNCR.dcm", download=False)  # MONOCHROME1, 15 bits, a window


def linear_window(values, center, width):
    """The DICOM LINEAR window function (PS3.3 C.11.2.1.2.1) onto [0, 1], written out here."""
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def test_load_dicom_radiograph_monochrome1():
    raw = pydicom.dcmread(RADIOGRAPH).pixel_array.astype(np.float64)
    image = load_image(RADIOGRAPH)
    assert image.shape == (1, 1955, 1841) and image.dtype == torch.uint8
    # the file's window (center 15000, width 30000), then MONOCHROME1's inversion, to the nearest of 256
    # levels (a value at a half level may round either way)
    expected = np.rint(255 * (1.0 - linear_window(raw, 15000, 30000)))
    np.testing.assert_allclose(image[0].numpy(), expected, atol=1)
    image = image.float() / 255
    # as on any chest film, the lungs are dark and the spine and mediastinum bright
    h, w = image.shape[1:]
    chest = image[0, int(0.2 * h):int(0.7 * h)]
    left, centre, right = (chest[:, int(a * w):int(b * w)].mean() for a, b in ((0.1, 0.3), (0.4, 0.6), (0.7, 0.9)))
    assert centre > left + 0.05 and centre > right + 0.05


def write_dicom(path, pixels, photometric="MONOCHROME2", bits_stored=12, pixel_data=True, **elements):
    """A minimal single-frame grayscale DICOM file."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = DicomDataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    if pixel_data:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    for name, value in elements.items():
        setattr(ds, name, value)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_window_saturates_outside_it(tmp_path, photometric):
    raw = pydicom.dcmread(RADIOGRAPH).pixel_array[::8, ::8]  # the radiograph's values, at a fast size
    center, width = int(np.median(raw)), 2000
    path = write_dicom(tmp_path / "narrow.dcm", raw, photometric, bits_stored=15, WindowCenter=center,
                       WindowWidth=width)
    image = load_image(path)[0].numpy().astype(np.float64) / 255
    below, above = raw <= center - 1000, raw > center + 1000
    assert below.mean() > 0.2 and above.mean() > 0.2  # a narrow window: many pixels lie outside it
    expected = linear_window(raw.astype(np.float64), center, width)
    dark, bright = 0.0, 1.0
    if photometric == "MONOCHROME1":  # inverted over the window's output range
        expected, dark, bright = 1.0 - expected, 1.0, 0.0
    assert (image[below] == dark).all() and (image[above] == bright).all()
    np.testing.assert_allclose(image, np.rint(expected * 255) / 255, atol=1 / 255 + 1e-9)


def test_load_synthetic_dicom(tmp_path, monkeypatch):
    pixels = np.array([[0, 4095, 1000], [2000, 3000, 17]], dtype=np.uint16)
    levels = pixels / 4095.0 * 255  # [0, 255, 63.3, 124.5, 186.8, 1.06]: none at a half level
    expected = torch.tensor(np.rint(levels), dtype=torch.uint8)[None]
    assert torch.equal(load_image(write_dicom(tmp_path / "a.dcm", pixels)), expected)
    # found by its DICM magic, whatever the name; a negative rescale slope inverts
    inverted = torch.tensor(np.rint(255 - levels), dtype=torch.uint8)[None]
    assert torch.equal(load_image(write_dicom(tmp_path / "b.img", pixels, RescaleSlope=-1, RescaleIntercept=4095)),
                       inverted)
    # empty rescale elements: no rescale
    assert torch.equal(load_image(write_dicom(tmp_path / "c.dcm", pixels, RescaleSlope=None, RescaleIntercept=None)),
                       expected)
    # values beyond BitsStored (which pydicom 2 leaves as stored): scaled by the image's own range
    monkeypatch.setattr(DicomDataset, "pixel_array", property(lambda ds: pixels.astype(np.int32) * 8 - 100))
    assert torch.equal(load_image(tmp_path / "a.dcm"), expected)
    monkeypatch.undo()
    with pytest.raises(ImageReadError, match="d.dcm: DICOM file has no pixel data"):
        load_image(write_dicom(tmp_path / "d.dcm", pixels, pixel_data=False))
    (tmp_path / "e.dcm").write_bytes(b"plain text, not DICOM")
    with pytest.raises(ImageReadError, match="e.dcm: cannot read DICOM: InvalidDicomError: .*'DICM' prefix is missing"):
        load_image(tmp_path / "e.dcm")
    cut = write_dicom(tmp_path / "f.dcm", pixels)
    cut.write_bytes(cut.read_bytes()[:-5])
    with pytest.raises(ImageReadError, match="f.dcm: cannot read DICOM: "):
        load_image(cut)


# -- transforms ------------------------------------------------------------------------------------


def test_eval_transform_keeps_the_aspect_ratio():
    image = torch.zeros(1, 390, 320, dtype=torch.uint8)  # CheXpert's shape: 320 wide, 390 high
    image[:, 115:275, 80:240] = 255  # a 160-pixel square at the centre
    out = eval_transform(64)(image)[0]
    rows, columns = (out > 127).nonzero(as_tuple=True)
    # the centre 320 x 320 at 1/5 scale: a 32-pixel square, still centred
    assert out.shape == (64, 64)
    assert (rows.min(), rows.max(), columns.min(), columns.max()) == (16, 47, 16, 47)


def test_the_training_crop_is_a_function_of_seed_epoch_and_index(small_data):
    """A sample's crop depends on (seed, epoch, index) only: the same in every draw, another in another
    epoch; a flat image stays flat through the crops."""
    dataset = CheXpertDataset(small_data, "train", transform=train_transform(12), views=None, seed=3)
    assert torch.equal(dataset[(0, 4)][0], dataset[(0, 4)][0])
    assert any(not torch.equal(dataset[(0, i)][0], dataset[(1, i)][0]) for i in range(len(dataset)))
    dataset.set_epoch(1)
    assert torch.equal(dataset[4][0], dataset[(1, 4)][0])  # an index alone: the dataset's epoch
    flat = torch.full((1, 40, 30), 191, dtype=torch.uint8)
    for transform in (train_transform(8), eval_transform(8)):
        assert torch.equal(transform(flat, torch.Generator()), torch.full((1, 8, 8), 191, dtype=torch.uint8))
