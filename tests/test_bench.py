"""The benchmark runner (``mxa bench``): the smoke suite gates its operation-count ratios against their
limits and reports its time ratios, the full suite's cases build and run (at batch 2, CPU providers),
failures are caught and reported, and the micro-cases are timed with pytest-benchmark in a
single-process run (``-n 0``; their JSON is saved, see pyproject; across pytest-xdist's processes each runs
once, untimed)."""

import dataclasses
import json
import os
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

import mxa_kernels
from mxa_bench import preflight, runner
from mxa_bench.cases import (Case, Workload, authors_mxa_branch, build_cascaded_attention_block, build_window_attention,
                              sdpa_window_attention)
from mxa_bench.suites import BLOCK_MODES, FULL, KERNEL_MODES, KEY_RATIOS, SMOKE
from mxa_model import cli
from mxa_model.cascaded_attention import FusedLocalWindowAttention
from mxa_model.efficientvit import MXAEfficientVit

REQUIRED = {"case", "provider", "mode", "shape", "dtype", "median_ms", "device", "commit"}
COMMITTED = Path(__file__).parents[1] / "bench" / "results"  # the records a person chose to commit
SMOKE_RATIOS = {r.name: r for r in KEY_RATIOS["smoke"]}


def _gate(argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """``mxa bench ARGV`` (smoke suite, nothing saved): its exit code and what it printed. The time ratios
    are printed without their limits: a test never waits on a timing, which another processor, its core
    count or a busy machine can carry past any limit; the operation counts keep theirs (the same on every
    processor), and ``mxa bench`` run by a person checks both."""
    monkeypatch.setitem(KEY_RATIOS, "smoke", tuple(dataclasses.replace(r, limit=None) if r.quantity == "median_ms"
                                                   else r for r in KEY_RATIOS["smoke"]))
    code = cli.main(["bench", "--suite", "smoke", "--no-save", *argv])
    return code, capsys.readouterr().out


@pytest.mark.slow
def test_smoke_suite_passes_its_limits(tmp_path, capsys, monkeypatch):
    """The CI gate: the smoke suite runs every provider it names (Triton through the interpreter), its
    operation-count ratios stay within their limits, and every key ratio is reported (no baseline)."""
    out, chart = tmp_path / "smoke.json", tmp_path / "speedups.png"
    code, printed = _gate(["--json", str(out), "--chart", str(chart)], capsys, monkeypatch)
    assert code == 0, printed
    records = json.loads(out.read_text())
    assert all(REQUIRED <= set(r) for r in records)
    timed = [r for r in records if r["median_ms"] is not None]
    assert {(c.name, p) for c in SMOKE for p in c.providers} == {(r["case"], r["provider"]) for r in timed}
    fused = [r for r in timed if r["provider"] == "triton"]
    assert fused and all(r["interpreted"] and "aten_ops" not in r for r in fused)  # flagged: not a performance figure
    assert all(r["aten_ops"] > 0 for r in timed if r["provider"] != "triton")
    # every comparison within the runner's mismatch limits (code 0); the tests of each op check precisely
    assert [r for r in timed if r["rel_err"] is not None]
    for name, ratio in SMOKE_RATIOS.items():
        line = next(line for line in printed.splitlines() if line.strip().startswith(f"{name} = "))
        assert (f"limit {ratio.limit:g}: ok" in line) == (ratio.quantity == "aten_ops"), line
    assert chart.stat().st_size > 10_000


def test_the_gate_fails_when_the_crop_loops_over_the_batch_again(monkeypatch, capsys):
    """A real regression: the vectorized crop replaced by the authors' per-sample loop. The operation
    count then equals the loop's, whatever the processor. (The time ratio, the same code timed twice,
    measured 0.87-1.04 against its limit 1.2 here; noise could carry it past, so it is not checked.)"""
    monkeypatch.setattr(sys.modules["mxa_kernels.ops.mxa_branch.reference"], "roi_resample", lambda x, boxes, roi_mode: mxa_kernels.crop_resize_loop(x, boxes))
    code, printed = _gate(["--cases", "mxa_branch_crop", "--repeats", "1"], capsys, monkeypatch)
    assert code == 1
    assert "mxa_branch_loop_over_vectorized_ops = 1.000" in printed
    assert "regression: mxa_branch_loop_over_vectorized_ops" in printed


@pytest.mark.slow
def test_the_gate_fails_on_a_twice_slower_mxa_model(monkeypatch, capsys):
    """A real regression: the MXA model doing its work twice (same output) in training and inference. Its
    operations dispatched per step count it (1.86 against the limit 1.35) whatever the processor; its time
    ratios are reported (2.28 and 2.94 when the limits were set), not checked."""
    features = MXAEfficientVit.forward_features
    monkeypatch.setattr(MXAEfficientVit, "forward_features", lambda self, x: (features(self, x) + features(self, x)) / 2)
    code, printed = _gate(["--cases", "efficientvit_m5", "--repeats", "1"], capsys, monkeypatch)
    assert code == 1 and "regression: mxa_m5_over_plain_train_ops = " in printed
    for name in ("mxa_m5_over_plain_train", "mxa_m5_over_plain_inference"):
        assert f"{name} = " in printed and f"regression: {name} = " not in printed


def _records(ratios: dict[str, float]) -> list[dict]:
    """Records of the smoke suite's key-ratio cases whose key ratios are ``ratios``."""
    records: dict[tuple, dict] = {}
    for name, value in ratios.items():
        ratio = SMOKE_RATIOS[name]
        base = dict(case=ratio.case, mode=ratio.mode, shape=[1], dtype="float32", level="x", device="cpu",
                    commit="c", suite="smoke", median_ms=10.0)
        for provider, figure in ((ratio.denominator, 10.0), (ratio.numerator, 10.0 * value)):
            records.setdefault((ratio.case, ratio.mode, provider), dict(base, provider=provider))[ratio.quantity] = figure
    return list(records.values())


def _check(tmp_path, ratios: dict[str, float], *argv: str) -> int:
    path = tmp_path / "records.json"
    path.write_text(json.dumps(_records(ratios)))
    return cli.main(["bench", "--from-json", str(path), *argv])


def _worse(ratio, value: float, factor: float) -> float:
    """``value`` moved by ``factor`` in the direction that is worse for ``ratio``."""
    return value / factor if ratio.higher_is_better else value * factor


@pytest.mark.parametrize("name", SMOKE_RATIOS)
def test_a_ratio_past_its_limit_fails_the_check(tmp_path, capsys, name):
    ratio = SMOKE_RATIOS[name]
    at_limits = {n: r.limit for n, r in SMOKE_RATIOS.items()}
    assert _check(tmp_path, at_limits) == 0
    assert _check(tmp_path, dict(at_limits, **{name: _worse(ratio, ratio.limit, 1.02)})) == 1
    assert f"regression: {name} = " in capsys.readouterr().out


# The share of each provider's time in BLAS products (aten bmm/mm/addmm/baddbmm), by torch.profiler on
# the 2-core AMD EPYC development machine with MKL: the vectorized crop's batched products are a fifth
# of its time, the loop has none, and the models spend a few per cent there.
BLAS_SHARE = {("mxa_branch_crop", "eager"): 0.207, ("mxa_branch_crop", "per-sample loop"): 0.0,
              ("efficientvit_m5", "eager", "train"): 0.025, ("efficientvit_m5", "timm plain", "train"): 0.018,
              ("efficientvit_m5", "eager", "inference"): 0.035, ("efficientvit_m5", "timm plain", "inference"): 0.021}
# The slowest of seven runs of the current code on another 2-core AMD EPYC with MKL (quoted in the
# issue that asked for portable limits; operation counts were not recorded then).
EPYC_SLOWEST = {"mxa_branch_loop_over_vectorized": 1.60, "mxa_m5_over_plain_train": 1.19,
                "mxa_m5_over_plain_inference": 1.34}


def _blas_twice_as_slow(ratios: dict[str, float]) -> dict[str, float]:
    """``ratios`` on a machine whose BLAS products take twice as long: each time grows by its BLAS share."""
    def share(ratio, provider):
        return BLAS_SHARE.get((ratio.case, provider, ratio.mode), BLAS_SHARE.get((ratio.case, provider)))

    return {name: value * (1 + share(SMOKE_RATIOS[name], SMOKE_RATIOS[name].numerator))
            / (1 + share(SMOKE_RATIOS[name], SMOKE_RATIOS[name].denominator)) for name, value in ratios.items()}


@pytest.mark.parametrize("machine", ["x86-64 2026-11-27", "EPYC slowest", "EPYC, BLAS twice as slow"])
def test_the_limits_hold_on_other_processors(tmp_path, capsys, machine):
    """The current code's figures from other CPUs, and one with a BLAS twice as slow, pass the limits."""
    if machine == "x86-64 2026-11-27":  # the run committed under results/, on the machine of the old baseline
        ratios = runner.key_ratios(json.loads((COMMITTED / "2026-11-27_cpu_smoke.json").read_text()), "smoke")
        assert set(ratios) == set(EPYC_SLOWEST)
    else:
        ratios = EPYC_SLOWEST if machine == "EPYC slowest" else _blas_twice_as_slow(EPYC_SLOWEST)
    assert _check(tmp_path, ratios) == 0, capsys.readouterr().out


def test_a_baseline_from_another_machine_fails_here(tmp_path, capsys):
    """Why a tight baseline is an explicit check and not the gate: the baseline the gate used until now
    (medians of four runs at commit 9dcae84, tolerance 35 %) fails the slowest EPYC run of the same code."""
    old_machine = {"mxa_branch_loop_over_vectorized": 3.16, "mxa_m5_over_plain_train": 1.16,
                   "mxa_m5_over_plain_inference": 1.28}
    baseline = tmp_path / "old-machine.json"
    assert _check(tmp_path, old_machine, "--write-baseline", str(baseline), "--tolerance", "0.35") == 0
    assert _check(tmp_path, EPYC_SLOWEST) == 0
    assert _check(tmp_path, EPYC_SLOWEST, "--baseline", str(baseline)) == 1
    printed = capsys.readouterr().out
    assert "regression: mxa_branch_loop_over_vectorized = 1.600 is past 2.054, this machine's baseline" in printed


def test_a_machine_baseline_catches_a_smaller_regression_than_the_limits(tmp_path, capsys):
    """``--baseline``: a run 20 % worse than this machine's baseline fails, though within the limits."""
    here = {"mxa_branch_loop_over_vectorized": 2.0, "mxa_m5_over_plain_train": 1.15, "mxa_m5_over_plain_inference": 1.3,
            "mxa_branch_loop_over_vectorized_ops": 8.0, "mxa_m5_over_plain_train_ops": 1.2}
    baseline = tmp_path / "baseline.json"
    assert _check(tmp_path, here, "--write-baseline", str(baseline), "--tolerance", "0.15") == 0
    assert _check(tmp_path, here, "--baseline", str(baseline)) == 0
    slower = dict(here, mxa_m5_over_plain_train=1.15 * 1.2)
    assert _check(tmp_path, slower) == 0
    assert _check(tmp_path, slower, "--baseline", str(baseline)) == 1
    assert "regression: mxa_m5_over_plain_train = 1.380 is past 1.32" in capsys.readouterr().out


def test_key_ratios_take_the_last_complete_run(tmp_path):
    """An appended history holds several runs: each ratio comes from one run, the last."""
    first = _records({name: 1.0 for name in SMOKE_RATIOS})
    second = _records({name: 2.0 for name in SMOKE_RATIOS})
    assert set(runner.key_ratios(first + second, "smoke").values()) == {2.0}
    assert set(runner.key_ratios(second + first, "smoke").values()) == {1.0}


def test_a_later_case_of_the_same_shape_keeps_the_earlier_ratios():
    """The full suite times stage 1's windowed attention twice (the second time eager and max-autotune
    only): the ratios over the triton provider come from the first."""
    def record(provider, ms):
        return dict(case="window_attention", mode="forward+backward", provider=provider, median_ms=ms,
                    shape=[256, 64, 14, 14], dtype="bfloat16")

    records = [record("eager", 4.0), record("triton", 1.0), record("torch.compile", 2.0), record("eager", 4.2),
               record("torch.compile max-autotune", 1.5)]
    ratios = runner.key_ratios(records, "full")
    assert ratios["window_attention_eager_over_triton"] == 4.0
    assert ratios["window_attention_compile_over_triton"] == 2.0


def test_time_budget_stops_starting_cases(tmp_path, capsys):
    out = tmp_path / "budget.json"
    assert cli.main(["bench", "--cases", "window_attention,mxa_branch_align", "--providers", "eager", "--no-save",
                     "--time-budget", "0", "--json", str(out)]) == 0
    assert "1 case(s) not run: window_attention" in capsys.readouterr().out
    assert {r["case"] for r in json.loads(out.read_text())} == {"mxa_branch_align"}


def _tree(checkout: Path, package: Path) -> dict[Path, tuple[int, int] | None]:
    """Size and modification time of every file under ``package`` (bytecode caches left out) and at the top
    of ``checkout``, and the folders there."""
    paths = [*(p for p in package.rglob("*") if "__pycache__" not in p.parts), *checkout.iterdir()]
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None for p in paths}


