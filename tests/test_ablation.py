"""``mxa ablate``: the study runs end to end in a tiny configuration, resumes, and its statistics are right."""

import json
import statistics

import pytest

from mxa_model import cli
from mxa_model.ablation import ARMS, _effect, _spread, format_effects

TINY = ["--seeds", "1", "--n-train", "48", "--n-valid", "40", "--img-size", "64", "--epochs", "1",
        "--teacher-epochs", "1", "--max-steps", "2", "--batch-size", "8", "--workers", "0", "--quiet"]


@pytest.mark.slow
def test_tiny_study_runs_every_arm_writes_its_outputs_and_resumes(tmp_path, capsys):
    out = tmp_path / "study"
    assert cli.main(["ablate", "--output", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "ablation.json").read_text())
    assert [r["arm"] for r in result["runs"]] == list(ARMS) and set(result["arms"]) == set(ARMS)
    assert (out / "ablation.png").stat().st_size > 0
    for run in result["runs"]:
        mxa = run["arm"].startswith("mxa")
        assert (run["roi_iou"] is not None) == mxa and run["params"] > 0 and run["images_per_s"] > 0
    # the distilled MXA students carry DeiT's second head; the plain model has one head either way
    params = {r["arm"]: r["params"] for r in result["runs"]}
    assert params["plain"] == params["plain+kd"] < params["mxa-crop"] == params["mxa-align"] < params["mxa-align+kd"]
    assert "| mxa-align+kd | 1 |" in printed and "| mxa-align − mxa-crop |" in printed
    # run again: every run is read back, none trained
    assert cli.main(["ablate", "--output", str(out), *TINY]) == 0
    assert capsys.readouterr().out.count("done before") == len(ARMS) + 1  # and the teacher


def test_spread_and_paired_effects_against_hand_computed_figures():
    assert _spread([0.5, 0.7, None]) == {"mean": 0.6, "std": statistics.stdev([0.5, 0.7]), "n": 2}
    assert _spread([None]) == {"mean": None, "std": None, "n": 0}
    runs = [{"arm": arm, "seed": seed, "auc_macro": auc, "auc_micro": 0.5, "auc_competition": None}
            for arm, seed, auc in [("a", 0, 0.70), ("a", 1, 0.80), ("b", 0, 0.60), ("b", 1, 0.75), ("a", 2, 0.9)]]
    effect = _effect(runs, "a", "b")  # seed 2 has no baseline run: left out
    assert effect["seeds"] == 2
    assert effect["auc_macro"]["mean"] == pytest.approx(0.075) and effect["auc_macro"]["positive"] == 2
    assert effect["auc_macro"]["std"] == pytest.approx(statistics.stdev([0.10, 0.05]))
    assert effect["auc_micro"]["positive"] == 0 and effect["auc_competition"]["n"] == 0
    row = "| a − b | 0.075 ± 0.035 (2/2 seeds > 0) | 0.000 ± 0.000 (0/2 seeds > 0) | n/a |"
    assert row in format_effects([effect])


def test_unknown_or_repeated_arms_are_refused_before_anything_runs(tmp_path, capsys):
    assert cli.main(["ablate", "--output", str(tmp_path / "s"), "--arms", "plain,mxa-box"]) == 1
    assert "mxa-box" in capsys.readouterr().err and not (tmp_path / "s").exists()
    assert cli.main(["ablate", "--output", str(tmp_path / "s"), "--arms", "plain,plain"]) == 1
    assert "named twice" in capsys.readouterr().err and not (tmp_path / "s").exists()
