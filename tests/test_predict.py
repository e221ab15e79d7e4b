"""The GPU time model (bench/predict.py, ``mxa bench --suite predict``): operations counted as an independent
computation gives them, Inductor's fusion as modelled, the fused paths in place of the model's own
operations, a fit that sees only its fitting rows, and calibration errors that do not get worse than the
committed ones."""

import json
from pathlib import Path

import pytest
import torch

from mxa_bench import predict

BASELINE = Path(__file__).parents[1] / "bench" / "baselines" / "predict.json"


def test_a_linear_layer_counts_its_bytes_and_flops():
    with torch.device("meta"):
        layer = torch.nn.Linear(64, 32).half()
    ops = predict.count_ops(layer, (8, 64))
    assert len(ops) == 1
    # input, weight, bias and output once each, in float16; 2 FLOPs per multiply-add
    assert ops[0].bytes == 2 * (8 * 64 + 32 * 64 + 32 + 8 * 32) and ops[0].tc_flops == 2 * 8 * 64 * 32


def test_a_depthwise_convolution_runs_on_the_cuda_cores_and_attention_is_one_operation():
    with torch.device("meta"):
        depthwise = torch.nn.Conv2d(16, 16, 3, groups=16, bias=False).half()
    (conv,) = predict.count_ops(depthwise, (2, 16, 10, 10))
    assert conv.tc_flops == 0 and conv.cuda_flops == 2 * 2 * 16 * 8 * 8 * 9

    class Attention(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.scaled_dot_product_attention(x, x, x)

    (attention,) = predict.count_ops(Attention(), (2, 4, 50, 16))
    assert attention.name == "attention" and attention.bytes == 4 * 2 * (2 * 4 * 50 * 16)
    assert attention.tc_flops == 2 * (2 * 4 * 50) * 50 * (16 + 16)


def test_compile_fuses_the_operations_between_two_products():
    op = predict.Op
    ops = [op("convolution", 100, 10), op("batch_norm", 40, 0), op("relu", 30, 0), op("mm", 20, 5), op("add", 7, 0)]
    assert predict.fuse_for_compile(ops) == [op("convolution", 100, 10), op("fused", 40, 0), op("mm", 20, 5),
                                             op("fused", 7, 0)]


@pytest.fixture(scope="module")
def calibration():
    return predict.calibrate(progress=lambda *_: None)


@pytest.mark.slow
def test_the_calibration_errors_do_not_get_worse(calibration):
    """`mxa bench --suite predict --write-baseline bench/baselines/predict.json` wrote the committed figures."""
    baseline = json.loads(BASELINE.read_text())
    for mode, groups in baseline["errors"].items():
        for group, want in groups.items():
            got = calibration["errors"][mode][group]["time model"]
            assert got["rows"] == want["rows"], (mode, group)
            assert got["median"] <= want["median"] + 0.01 and got["p90"] <= want["p90"] + 0.02, (mode, group, got)


@pytest.mark.slow
def test_mxa_m5_is_predicted_for_every_provider_and_each_fused_op_judged(calibration):
    records = predict.predictions("H100", ["mxa_efficientvit_m5"], 8, calibration)
    assert {(r["mode"], r["provider"]) for r in records} == {
        (mode, provider) for mode in ("inference", "train")
        for provider in ("eager", "triton", "torch.compile", "triton+compile")}
    assert all(r["images_per_s"] > 0 and r["kind"] == "prediction" and not r["fitted"] for r in records)
    verdicts = predict.op_verdicts("H100", 8, calibration["constants"])
    assert [(r["op"], r["pass_"]) for r in verdicts] == [
        *((op, p) for op in ("mxa_branch", "window_attention") for _ in range(3) for p in ("forward", "backward")),
        *(("cascaded_attention_infer", "forward") for _ in range(3))]


@pytest.mark.slow
def test_the_fit_sees_only_the_rows_it_is_fitted_on(calibration, monkeypatch):
    real = predict.published_rows

    def other_figures():  # every row the fit must not see, three times faster
        return [r if predict._group(r) == "fitted" else r._replace(images_per_s=3 * r.images_per_s) for r in real()]
    monkeypatch.setattr(predict, "published_rows", other_figures)
    changed = predict.calibrate(progress=lambda *_: None)
    assert changed["constants"] == calibration["constants"]
    assert changed["errors"]["eager"]["fitted"] == calibration["errors"]["eager"]["fitted"]
    assert changed["errors"]["eager"]["held-out families, other cards"] != \
        calibration["errors"]["eager"]["held-out families, other cards"]


def test_the_fused_paths_take_the_places_of_the_models_own_operations():
    """MXA-M5 in inference: one MXA branch call and one attention block per block (1 + 3 + 4), each branch
    call's operations those of the op's eager reference at its stage's shape (counted apart, in the cost
    report's cases); in training too, the fused paths do no more product FLOPs than the references."""
    ops, spans = predict.project_ops("mxa_efficientvit_m5", 2, train=False)
    assert [len(spans[name]) for name in ("mxa_branch", "cascaded_attention_infer")] == [8, 8]
    covered = [i for calls in spans.values() for call in calls for i in call]
    assert len(covered) == len(set(covered)) and max(covered) < len(ops)
    cases = predict.fused_cases(2, train=False)
    stage_of_block = [0, 1, 1, 1, 2, 2, 2, 2]
    for block, call in enumerate(spans["mxa_branch"]):
        reference_ops = cases["mxa_branch"][stage_of_block[block]][1][0][0]
        # the same operations but for dtype casts (the cases' weights are float32, the model's float16)
        assert [ops[i].name for i in call if ops[i].name != "_to_copy"] == [
            o.name for o in reference_ops if o.name != "_to_copy"], block
    for per_stage in predict.fused_cases(2, train=True).values():
        for _, passes in per_stage:
            for eager_ops, fused_ops in passes:
                assert sum(o.tc_flops for o in fused_ops) <= sum(o.tc_flops for o in eager_ops)