def test_records_are_appended_in_the_current_directory_and_nowhere_in_the_package(tmp_path, monkeypatch):
    """Without --results-dir a run appends its records to DEVICE_SUITE.jsonl in the current directory, and
    writes nothing into the package's folder (bench/ of the checkout, or the installation) or the checkout's
    top level."""
    checkout, package = Path(__file__).parents[1], Path(runner.__file__).parent
    before = _tree(checkout, package)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "--cases", "mxa_branch_align", "--providers", "eager", "--repeats", "1",
                     "--json", "run.json"]) == 0
    after = _tree(checkout, package)
    assert [str(p) for p in before.keys() | after.keys() if before.get(p, "new") != after.get(p, "gone")] == []
    (history,) = tmp_path.glob("*_smoke.jsonl")
    records = [json.loads(line) for line in history.read_text().splitlines()]
    assert records == json.loads((tmp_path / "run.json").read_text())
    assert [(r["case"], r["provider"], r["mode"]) for r in records] == [
        ("mxa_branch_align", "eager", mode) for mode in KERNEL_MODES]


def test_a_ratio_missing_from_the_run_fails_the_check(tmp_path, capsys):
    ratios = {name: ratio.limit for name, ratio in SMOKE_RATIOS.items()}
    baseline = tmp_path / "baseline.json"
    assert _check(tmp_path, ratios, "--write-baseline", str(baseline)) == 0
    records = [r for r in _records(ratios) if r["case"] != "mxa_branch_crop"]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    assert cli.main(["bench", "--from-json", str(path), "--baseline", str(baseline)]) == 1
    assert "mxa_branch_loop_over_vectorized: not measured" in capsys.readouterr().out


