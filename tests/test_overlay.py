"""The overlays of ``mxa predict --overlay-dir`` (:func:`mxa_model.predict.overlay_figure`): a legend naming the
heatmap and each MXA block's ROI box, and the planted findings' boxes mapped through the model's resize and
crop; on an untrained model, so that nothing here depends on learned values."""

import json

import pytest
import torch
from PIL import Image

from mxa_model import cli, predict
from mxa_model.data import LABELS, eval_transform, load_image
from mxa_model.data.labels import DATASET_FOLDER, FINDINGS_FILE
from mxa_model.train.checkpoint import build_model, save_checkpoint

SIDE = 64
HEIGHT, WIDTH = 128, 192  # landscape: resized to 64 x 96, whose centre crop drops 16 columns each side
BOX = (80, 20, 120, 60)  # the planted finding in the file's pixels, x1 and y1 exclusive
M0_BLOCKS = ["stage 1 block 1", "stage 2 block 1", "stage 2 block 2", "stage 3 block 1", "stage 3 block 2",
             "stage 3 block 3"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    kwargs = {"num_classes": len(LABELS), "in_chans": 1, "img_size": SIDE}
    model = build_model("mxa_efficientvit_m0", kwargs)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "m0.pt", {
        "model_name": "mxa_efficientvit_m0", "labels": list(LABELS), "model_kwargs": kwargs,
        "config": {"img_size": SIDE}, "model": model.state_dict()})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A data set folder and its two images, bright inside BOX; findings.csv plants a Nodule there in the first."""
    folder = tmp_path_factory.mktemp("data") / DATASET_FOLDER
    cells = [f"{DATASET_FOLDER}/valid/patient0000{i}/study1/view1_frontal.png" for i in (1, 2)]
    pixels = torch.full((HEIGHT, WIDTH), 40, dtype=torch.uint8)
    pixels[BOX[1]:BOX[3], BOX[0]:BOX[2]] = 220
    for cell in cells:
        (folder.parent / cell).parent.mkdir(parents=True)
        Image.fromarray(pixels.numpy()).save(folder.parent / cell)
    (folder / FINDINGS_FILE).write_text(f"Path,Label,x0,y0,x1,y1\n{cells[0]},Nodule,{','.join(map(str, BOX))}\n")
    return folder, [folder.parent / cell for cell in cells]


@pytest.fixture
def figures(monkeypatch):
    """The figures predict_files draws, kept as they are saved."""
    made, draw = [], predict.overlay_figure

    def keep(*args, **kwargs):
        made.append(draw(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(predict, "overlay_figure", keep)
    return made


def legend(fig) -> list[str]:
    return [text.get_text() for text in fig.axes[0].get_legend().get_texts()]


def dashed(fig) -> list:
    return [patch for patch in fig.axes[0].patches if patch.get_linestyle() == "--"]


def test_the_block_names_follow_the_mxa_modules():
    model = build_model("mxa_efficientvit_m0", {"img_size": SIDE})
    assert model.mxa_block_names() == M0_BLOCKS
    assert [name for name, m in model.named_modules() if m in model.mxa_modules()] == [
        "stages.0.blocks.0.mxa", "stages.1.blocks.0.mxa", "stages.1.blocks.1.mxa", "stages.2.blocks.0.mxa",
        "stages.2.blocks.1.mxa", "stages.2.blocks.2.mxa"]


def test_the_legend_names_the_heatmap_and_each_block_and_the_planted_box_lies_where_the_crop_puts_it(
        checkpoint, data, figures, tmp_path):
    folder, files = data
    assert cli.main(["predict", str(files[0]), "--checkpoint", str(checkpoint), "--overlay-dir", str(tmp_path),
                     "--findings", str(folder), "--json", str(tmp_path / "pred.json")]) == 0
    (result,) = json.loads((tmp_path / "pred.json").read_text())
    top, p = max(result["probabilities"].items(), key=lambda item: item[1])
    (fig,) = figures
    assert legend(fig) == [f"Grad-CAM of {top} (p = {p:.2f})", *(f"ROI box of MXA {n}" for n in M0_BLOCKS),
                           "planted finding (findings.csv)"]
    ax = fig.axes[0]
    solid = [patch for patch in ax.patches if patch not in dashed(fig)]
    handles = ax.get_legend().legend_handles
    assert [b.get_edgecolor() for b in solid] == [h.get_edgecolor() for h in handles[1:-1]]
    assert len({b.get_edgecolor() for b in solid}) == len(M0_BLOCKS)  # no two blocks share a colour
    (planted,) = dashed(fig)
    drawn = (planted.get_x(), planted.get_y(), planted.get_x() + planted.get_width(),
             planted.get_y() + planted.get_height())
    # the shorter side scaled to SIDE, then the centre SIDE columns kept
    scale = SIDE / HEIGHT
    left = (WIDTH * scale - SIDE) / 2
    assert drawn == pytest.approx((BOX[0] * scale - left, BOX[1] * scale, BOX[2] * scale - left, BOX[3] * scale))
    # and where the model's input shows the bright box (its edges blurred by the antialiased resize)
    bright = eval_transform(SIDE)(load_image(files[0]))[0] > 130
    cols, rows = bright.any(dim=0).nonzero()[:, 0].tolist(), bright.any(dim=1).nonzero()[:, 0].tolist()
    assert drawn == pytest.approx((cols[0], rows[0], cols[-1] + 1, rows[-1] + 1), abs=1)
    assert [t.get_text() for t in ax.texts] == ["Nodule"]
    assert ax.texts[0].get_position() == pytest.approx((drawn[0] + 0.5, drawn[1] + 0.5))
    assert result["overlay"].endswith("patient00001_study1_view1_frontal_overlay.png")


def test_without_planted_findings_nothing_more_is_drawn(checkpoint, data, figures, tmp_path):
    folder, files = data
    predict.predict_files(checkpoint, files[:1], overlay_dir=tmp_path)  # no findings given: not even its own
    predict.predict_files(checkpoint, files[1:], overlay_dir=tmp_path, findings=folder)  # none planted in it
    assert len(figures) == 2
    for fig in figures:
        assert len(legend(fig)) == 1 + len(M0_BLOCKS) and legend(fig)[0].startswith("Grad-CAM of ")
        assert len(fig.axes[0].patches) == len(M0_BLOCKS) and not dashed(fig) and not fig.axes[0].texts


def test_findings_from_a_folder_without_a_findings_file_is_an_error(checkpoint, data, tmp_path, capsys):
    assert cli.main(["predict", str(data[1][0]), "--checkpoint", str(checkpoint), "--overlay-dir", str(tmp_path),
                     "--findings", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == f"mxa: error: {tmp_path / FINDINGS_FILE}: no such file, or no planted finding in it\n"
