"""The benchmark runner (``mxa bench``): the smoke suite gates its key ratios against the committed
baseline, the full suite's cases build and run (at batch 2, CPU providers), failures are caught and
reported, and the micro-cases are timed with pytest-benchmark (their JSON is saved, see pyproject)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mxa_kernels
from mxa_bench import runner
from mxa_bench.cases import Case, Workload, authors_mxa_branch, sdpa_window_attention
from mxa_bench.suites import FULL, KEY_RATIOS, SMOKE
from mxa_model import cli
from mxa_model.window_attention import FusedLocalWindowAttention

BASELINE = Path(runner.BASELINES_DIR) / "smoke-cpu.json"
REQUIRED = {"case", "provider", "mode", "shape", "dtype", "median_ms", "device", "commit"}


def test_smoke_suite_meets_the_committed_baseline(tmp_path, capsys):
    """The CI gate: the smoke suite runs every provider it names (Triton through the interpreter) and
    its key ratios, measured side by side, stay within the baseline's tolerance."""
    out, chart = tmp_path / "smoke.json", tmp_path / "speedups.png"
    code = cli.main(["bench", "--suite", "smoke", "--json", str(out), "--no-save", "--baseline", str(BASELINE),
                     "--chart", str(chart)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    records = json.loads(out.read_text())
    assert all(REQUIRED <= set(r) for r in records)
    timed = [r for r in records if r["median_ms"] is not None]
    assert {(c.name, p) for c in SMOKE for p in c.providers} == {(r["case"], r["provider"]) for r in timed}
    fused = [r for r in timed if r["provider"] == "triton"]
    assert fused and all(r["interpreted"] for r in fused)  # flagged: not a performance figure
    compared = [r for r in timed if r["rel_err"] is not None]
    assert compared and all(r["rel_err"] < 1e-5 for r in compared), [(r["case"], r["rel_err"]) for r in compared]
    for ratio in KEY_RATIOS["smoke"]:
        assert f"{ratio.name} = " in printed
    assert chart.stat().st_size > 10_000


def _records(ratios: dict[str, float]) -> list[dict]:
    """Records of the smoke suite's key-ratio cases whose ratios are ``ratios``."""
    records = []
    for ratio in KEY_RATIOS["smoke"]:
        base = dict(case=ratio.case, mode=ratio.mode, shape=[1], dtype="float32", level="x", device="cpu",
                    commit="c", suite="smoke")
        records += [dict(base, provider=ratio.denominator, median_ms=10.0),
                    dict(base, provider=ratio.numerator, median_ms=10.0 * ratios[ratio.name])]
    return records


@pytest.mark.parametrize("which", range(len(KEY_RATIOS["smoke"])))
def test_a_regressed_ratio_fails_the_check(tmp_path, capsys, which):
    baseline = runner.read_baseline(BASELINE)["ratios"]
    good = {name: entry["value"] for name, entry in baseline.items()}
    bad = dict(good)
    name = KEY_RATIOS["smoke"][which].name
    ratio = KEY_RATIOS["smoke"][which]
    # just past the limit, in the direction that is worse
    tol = baseline[name]["tolerance"]
    bad[name] = good[name] * ((1 - tol) * 0.98 if ratio.higher_is_better else (1 + tol) * 1.02)
    for ratios, expected in ((good, 0), (bad, 1)):
        path = tmp_path / "records.json"
        path.write_text(json.dumps(_records(ratios)))
        assert cli.main(["bench", "--from-json", str(path), "--baseline", str(BASELINE)]) == expected
    assert f"regression: {name}" in capsys.readouterr().out


def test_key_ratios_take_the_last_complete_run(tmp_path):
    """An appended history holds several runs: each ratio comes from one run, the last."""
    first = _records({r.name: 1.0 for r in KEY_RATIOS["smoke"]})
    second = _records({r.name: 2.0 for r in KEY_RATIOS["smoke"]})
    assert set(runner.key_ratios(first + second, "smoke").values()) == {2.0}
    assert set(runner.key_ratios(second + first, "smoke").values()) == {1.0}


def test_time_budget_stops_starting_cases(tmp_path, capsys):
    out = tmp_path / "budget.json"
    assert cli.main(["bench", "--cases", "window_attention,mxa_branch_align", "--providers", "eager", "--no-save",
                     "--time-budget", "0", "--json", str(out)]) == 0
    assert "1 case(s) not run: window_attention" in capsys.readouterr().out
    assert {r["case"] for r in json.loads(out.read_text())} == {"mxa_branch_align"}


def test_a_ratio_missing_from_the_run_fails_the_check(tmp_path, capsys):
    records = [r for r in _records({r.name: 1.0 for r in KEY_RATIOS["smoke"]}) if r["case"] != "mxa_branch_crop"]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    assert cli.main(["bench", "--from-json", str(path), "--baseline", str(BASELINE)]) == 1
    assert "mxa_branch_loop_over_vectorized: not measured" in capsys.readouterr().out


def test_write_baseline_round_trips(tmp_path):
    path = tmp_path / "records.json"
    ratios = {r.name: 1.5 for r in KEY_RATIOS["smoke"]}
    path.write_text(json.dumps(_records(ratios)))
    written = tmp_path / "baseline.json"
    assert cli.main(["bench", "--from-json", str(path), "--write-baseline", str(written), "--tolerance", "0.2"]) == 0
    data = runner.read_baseline(written)
    assert data["ratios"] == {name: {"value": 1.5, "tolerance": 0.2} for name in ratios}
    assert cli.main(["bench", "--from-json", str(path), "--baseline", str(written)]) == 0


def test_full_suite_builds_and_runs_at_batch_2(tmp_path):
    """What a CPU can check of the GPU suite: every case builds at the M5 shapes and runs its CPU providers."""
    out = tmp_path / "full.json"
    code = cli.main(["bench", "--suite", "full", "--batch", "2", "--repeats", "1", "--device", "cpu",
                     "--providers", "eager,per-sample loop,sdpa,timm plain", "--no-save", "--json", str(out)])
    records = json.loads(out.read_text())
    assert code == 0, [r for r in records if r.get("error")]
    assert {(c.name, tuple(c.shape[1:]), c.dtype) for c in FULL} == {
        (r["case"], tuple(r["shape"][1:]), r["dtype"]) for r in records}
    model = [r for r in records if r["level"] == "model"]
    assert {r["mode"] for r in model} == {"train", "inference"} and all(r["images_per_s"] > 0 for r in model)
    assert all(r["tflops"] > 0 for r in records if r["level"] != "kernel")
    assert all(r["gbs"] > 0 for r in records if r["level"] == "kernel")


def test_a_failing_provider_is_reported_and_the_others_still_timed():
    calls_made = []

    def build(case, device, providers):
        def broken():
            raise RuntimeError("out of resources\nmore detail")

        def fails_when_timed():  # passes its first call, then runs out of memory
            calls_made.append(1)
            if len(calls_made) > 1:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return torch.ones(3)

        return Workload(calls={"eager": {"forward": lambda: torch.ones(3)}, "triton": {"forward": broken},
                               "sdpa": {"forward": lambda: torch.ones(3) * 1.01},
                               "torch.compile": {"forward": fails_when_timed}},
                        skipped={"timm plain": "not here"})

    case = Case("fake", "kernel", (1, 3), "float32", ("forward",), ("eager", "triton", "sdpa", "torch.compile"),
                build, repeats=2)
    records = []
    runner.run_case(case, torch.device("cpu"), {}, {"copy_gbs": 1.0, "matmul_tflops": {}}, records.append)
    by_provider = {r["provider"]: r for r in records}
    assert by_provider["eager"]["median_ms"] > 0
    assert by_provider["triton"]["error"] == "RuntimeError: out of resources"
    assert by_provider["torch.compile"]["error"] == "OutOfMemoryError: CUDA out of memory"
    assert by_provider["timm plain"]["skipped"] == "not here"
    assert by_provider["sdpa"]["rel_err"] == pytest.approx(0.01) and by_provider["sdpa"]["mismatch"]
    assert "ERROR RuntimeError: out of resources" in runner.format_record(by_provider["triton"])
    assert "MISMATCH" in runner.format_record(by_provider["sdpa"])


@pytest.mark.parametrize("argv, message", [
    (["--cases", "no_such_case"], "suite smoke has no case no_such_case"),
    (["--providers", "cuDNN"], "unknown provider cuDNN"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--baseline", "missing.json"], "cannot read baseline missing.json"),
    (["--from-json", "pyproject.toml"], "cannot read benchmark records pyproject.toml"),
])
def test_bad_requests_give_one_line_errors(capsys, argv, message):
    assert cli.main(["bench", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mxa: error: ") and message in err and err.count("\n") == 1


def test_list_shows_the_cases(capsys):
    assert cli.main(["bench", "--suite", "full", "--list"]) == 0
    assert capsys.readouterr().out.count("\n") == len(FULL)


# --- micro-cases, timed by pytest-benchmark; each checks its result against an independent computation


def _mxa_inputs(batch=16, channels=48, size=14):
    x = torch.randn(batch, channels, size, size)
    lo = torch.rand(batch, 2) * 0.5
    boxes = torch.cat([lo, lo + 0.3 + 0.2 * torch.rand(batch, 2)], dim=1)
    weights = (torch.randn(3, channels, 1, 1) * 0.2, torch.randn(channels, 3, 1, 1) * 0.5, torch.randn(1, 2, 7, 7) * 0.2)
    return x, boxes, weights


def test_micro_mxa_branch_vectorized(benchmark):
    x, boxes, weights = _mxa_inputs()
    out = benchmark(mxa_kernels.mxa_branch_ref, x, boxes, *weights, roi_mode="crop")
    torch.testing.assert_close(out, authors_mxa_branch(x, boxes, *weights), rtol=1e-5, atol=1e-5)


def test_micro_mxa_branch_per_sample_loop(benchmark):
    x, boxes, weights = _mxa_inputs()
    out = benchmark(authors_mxa_branch, x, boxes, *weights)
    torch.testing.assert_close(out, mxa_kernels.mxa_branch_ref(x, boxes, *weights, roi_mode="crop"), rtol=1e-5, atol=1e-5)


def test_micro_window_attention_eager(benchmark):
    block = FusedLocalWindowAttention(64, 16, 2, 2.0, 14, 7)
    idx = block.attn.attention_bias_idxs
    q, k = torch.randn(8, 16, 14, 14), torch.randn(8, 16, 14, 14)
    v, bias = torch.randn(8, 32, 14, 14), torch.randn(int(idx.max()) + 1)
    out = benchmark(mxa_kernels.window_attention_ref, q, k, v, bias, idx, 7, 0.25)
    torch.testing.assert_close(out, sdpa_window_attention(q, k, v, bias, idx, 7, 0.25), rtol=1e-5, atol=1e-5)


def test_gpu_script_rehearses_on_the_cpu(tmp_path):
    """bench/gpu_check.sh as far as a CPU can run it: card detection, the tests, the full suite (one case,
    batch 2), results named by date and card, copied to $OUT."""
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, ALLOW_CPU="1", PYTHON=sys.executable, RESULTS=str(tmp_path / "results"), OUT=str(out),
               TESTS="tests/test_bench.py::test_list_shows_the_cases",
               BENCH_ARGS="--batch 2 --repeats 1 --cases window_attention --providers eager,sdpa")
    script = Path(__file__).parents[1] / "bench" / "gpu_check.sh"
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert [n.split("_", 1)[1] for n in names if n.startswith("20")] == ["cpu_full.json", "cpu_full.png",
                                                                        "cpu_full.txt", "cpu_tests.txt"]
    records = json.loads(next(out.glob("20*_cpu_full.json")).read_text())
    expected = sum(len(c.modes) * len({"eager", "sdpa"} & set(c.providers)) for c in FULL if c.name == "window_attention")
    assert {r["provider"] for r in records} == {"eager", "sdpa"} and len(records) == expected
    history = next(out.glob("*_full.jsonl")).read_text().splitlines()
    assert [json.loads(line) for line in history] == records