def test_write_baseline_round_trips(tmp_path):
    ratios = {name: ratio.limit for name, ratio in SMOKE_RATIOS.items()}
    written = tmp_path / "baseline.json"
    assert _check(tmp_path, ratios, "--write-baseline", str(written), "--tolerance", "0.2") == 0
    assert runner.read_baseline(written)["ratios"] == {name: {"value": v, "tolerance": 0.2} for name, v in ratios.items()}
    assert _check(tmp_path, ratios, "--baseline", str(written)) == 0


@pytest.mark.slow
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


@pytest.mark.slow
def test_triton_compile_runs_the_fused_ops_inside_one_compiled_graph():
    """The `triton+compile` provider: the fused op, and the attention block on the triton backend (training
    and inference), under torch.compile with fullgraph=True (a graph break is an error), here with the
    kernels in Triton's interpreter: every call agrees with eager."""
    cases = [Case("window_attention", "kernel", (2, 20, 14, 14), "float32", KERNEL_MODES, ("eager", "triton+compile"),
                  build_window_attention, op="window_attention", repeats=1),
             Case("cascaded_attention_block", "block", (2, 40, 10, 10), "float32", BLOCK_MODES,
                  ("eager", "triton+compile"), build_cascaded_attention_block, op="cascaded_attention_infer",
                  repeats=1)]
    records = []
    for case in cases:
        runner.run_case(case, torch.device("cpu"), {}, {"copy_gbs": 1.0, "matmul_tflops": {"float32": 1.0}},
                        records.append)
    compiled = [r for r in records if r["provider"] == "triton+compile"]
    assert [(r["case"], r["mode"]) for r in compiled] == [(c.name, m) for c in cases for m in c.modes]
    for r in compiled:
        assert r.get("error") is None and r["rel_err"] is not None and not r["mismatch"], r


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
    (["--stage", "32,4,2,16"], "--stage takes the cost suite's shapes"),
    (["--suite", "cost", "--stage", "30,4,4,16"], "a multiple of HEADS; got 30,4,4,16"),
    (["--suite", "cost", "--batch", "0"], "--batch must be at least 1"),
])
def test_bad_requests_give_one_line_errors(capsys, argv, message):
    assert cli.main(["bench", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mxa: error: ") and message in err and err.count("\n") == 1


def test_the_cost_suite_refuses_the_interpreter_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cli.main(["bench", "--suite", "cost"]) == 1
    err = capsys.readouterr().err
    assert "run it without TRITON_INTERPRET=1" in err and err.count("\n") == 1


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


@pytest.mark.slow
def test_gpu_script_rehearses_on_the_cpu(tmp_path):
    """bench/gpu_check.sh as far as a CPU can run it: card detection, the tests, the full suite (one case,
    batch 2), results named by date and card, copied to $OUT."""
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, ALLOW_CPU="1", PYTHON=sys.executable, RESULTS=str(tmp_path / "results"), OUT=str(out),
               WHEELS_DIR=str(tmp_path / "no-wheels"),
               TESTS="tests/test_bench.py::test_list_shows_the_cases",
               BENCH_ARGS="--batch 2 --repeats 1 --cases window_attention --providers eager,sdpa",
               LOADER_ARGS="--images 6 --img-size 32 --batch 4 --repeats 1",
               TRAIN_ARGS="--images 12 --batch-size 4 --img-size 32 --model mxa_efficientvit_m0 --backend eager "
                          "--compile none --profile-steps 1 --workers 0")
    script = Path(__file__).parents[1] / "bench" / "gpu_check.sh"
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert [n.split("_", 1)[1] for n in names if n.startswith("20")] == [
        "cpu_full.json", "cpu_full.png", "cpu_full.txt", "cpu_loader.json", "cpu_loader.txt", "cpu_tests.txt",
        "cpu_train.txt"]
    trained = next(out.glob("20*_cpu_train.txt")).read_text()
    assert "distilling from" in trained and "profile of steps 3-3 of epoch 1 (after 2 steps, not 3" in trained and " teacher " in trained
    loader = json.loads(next(out.glob("20*_cpu_loader.json")).read_text())
    assert [r["stage"] for r in loader] == ["decode", "worker", "worker_cached", "device_augment"]
    records = json.loads(next(out.glob("20*_cpu_full.json")).read_text())
    expected = sum(len(c.modes) * len({"eager", "sdpa"} & set(c.providers)) for c in FULL if c.name == "window_attention")
    assert {r["provider"] for r in records} == {"eager", "sdpa"} and len(records) == expected
    assert next(out.glob("*_loader.jsonl")).read_text().count("\n") == 4
    history = next(out.glob("*_full.jsonl")).read_text().splitlines()
    assert [json.loads(line) for line in history] == records


@pytest.mark.slow
def test_gpu_script_stops_in_seconds_when_a_requirement_is_missing(tmp_path):
    """A GPU lease is never spent on an import error: with an old timm first on the path, the script
    prints the versions and stops with one line before any test or benchmark."""
    fake = tmp_path / "site"
    (fake / "timm").mkdir(parents=True)
    (fake / "timm" / "__init__.py").write_text("raise ImportError('this timm is a stand-in')\n")
    (fake / "timm-0.9.0.dist-info").mkdir()
    (fake / "timm-0.9.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: timm\nVersion: 0.9.0\n")
    env = dict(os.environ, ALLOW_CPU="1", PYTHON=sys.executable, RESULTS=str(tmp_path / "results"),
               PYTHONPATH=str(fake), WHEELS_DIR=str(tmp_path / "no-wheels"))
    script = Path(__file__).parents[1] / "bench" / "gpu_check.sh"
    started = time.monotonic()
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and time.monotonic() - started < 90
    assert f"torch {version('torch')} (needs >=2.4)" in done.stdout and "timm 0.9.0 (needs >=1.0.31)" in done.stdout
    stop = done.stdout.strip().splitlines()[-1]  # the preflight's output goes to the results too, so to stdout
    assert stop.startswith("gpu_check.sh: cannot run: timm 0.9.0 is installed, the project needs timm>=1.0.31")
    assert "import mxa_model failed: ImportError: this timm is a stand-in" in stop and "bench/gpu_wheels.sh" in stop
    assert not (tmp_path / "results").exists()


def test_preflight_knows_triton_3_6_interpreter_needs_numpy_before_2_4(monkeypatch):
    versions = {"triton": "3.6.0", "numpy": "2.5.1"}
    monkeypatch.setattr(preflight.importlib.metadata, "version", versions.get)
    assert preflight._interpreter_problems() == [
        "Triton 3.6.0's interpreter cannot run with NumPy 2.5.1: rehearse with numpy<2.4"]
    versions.update(numpy="2.3.5")
    assert preflight._interpreter_problems() == []
    versions.update(triton="3.8.0", numpy="2.5.1")
    assert preflight._interpreter_problems() == []


def test_limits_apply_at_the_suites_shapes_and_a_whole_run_must_measure_them(tmp_path, capsys):
    at_limits = {name: ratio.limit for name, ratio in SMOKE_RATIOS.items()}
    past = dict(at_limits, mxa_branch_loop_over_vectorized_ops=1.7)  # what the loop's count gives at B = 8
    assert _check(tmp_path, past) == 1
    assert _check(tmp_path, past, "--batch", "8") == 0
    assert "not checked at --batch 8" in capsys.readouterr().out
    missing = runner.check_ratios({}, "smoke", None, complete=True)
    assert len(missing) == len(SMOKE_RATIOS) and all("not measured in this run" in m for m in missing)
    assert runner.check_ratios({}, "smoke", None) == []  # a narrowed run (--cases, --providers) need not


def test_a_gradient_that_is_zero_in_the_reference_is_judged_on_the_others_scale():
    """At initialization timm's zero residual BatchNorms make many gradients exactly zero: rounding noise
    over them is no mismatch, a real value is."""
    want = [torch.ones(100), torch.zeros(10)]
    assert runner._rel_err([torch.ones(100), torch.full((10,), 1e-12)], want) < 1e-6
    assert runner._rel_err([torch.ones(100), torch.full((10,), 0.1)], want) > 1e3
    assert runner._rel_err([torch.ones(100) * 1.01, torch.zeros(10)], want) == pytest.approx(0.01)
    assert runner._rel_err(torch.full((3,), 1e-9), torch.zeros(3)) > 1e10  # a single output: no other scale


def test_suites_time_every_registered_op():
    """Each case names the op it times (mxa_kernels.OPS), models none; each op is timed by the smoke and
    the full suite, in the cases its registry entry lists."""
    for case in SMOKE + FULL:
        assert (case.op is None) == (case.level == "model"), case.name
        assert case.op is None or case.op in mxa_kernels.OPS, case.name
    for name, op in mxa_kernels.OPS.items():
        assert {c.name for c in SMOKE + FULL if c.op == name} == set(op.bench_cases), name
        assert any(c.op == name for c in SMOKE) and any(c.op == name for c in FULL), name
