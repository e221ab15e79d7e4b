"""Time ``read_csv`` on a generated file the size of CheXpert-v1.0-small's train.csv (223,414 rows).

``python -m mxa_bench.csv_read [ROWS]`` prints the best of 3 reads. The file has CheXpert's header and
its mix of values (see :func:`chexpert_like_csv`); tests use the generator on a few hundred rows.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mxa_model.data.chexpert import read_csv
from mxa_model.data.labels import COLUMNS, DATASET_FOLDER, LABELS

CHEXPERT_TRAIN_ROWS = 223_414


def chexpert_like_csv(path, n_rows, seed=0):
    """A CSV with CheXpert's header and its mix of values: blank, 1.0, 0.0 and -1.0 label cells, Male,
    Female and Unknown, frontal (AP, PA, a few LL) and lateral views (blank AP/PA), blank and whole ages."""
    rng = np.random.default_rng(seed)
    label_cells = rng.choice(["", "1.0", "0.0", "-1.0"], p=[0.7, 0.15, 0.09, 0.06], size=(n_rows, len(LABELS)))
    sexes = rng.choice(["Male", "Female", "Unknown"], p=[0.59, 0.4, 0.01], size=n_rows)
    ages = rng.integers(18, 91, size=n_rows).astype(str)
    ages[rng.random(n_rows) < 0.01] = ""
    lateral = rng.random(n_rows) < 0.15
    projections = np.where(lateral, "", rng.choice(["AP", "PA", "LL"], p=[0.84, 0.15, 0.01], size=n_rows))
    lines = [",".join(COLUMNS)]
    for i in range(n_rows):
        patient, study = i // 3 + 1, i % 3 + 1
        view = "Lateral" if lateral[i] else "Frontal"
        image = f"{DATASET_FOLDER}/train/patient{patient:05d}/study{study}/view1_{view.lower()}.jpg"
        lines.append(",".join([image, sexes[i], ages[i], view, projections[i], *label_cells[i]]))
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str]) -> None:
    n_rows = int(argv[0]) if argv else CHEXPERT_TRAIN_ROWS
    with tempfile.TemporaryDirectory() as folder:
        csv_path = chexpert_like_csv(Path(folder) / "train.csv", n_rows)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            records = read_csv(csv_path).records
            times.append(time.perf_counter() - start)
    print(f"read_csv of {len(records):,} rows: best {min(times):.2f} s of {', '.join(f'{t:.2f}' for t in times)}")


if __name__ == "__main__":
    main(sys.argv[1:])
