"""A synthetic CheXpert-format data set built on the one real chest radiograph shipped with pydicom-data.

`generate(out_dir)` writes ``out_dir/CheXpert-v1.0-small/`` with ``train.csv`` and ``valid.csv`` (the
CheXpert columns, cells "1.0", "0.0", "-1.0" or blank), JPEGs at
``{train,valid}/patient{N:05d}/study{S}/view1_frontal.jpg`` and ``findings.csv``: one row
``Path, Label, x0, y0, x1, y1`` per planted finding, its box in pixels of the saved image (x1, y1 exclusive).

Labels. Each study first gets a hidden true label vector, with roughly CheXpert's prevalences and
co-occurrences (Support Devices ~50%, Lung Opacity ~45%, Pleural Effusion ~38%, Edema ~25%,
Atelectasis ~15%, Cardiomegaly ~12%, Pneumothorax ~9%, Consolidation ~7%, Enlarged Cardiomediastinum ~5%,
Lung Lesion, Fracture ~4%, Pneumonia ~3%, Pleural Other ~2%; cardiomegaly raises edema, edema raises
effusion, effusion raises atelectasis; Edema, Consolidation, Pneumonia, Atelectasis and Lung Lesion imply
Lung Opacity). The train cells are then "reported" from the truth like the CheXpert labeler: 5-15% of
present findings as uncertain (-1.0), absent findings mostly blank, some explicitly 0.0 (most often
Pneumothorax, Pleural Effusion, Edema, Consolidation) and ~1% as uncertain. Valid cells are the truth,
1.0 or 0.0 (No Finding: 1.0 or blank), like CheXpert's radiologist-labelled valid set. "No Finding" is 1.0 when no pathology
(every label but Support Devices) is positive or uncertain, else blank. A patient has 1-3 studies sharing
the anatomy and the chronic findings (cardiomegaly, widened mediastinum, nodule, apical cap, fracture), so
splits must be patient-wise; valid patients are not in train.

Images. The base radiograph (inverted MONOCHROME1, windowed) gets each true finding painted in its own
anatomical frame, then a random affine (patient and study parts: rotation up to ~5 degrees, scale
0.9-1.1, shift) with a mild elastic warp, then gamma, contrast, brightness, a shading ramp and noise.
Opacities add density (a screen blend towards white, contrast ~0.1-0.3 in the lungs):
- Cardiomegaly: every image has a smooth bright cardiac blob low in the middle, left of the patient;
  when present it is much larger and reaches into the left lung.
- Enlarged Cardiomediastinum: likewise a bright upper mediastinal blob, wider when present.
- Pleural Effusion: basal opacity on one or both sides, denser downwards, its upper border a meniscus
  rising towards the chest wall, hiding the costophrenic angle.
- Consolidation: patchy opacity (smoothed noise in a soft ellipse) in a lung field; Pneumonia: a smaller,
  denser patch; Lung Opacity without a more specific finding: a larger, fainter patch.
- Edema: bilateral perihilar haze with a fine interstitial texture.
- Atelectasis: one or two thin plate-like opacities above a lung base.
- Lung Lesion: a round, fairly sharp nodule (sometimes a mass).
- Pneumothorax: a band along the apex and lateral wall of one lung blurred (no lung markings) and
  darkened, with a thin bright visceral pleural line at its inner edge.
- Pleural Other: an apical pleural cap, a thin bright crescent at a lung apex.
- Fracture: a short bright rib cortex line broken by a gap, the fragments slightly offset.
- Support Devices: an endotracheal tube, a central venous line, a nasogastric tube and/or ECG electrodes.
findings.csv boxes follow the deformation; a Lung Opacity also gets the boxes of its specific findings.
Each image is drawn from RNGs seeded by (seed, image index) and its patient's by (seed, patient), so
the output is byte-identical for a seed whatever the number of workers.
"""

from __future__ import annotations

import csv
import functools
import os
import pathlib
from multiprocessing import Pool

import numpy as np
import pydicom
from PIL import Image, ImageDraw
from pydicom.data import get_testdata_file
from scipy import ndimage
from tqdm import tqdm

from mxa_model.data.labels import COLUMNS, DATASET_FOLDER, FINDINGS_FILE, LABELS

FINDINGS_COLUMNS = ("Path", "Label", "x0", "y0", "x1", "y1")
PATHOLOGIES = tuple(label for label in LABELS if label not in ("No Finding", "Support Devices"))
OPACITIES = ("Edema", "Consolidation", "Pneumonia", "Atelectasis", "Lung Lesion")  # children of Lung Opacity
# Findings that persist across a patient's studies, drawn from the patient's RNG so they look the same.
CHRONIC = ("Cardiomegaly", "Enlarged Cardiomediastinum", "Lung Lesion", "Pleural Other", "Fracture")
# label: (share of present findings reported uncertain, share of absent ones reported negative 0.0)
REPORTING = {
    "Enlarged Cardiomediastinum": (0.15, 0.10), "Cardiomegaly": (0.08, 0.06), "Lung Opacity": (0.05, 0.03),
    "Lung Lesion": (0.08, 0.02), "Edema": (0.12, 0.12), "Consolidation": (0.15, 0.14),
    "Pneumonia": (0.15, 0.03), "Atelectasis": (0.15, 0.02), "Pneumothorax": (0.06, 0.28),
    "Pleural Effusion": (0.10, 0.18), "Pleural Other": (0.10, 0.01), "Fracture": (0.08, 0.02),
    "Support Devices": (0.05, 0.03),
}
ABSENT_UNCERTAIN = 0.01  # a hedged mention of a finding that is not there

# Anatomy of the base radiograph in normalized image coordinates (x right, y down; the patient's right is
# the image's left), read off the image. Lungs as ellipses (cx, cy, rx, ry): their apical and lateral
# borders follow the ellipse, their lower border is the diaphragm at `base`.
LUNGS = {"right": (0.255, 0.42, 0.165, 0.31), "left": (0.745, 0.45, 0.165, 0.33)}
LATERAL = {"right": -1.0, "left": 1.0}  # x direction of the chest wall
BASE = {"right": 0.68, "left": 0.75}
HILA = {"right": (0.37, 0.45), "left": (0.63, 0.42)}
HEART = (0.565, 0.64)
MEDIASTINUM = (0.5, 0.29)


def generate(out_dir, n_train=2000, n_valid=300, img_size=224, seed=0, workers=None,
             progress=True) -> pathlib.Path:
    """Write the synthetic CheXpert-v1.0-small folder under `out_dir` and return its path."""
    root = pathlib.Path(out_dir) / DATASET_FOLDER
    root.mkdir(parents=True, exist_ok=True)
    studies = _plan(np.random.default_rng(seed), n_train, n_valid)
    for split in ("train", "valid"):
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(COLUMNS)
            writer.writerows([s["row"] for s in studies if s["split"] == split])

    jobs = [(i, s["path"], s["patient"], s["truth"]) for i, s in enumerate(studies)]
    chunks = [jobs[i:i + 32] for i in range(0, len(jobs), 32)]
    render = functools.partial(_render_chunk, str(root.parent), img_size, seed)
    workers = workers or os.cpu_count() or 1
    _base(2 * img_size)  # load before forking so that the workers share it
    if workers > 1:
        with Pool(workers) as pool:
            findings = _collect(pool.imap(render, chunks), len(jobs), progress)
    else:
        findings = _collect(map(render, chunks), len(jobs), progress)
    with open(root / FINDINGS_FILE, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(FINDINGS_COLUMNS)
        writer.writerows(findings)
    return root


def _collect(results, total, progress):
    """The findings rows of the image chunks in order, with a progress bar."""
    rows = []
    with tqdm(total=total, unit="img", disable=not progress, desc="synthetic CheXpert") as bar:
        for n, chunk_rows in results:
            rows += chunk_rows
            bar.update(n)
    return rows


# ---------------------------------------------------------------------------------------------- labels


def _plan(rng, n_train, n_valid):
    """The studies, train then valid: split, patient number, image path, true labels and CSV row.

    A patient has 1-3 studies (sex and age shared, chronic findings kept); valid patients come after
    the train ones, so the two are disjoint."""
    studies, patient = [], 0
    for split, n in (("train", n_train), ("valid", n_valid)):
        count = 0
        while count < n:
            patient += 1
            sex = "Male" if rng.random() < 0.57 else "Female"
            age = int(np.clip(rng.normal(61, 17), 18, 90))
            n_studies = min(1 + int(rng.choice(3, p=(0.7, 0.2, 0.1))), n - count)
            chronic = {}
            for study in range(1, n_studies + 1):
                truth = _sample_truth(rng, chronic)
                chronic = {label: truth[label] for label in CHRONIC}
                cells = _report(rng, truth, split == "valid")
                view = "AP" if rng.random() < (0.85 if truth["Support Devices"] else 0.65) else "PA"
                path = f"{DATASET_FOLDER}/{split}/patient{patient:05d}/study{study}/view1_frontal.jpg"
                row = [path, sex, age, "Frontal", view] + [cells[label] for label in LABELS]
                studies.append({"split": split, "patient": patient, "path": path, "truth": truth, "row": row})
                age += int(rng.random() < 0.3)  # follow-up studies within months
            count += n_studies
    return studies


def _sample_truth(rng, keep):
    """The true findings of one study (label -> bool), those in `keep` copied from an earlier study."""
    truth = {}

    def draw(label, p):
        truth[label] = keep[label] if label in keep else bool(rng.random() < p)
        return truth[label]

    cardiomegaly = draw("Cardiomegaly", 0.13)
    draw("Enlarged Cardiomediastinum", 0.16 if cardiomegaly else 0.045)
    edema = draw("Edema", 0.5 if cardiomegaly else 0.23)  # heart failure
    effusion = draw("Pleural Effusion", 0.6 if edema else 0.34)
    consolidation = draw("Consolidation", 0.08)
    draw("Pneumonia", 0.2 if consolidation else 0.02)
    draw("Atelectasis", 0.25 if effusion else 0.11)  # compressive atelectasis
    draw("Lung Lesion", 0.045)
    pneumothorax = draw("Pneumothorax", 0.1)
    draw("Pleural Other", 0.022)
    draw("Fracture", 0.045)
    draw("Lung Opacity", 1.0 if any(truth[label] for label in OPACITIES) else 0.06)
    draw("Support Devices", 0.72 if edema or effusion or pneumothorax else 0.36)  # sicker patients
    return truth


def _report(rng, truth, valid):
    """The label cells of a study from its truth: exact for valid, "reported" for train (see REPORTING)."""
    cells = {}
    for label, present in truth.items():
        if valid:
            cells[label] = "1.0" if present else "0.0"
            continue
        uncertain, negative = REPORTING[label]
        u = rng.random()
        if present:
            cells[label] = "-1.0" if u < uncertain else "1.0"
        else:
            cells[label] = "-1.0" if u < ABSENT_UNCERTAIN else "0.0" if u < ABSENT_UNCERTAIN + negative else ""
    cells["No Finding"] = "" if any(cells[label] in ("1.0", "-1.0") for label in PATHOLOGIES) else "1.0"
    return cells


# ---------------------------------------------------------------------------------------------- images


@functools.lru_cache(maxsize=None)
def _base(size):
    """The base radiograph at size x size, bright where dense: scaled by its bit depth, inverted
    (MONOCHROME1), windowed between its 0.5 and 99.5 percentiles, given a gamma of 1.5 so that the lungs
    are dark as on a reading screen, and scaled to [0, 0.85], leaving headroom for metal and for
    opacities over the already bright mediastinum."""
    file = get_testdata_file("RG1_UNCR.dcm", download=False)
    if file is None:
        raise FileNotFoundError("RG1_UNCR.dcm not found: install pydicom-data")
    ds = pydicom.dcmread(file)
    img = ds.pixel_array.astype(np.float32) / (2 ** ds.BitsStored - 1)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        img = 1 - img
    lo, hi = np.percentile(img, (0.5, 99.5))
    img = (0.85 * np.clip((img - lo) / (hi - lo), 0, 1) ** 1.5).astype(np.float32)
    return np.clip(np.asarray(Image.fromarray(img, "F").resize((size, size), Image.Resampling.LANCZOS)), 0, 1)


@functools.lru_cache(maxsize=None)
def _pixel_grid(size):
    """Row and column coordinates of every pixel of a size x size image."""
    return np.mgrid[0:size, 0:size].astype(np.float32)


def _render_chunk(root, size, seed, jobs):
    """Draw and save a chunk of images; their findings.csv rows."""
    rows = []
    for index, path, patient, truth in jobs:
        image, boxes = _render(size, truth, *(np.random.default_rng([seed, stream, key])
                                              for stream, key in ((0, index), (1, index), (2, patient))))
        file = pathlib.Path(root, path)
        file.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(file, quality=90)
        rows += [(path, label, *box) for label, box in boxes]
    return len(jobs), rows


def _render(size, truth, study_rng, findings_rng, patient_rng):
    """One image (uint8, size x size) and its findings' boxes in its pixels.

    Drawn at twice the size, then binned 2x2 (anti-aliasing thin lines and edges). The patient's RNG
    draws their anatomy (positioning, heart, mediastinum) and chronic findings, the same in every study;
    the study's RNG its positioning and exposure, apart from the findings' RNG so that the same study
    with other findings differs only by them."""
    W = 2 * size
    img = _base(W).copy()
    angle = patient_rng.uniform(-3, 3) + study_rng.uniform(-2, 2)
    scale = patient_rng.uniform(0.92, 1.08, 2) * study_rng.uniform(0.98, 1.02)
    shift = (patient_rng.uniform(-0.03, 0.03, 2) + study_rng.uniform(-0.015, 0.015, 2)) * W
    boxes = _plant(img, truth, findings_rng, patient_rng)
    img, to_output = _deform(img, study_rng, angle, scale, shift)
    return _acquire(img, study_rng), [(label, to_output(box)) for label, box in boxes]


def _plant(img, truth, rng, patient_rng):
    """Paint the true findings on the canvas (devices last, on top); (label, canvas box) pairs."""
    found = {"Cardiomegaly": _heart(img, patient_rng, truth["Cardiomegaly"]),
             "Enlarged Cardiomediastinum": _mediastinum(img, patient_rng, truth["Enlarged Cardiomediastinum"])}
    paint = dict(truth)  # a Lung Opacity gets its own patch only without a more specific finding
    paint["Lung Opacity"] = truth["Lung Opacity"] and not any(truth[label] for label in OPACITIES)
    for label, planter, planter_rng in (
            ("Pleural Effusion", _effusion, rng), ("Edema", _edema, rng), ("Consolidation", _consolidation, rng),
            ("Pneumonia", _pneumonia, rng), ("Lung Opacity", _opacity, rng), ("Atelectasis", _atelectasis, rng),
            ("Lung Lesion", _nodule, patient_rng), ("Pneumothorax", _pneumothorax, rng),
            ("Pleural Other", _apical_cap, patient_rng), ("Fracture", _fracture, patient_rng),
            ("Support Devices", _devices, rng)):
        if paint[label]:
            found[label] = planter(img, planter_rng)
    if truth["Lung Opacity"]:
        found["Lung Opacity"] = found.get("Lung Opacity", []) + [
            box for label in OPACITIES if truth[label] for box in found[label]]
    return [(label, box) for label in LABELS if truth.get(label) for box in found[label]]


def _deform(img, rng, angle, scale, shift):
    """Warp the canvas by the affine o = c + shift + M (p - c) (M: rotation times axis scales, about the
    centre c) plus a mild smooth elastic displacement; the warped canvas and a function taking a canvas
    box to the output image's (x0, y0, x1, y1), x1 and y1 exclusive."""
    W = img.shape[0]
    a = np.deg2rad(angle)
    M = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.diag(scale)
    inverse = np.linalg.inv(M)
    c = (W - 1) / 2
    displacement = [_smooth_noise(rng, (W, W), 4) * (rng.uniform(0, 0.004) * W) for _ in range(2)]
    rows, cols = _pixel_grid(W)
    x, y = cols - c - shift[0], rows - c - shift[1]
    source_x = c + inverse[0, 0] * x + inverse[0, 1] * y + displacement[0]
    source_y = c + inverse[1, 0] * x + inverse[1, 1] * y + displacement[1]
    warped = ndimage.map_coordinates(img, [source_y, source_x], order=1, mode="reflect")  # no edge streaks
    # boxes grow by what the elastic part can move a point (rather than inverting it) and by the pixel
    # that linear interpolation spreads an edge over
    margin = (max(float(np.abs(d).max()) for d in displacement) + 1) * float(scale.max())
    size = W // 2

    def to_output(box):
        # a drawing that reaches the canvas edge goes on beyond it, as the warp reflects the canvas there
        x0, y0 = (v - W if v == 0 else v for v in box[:2])
        x1, y1 = (v + W if v == W - 1 else v for v in box[2:])
        corners = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]], float)
        moved = (corners - c) @ M.T + c + shift
        lo = np.floor((moved.min(0) - margin) / 2)
        hi = np.floor((moved.max(0) + margin) / 2) + 1
        return (*(int(v) for v in np.clip(lo, 0, size - 1)), *(int(v) for v in np.clip(hi, 1, size)))

    return warped, to_output


def _acquire(img, rng):
    """Exposure and detector: gamma, contrast, brightness, a shading ramp, 2x2 binning and noise; uint8."""
    W = img.shape[0]
    img = np.clip(img, 0, 1) ** np.exp(rng.uniform(-0.25, 0.25))
    ramp = np.linspace(-0.5, 0.5, W, dtype=np.float32)
    gx, gy = rng.uniform(-0.06, 0.06, 2)
    img = (img - 0.5) * rng.uniform(0.85, 1.15) + 0.5 + rng.uniform(-0.06, 0.06) + gx * ramp + gy * ramp[:, None]
    img = img.reshape(W // 2, 2, W // 2, 2).mean((1, 3))
    img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(0.004, 0.02)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- drawing
# Shapes are given in normalized coordinates and drawn into a window of the square canvas of side W;
# a drawing is (origin, mask): the window's top-left (row, column) and a mask in [0, 1].


def _window(W, x0, y0, x1, y1):
    """The canvas window around a normalized box: its origin and its pixels' normalized coordinates as
    an open grid (a column of y, a row of x)."""
    i0, i1 = max(int(y0 * W), 0), min(int(y1 * W) + 2, W)
    j0, j1 = max(int(x0 * W), 0), min(int(x1 * W) + 2, W)
    ys = np.arange(i0, i1, dtype=np.float32)[:, None] / W
    xs = np.arange(j0, j1, dtype=np.float32)[None, :] / W
    return (i0, j0), ys, xs


def _smoothstep(t):
    t = np.clip(t, 0, 1)
    return t * t * (3 - 2 * t)


def _smooth_noise(rng, shape, cells):
    """Smooth random texture of about `cells` blobs across, unit standard deviation."""
    coarse = rng.standard_normal((cells, cells), dtype=np.float32)
    fine = np.asarray(Image.fromarray(coarse, "F").resize((shape[1], shape[0]), Image.Resampling.BICUBIC))
    return fine / (fine.std() + 1e-6)


def _ellipse(W, cx, cy, rx, ry, angle=0.0, edge=0.3):
    """A soft ellipse: 1 inside, falling smoothly to 0 over the outer `edge` of its radius; `angle` turns
    its x axis clockwise on screen."""
    c, s = np.cos(angle), np.sin(angle)
    hx, hy = np.hypot(rx * c, ry * s), np.hypot(rx * s, ry * c)
    origin, ys, xs = _window(W, cx - hx, cy - hy, cx + hx, cy + hy)
    dx, dy = xs - cx, ys - cy
    r = np.hypot((dx * c + dy * s) / rx, (dy * c - dx * s) / ry)
    return origin, _smoothstep((1 - r) / edge)


def _stroke(W, lines, width):
    """Thin lines through normalized points (tubes, wires, a rib cortex), slightly blurred."""
    points = np.concatenate(lines)
    pad = width + 2 / W
    origin, ys, xs = _window(W, *(points.min(0) - pad), *(points.max(0) + pad))
    layer = Image.new("F", (xs.shape[1], ys.shape[0]))
    draw = ImageDraw.Draw(layer)
    for line in lines:
        pixels = np.asarray(line) * W - (origin[1], origin[0])
        draw.line([tuple(p) for p in pixels], fill=1.0, width=max(1, round(width * W)), joint="curve")
    return origin, ndimage.gaussian_filter(np.asarray(layer), 0.7)


def _ring(W, cx, cy, radius, width):
    """An ECG electrode: a ring with a central snap."""
    origin, ys, xs = _window(W, cx - radius - width, cy - radius - width, cx + radius + width, cy + radius + width)
    d = np.hypot(xs - cx, ys - cy)
    return origin, np.maximum(_smoothstep(1 - np.abs(d - radius) / width),
                              _smoothstep((0.35 * radius - d) / (0.15 * radius)))


def _bezier(p0, p1, p2, n=24):
    """Points of the quadratic Bezier curve from p0 to p2 pulled towards p1."""
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * np.asarray(p0) + 2 * (1 - t) * t * np.asarray(p1) + t ** 2 * np.asarray(p2)


def _paint(img, origin, mask, amp):
    """Add density where the mask is: brighten towards white (a screen blend, so that dense regions
    saturate as on film); the drawing's canvas box."""
    (i0, j0), (h, w) = origin, mask.shape
    win = img[i0:i0 + h, j0:j0 + w]
    win += amp * mask * (1 - win)
    return _bbox(origin, mask)


def _bbox(origin, mask):
    """Canvas box (x0, y0, x1, y1), inclusive pixel indices, of where the mask exceeds 10% of its peak."""
    rows, cols = np.nonzero(mask > 0.1 * mask.max())
    return origin[1] + cols.min(), origin[0] + rows.min(), origin[1] + cols.max(), origin[0] + rows.max()


def _side(rng):
    return ("right", "left")[rng.integers(2)]


def _lung_point(rng, side, reach=0.6, top=-0.6):
    """A random point of a lung field: within `reach` of its ellipse's radius and below `top`."""
    cx, cy, rx, ry = LUNGS[side]
    while True:
        u, v = rng.uniform(-reach, reach, 2)
        if u * u + v * v < reach * reach and v > top:
            return cx + u * rx, cy + v * ry


def _pleural_band(W, side, direction, spread):
    """A window over the upper part of a lung with, per pixel: the lung's normalized elliptic radius r
    (1 on its border), the pixels per unit of r, and the weight of the sector of the border around
    `direction` (radians from straight up towards the chest wall), `spread` radians either side."""
    cx, cy, rx, ry = LUNGS[side]
    origin, ys, xs = _window(W, cx - 1.05 * rx, cy - 1.05 * ry, cx + 1.05 * rx, cy + 0.4 * ry)
    u, v = (xs - cx) / rx, (ys - cy) / ry
    r = np.hypot(u, v) + 1e-6
    pixels = W * np.hypot(u * rx, v * ry) / r
    cos = (u * LATERAL[side] * np.sin(direction) - v * np.cos(direction)) / r
    return origin, r, pixels, _smoothstep((cos - np.cos(spread)) / 0.2)


# ---------------------------------------------------------------------------------------------- findings
# Each planter paints one finding on the canvas and returns its canvas boxes.


def _heart(img, rng, enlarged):
    """The cardiac silhouette, low in the middle towards the patient's left; an enlarged one is wider
    and taller and reaches far into the left lung."""
    low, high = ((0.17, 0.12, 0.02), (0.23, 0.15, 0.05)) if enlarged else ((0.11, 0.09, 0.0), (0.14, 0.11, 0.0))
    rx, ry, dx = rng.uniform(low, high)  # the same draws either way: the patient's other findings stay put
    origin, mask = _ellipse(img.shape[0], HEART[0] + dx, HEART[1] + rng.uniform(-0.01, 0.02), rx, ry,
                            rng.uniform(0.1, 0.4), edge=0.25)
    return [_paint(img, origin, mask, rng.uniform(0.15, 0.3))]


def _mediastinum(img, rng, widened):
    """The upper mediastinum, wider than normal when widened."""
    rx = rng.uniform(0.1, 0.13) if widened else rng.uniform(0.06, 0.075)
    origin, mask = _ellipse(img.shape[0], MEDIASTINUM[0] + rng.uniform(-0.01, 0.01),
                            MEDIASTINUM[1] + rng.uniform(-0.02, 0.02), rx, rng.uniform(0.15, 0.19), edge=0.4)
    return [_paint(img, origin, mask, rng.uniform(0.15, 0.3))]


def _effusion(img, rng):
    """Fluid at one or both lung bases: denser downwards, its upper border a meniscus that climbs the
    chest wall, the costophrenic angle hidden."""
    W, boxes = img.shape[0], []
    for side in (("right",), ("left",), ("right", "left"))[rng.choice(3, p=(0.4, 0.35, 0.25))]:
        cx, cy, rx, ry = LUNGS[side]
        base, height = BASE[side], rng.uniform(0.07, 0.2)
        origin, ys, xs = _window(W, cx - rx, base - height - 0.03, cx + rx, base + 0.06)
        lateral = np.clip(0.5 + 0.5 * LATERAL[side] * (xs - cx) / rx, 0, 1)  # 0 medially, 1 at the wall
        depth = (ys - (base - height * (0.35 + 0.65 * lateral ** 2))) / height
        mask = (_smoothstep(depth / 0.25) * (0.6 + 0.4 * np.clip(depth, 0, 1)) * _smoothstep((base + 0.06 - ys) / 0.04)
                * _smoothstep((1 - lateral) / 0.05) * _smoothstep(lateral / 0.35))
        boxes.append(_paint(img, origin, mask, rng.uniform(0.2, 0.45)))
    return boxes


def _edema(img, rng):
    """Bilateral perihilar haze (bat wings) with a fine interstitial texture."""
    W, boxes, amp = img.shape[0], [], rng.uniform(0.12, 0.3)
    for side, (hx, hy) in HILA.items():
        origin, haze = _ellipse(W, hx + 0.04 * LATERAL[side], hy, rng.uniform(0.1, 0.13), rng.uniform(0.13, 0.17),
                                edge=1.0)
        texture = 0.6 + 0.4 * _smoothstep(0.5 + 0.5 * _smooth_noise(rng, haze.shape, 12))
        boxes.append(_paint(img, origin, haze * texture, amp * rng.uniform(0.85, 1.15)))
    return boxes


def _patch(img, rng, radius, cells, density, amp):
    """Patchy airspace opacity: smooth noise, thresholded softly, in a soft ellipse in a lung field."""
    cx, cy = _lung_point(rng, _side(rng))
    origin, envelope = _ellipse(img.shape[0], cx, cy, radius * rng.uniform(0.8, 1.2), radius * rng.uniform(0.8, 1.2),
                                rng.uniform(-0.5, 0.5), edge=0.5)
    mask = envelope * _smoothstep(density + 0.5 * _smooth_noise(rng, envelope.shape, cells))
    return [_paint(img, origin, mask, amp)]


def _consolidation(img, rng):
    return _patch(img, rng, rng.uniform(0.06, 0.1), cells=6, density=0.8, amp=rng.uniform(0.25, 0.4))


def _pneumonia(img, rng):
    return _patch(img, rng, rng.uniform(0.03, 0.05), cells=4, density=0.85, amp=rng.uniform(0.3, 0.45))


def _opacity(img, rng):
    return _patch(img, rng, rng.uniform(0.07, 0.12), cells=8, density=0.5, amp=rng.uniform(0.18, 0.3))


def _atelectasis(img, rng):
    """One or two thin plate-like opacities above a lung base."""
    side = _side(rng)
    cx, cy, rx, ry = LUNGS[side]
    boxes = []
    for _ in range(1 + int(rng.random() < 0.3)):
        origin, mask = _ellipse(img.shape[0], cx + rng.uniform(-0.5, 0.5) * rx, BASE[side] - rng.uniform(0.04, 0.12),
                                rng.uniform(0.06, 0.1), rng.uniform(0.012, 0.02), rng.uniform(-0.3, 0.3), edge=0.6)
        boxes.append(_paint(img, origin, mask, rng.uniform(0.3, 0.45)))
    return boxes


def _nodule(img, rng):
    """A round, fairly sharp nodule, sometimes a mass."""
    cx, cy = _lung_point(rng, _side(rng), reach=0.75, top=-0.8)
    radius = rng.uniform(0.05, 0.07) if rng.random() < 0.15 else rng.uniform(0.025, 0.045)
    origin, mask = _ellipse(img.shape[0], cx, cy, radius, radius * rng.uniform(0.85, 1.15), edge=0.25)
    return [_paint(img, origin, mask, rng.uniform(0.35, 0.5))]


def _pneumothorax(img, rng):
    """Air between the chest wall and a collapsed lung at the apex and lateral wall of one side: a band
    without lung markings (blurred), darker, with a thin bright visceral pleural line at its inner edge."""
    W = img.shape[0]
    origin, r, pixels, sector = _pleural_band(W, _side(rng), rng.uniform(0.3, 1.1), rng.uniform(0.9, 1.4))
    edge = 1 - rng.uniform(0.15, 0.35)  # the collapsed lung's border
    band = sector * _smoothstep((r - edge) / 0.02) * _smoothstep((1.02 - r) / 0.06)
    (i0, j0), (h, w) = origin, r.shape
    win = img[i0:i0 + h, j0:j0 + w]
    win += band * (ndimage.gaussian_filter(win, 0.015 * W) - win - rng.uniform(0.1, 0.2))
    line = sector * np.exp(-0.5 * ((r - edge) * pixels / max(0.0025 * W, 0.8)) ** 2)
    _paint(img, origin, line, rng.uniform(0.2, 0.35))
    return [_bbox(origin, np.maximum(band, line))]


def _apical_cap(img, rng):
    """Apical pleural thickening: a thin bright crescent along the top of one lung."""
    origin, r, _, sector = _pleural_band(img.shape[0], _side(rng), rng.uniform(-0.2, 0.4), rng.uniform(0.5, 0.8))
    thickness = rng.uniform(0.08, 0.15)
    mask = sector * _smoothstep((r - 1 + thickness) / 0.03) * _smoothstep((1.01 - r) / 0.02)
    return [_paint(img, origin, mask, rng.uniform(0.3, 0.45))]


def _fracture(img, rng):
    """A lateral rib fracture: a short bright cortex line broken by a gap, the fragments offset."""
    side = _side(rng)
    cx, cy, rx, ry = LUNGS[side]
    centre = np.array([cx + LATERAL[side] * rx * rng.uniform(0.75, 0.95), cy + ry * rng.uniform(-0.5, 0.3)])
    a = rng.uniform(0.25, 0.6)  # lateral ribs run down towards the chest wall
    along = np.array([LATERAL[side] * np.cos(a), np.sin(a)])
    step = np.array([-along[1], along[0]]) * rng.uniform(0.003, 0.008)
    length, gap = rng.uniform(0.04, 0.07), rng.uniform(0.008, 0.015)
    lines = [np.array([centre - along * (gap / 2 + length), centre - along * gap / 2]),
             np.array([centre + along * gap / 2, centre + along * (gap / 2 + length)]) + step]
    origin, mask = _stroke(img.shape[0], lines, 0.008)
    return [_paint(img, origin, mask, rng.uniform(0.3, 0.45))]


def _devices(img, rng):
    """Radiopaque lines and tubes: an endotracheal tube ending above the carina, a central venous line
    from a subclavian vein into the superior vena cava, a nasogastric tube down into the stomach and
    ECG electrodes; at least one of them."""
    W = img.shape[0]
    kinds = [kind for kind, p in (("ett", 0.55), ("cvc", 0.5), ("ngt", 0.35), ("ecg", 0.4)) if rng.random() < p]
    kinds = kinds or [("ett", "cvc", "ngt", "ecg")[rng.integers(4)]]
    drawings = []

    def jitter(x, y):
        return np.array([x, y]) + rng.normal(0, 0.01, 2)

    if "ett" in kinds:
        curve = _bezier(jitter(0.49, 0.0), jitter(0.485, 0.15), jitter(0.495, 0.3))
        drawings.append(_stroke(W, [curve], 0.008))
    if "cvc" in kinds:
        s = LATERAL[_side(rng)]
        curve = _bezier(jitter(0.5 + 0.38 * s, 0.16), jitter(0.5 + 0.12 * s, 0.19), jitter(0.5 + 0.03 * s, 0.36))
        drawings.append(_stroke(W, [curve], 0.005))
    if "ngt" in kinds:
        curve = _bezier(jitter(0.5, 0.0), jitter(0.5, 0.45), jitter(0.58, 0.86))
        drawings.append(_stroke(W, [curve], 0.006))
    if "ecg" in kinds:
        for _ in range(rng.integers(2, 5)):
            x, y = rng.choice((-1, 1)) * rng.uniform(0.1, 0.38) + 0.5, rng.uniform(0.08, 0.35)
            drawings.append(_ring(W, x, y, rng.uniform(0.012, 0.018), 0.004))
    return [_paint(img, origin, mask, rng.uniform(0.5, 0.8)) for origin, mask in drawings]
