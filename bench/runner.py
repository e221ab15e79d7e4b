"""``mxa bench``: run a suite, print its table, keep its records, check its key ratios.

Every record has ``case``, ``level``, ``provider``, ``mode``, ``shape``, ``dtype``, ``median_ms``,
``device``, ``commit`` (and ``torch``, ``date``, ``suite``), plus where they apply ``images_per_s``,
``peak_mem_mb`` (CUDA), ``gbs`` and ``fraction_of_copy`` (kernels: the least traffic the op must make
over the time), ``tflops`` and ``fraction_of_matmul`` (FLOPs of the reference provider counted by
``torch.utils.flop_counter``), ``aten_ops`` (the operations one call dispatches; not counted for
compiled or interpreted providers), ``speedup`` over the case's reference provider, ``rel_err`` of the
output against the reference's, ``interpreted`` (Triton interpreter: not a performance figure), and
``error`` or ``skipped`` with the reason instead of a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from . import timing
from .cases import COMPILED, OTHER_MODELS, PROVIDERS, TRITON_PROVIDERS, Case
from .suites import KEY_RATIOS, SUITES, KeyRatio

# largest relative error against the reference provider's result before a record is a mismatch: a
# sanity check against garbage (the tests check precisely, against float64). Half-precision gradients
# are loose: the bf16 eager MXA branch's own weight gradients differ from float32 by up to 17 %.
REL_ERR_LIMIT = {"outputs": {"float32": 1e-4, "float16": 5e-2, "bfloat16": 5e-2},
                 "gradients": {"float32": 1e-3, "float16": 0.25, "bfloat16": 0.25}}
GRADIENT_MODES = ("forward+backward", "train")


class BenchError(ValueError):
    """A request the runner cannot serve (unknown case or provider, unreadable baseline)."""


def select_cases(suite: str, names: str | None, providers: str | None, batch: int | None) -> list[Case]:
    """The suite's cases, filtered by case names and providers (comma lists), with another batch size."""
    cases = list(SUITES[suite])
    if names:
        wanted = {n.strip() for n in names.split(",")}
        unknown = wanted - {c.name for c in cases}
        if unknown:
            raise BenchError(f"suite {suite} has no case {', '.join(sorted(unknown))}; "
                             f"it has {', '.join(sorted({c.name for c in cases}))}")
        cases = [c for c in cases if c.name in wanted]
    if providers:
        wanted = {p.strip() for p in providers.split(",")}
        unknown = wanted - set(PROVIDERS)
        if unknown:
            raise BenchError(f"unknown provider {', '.join(sorted(unknown))}; providers: {', '.join(PROVIDERS)}")
        cases = [dataclasses.replace(c, providers=tuple(p for p in c.providers if p in wanted)) for c in cases]
        cases = [c for c in cases if c.providers]
    if batch is not None:
        cases = [dataclasses.replace(c, shape=(batch, *c.shape[1:])) for c in cases]
    return cases


def _short_error(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _rel_err(got, want, floor: float = 1e-30) -> float | None:
    """||got - want|| / ||want|| of an output, or the largest over a list of gradients, whose norms are
    floored at a millionth of the largest one's: a gradient that is exactly zero in the reference (as
    behind timm's zero-initialized residual BatchNorms at initialization) is judged on the scale of the
    others, not by its rounding noise over zero."""
    if isinstance(got, (list, tuple)) and isinstance(want, (list, tuple)) and len(got) == len(want):
        scale = max((float(w.float().norm()) for w in want if isinstance(w, torch.Tensor)), default=0.0)
        errors = [_rel_err(g, w, max(1e-6 * scale, floor)) for g, w in zip(got, want)]
        return max((e for e in errors if e is not None), default=None)
    if not isinstance(got, torch.Tensor) or not isinstance(want, torch.Tensor) or got.shape != want.shape:
        return None
    want = want.float()
    return float((got.float() - want).norm() / want.norm().clamp_min(floor))


class _OpCounter(TorchDispatchMode):
    """Counts the operations that reach the dispatcher, the backward's included."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _count_work(fn: Callable[[], object]) -> tuple[int, int]:
    """FLOPs (``torch.utils.flop_counter``) and dispatched operations of one call of ``fn``."""
    flops, ops = FlopCounterMode(display=False), _OpCounter()
    with flops, ops:  # the op counter innermost: it sees the calls made, not the flop counter's own
        fn()
    return flops.get_total_flops(), ops.count


def _guarded(errors: dict, key, device: torch.device, fn: Callable[[], object]):
    """``fn()``, or None with the error kept in ``errors[key]``: one provider failing (a compilation
    error, running out of memory) must not lose the others' figures."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        errors[key] = _short_error(exc)
        if os.environ.get("MXA_BENCH_TRACEBACK"):
            traceback.print_exc()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None


def _seconds(calls: dict[str, Callable], interpreted: set[str], repeats: int, device: torch.device,
             errors: dict, mode: str) -> dict[str, float]:
    """Median seconds per call: do_bench per provider on a GPU; on the CPU the providers interleaved
    (each on its own if one of them fails), Triton interpreter calls once."""
    if device.type == "cuda":
        found = {p: _guarded(errors, (p, mode), device, lambda fn=fn: timing.gpu_median(fn)) for p, fn in calls.items()}
        return {p: t for p, t in found.items() if t is not None}
    timed = {p: fn for p, fn in calls.items() if p not in interpreted}
    found = _guarded({}, None, device, lambda: timing.interleaved_medians(timed, repeats=repeats, warmup=1))
    if found is None:
        found = {p: _guarded(errors, (p, mode), device, lambda fn=fn: timing.interleaved_medians(
            {p: fn}, repeats=repeats, warmup=1)[p]) for p, fn in timed.items()}
    found.update(timing.interleaved_medians({p: calls[p] for p in interpreted}, repeats=1, warmup=0))
    return {p: t for p, t in found.items() if t is not None}


def _detached(value):
    """A copy of a call's result that later calls cannot overwrite (CUDA graphs reuse their outputs)."""
    if isinstance(value, (list, tuple)):
        return [_detached(v) for v in value]
    return value.detach().clone() if isinstance(value, torch.Tensor) else None


def run_case(case: Case, device: torch.device, common: dict, ceilings: dict,
             emit: Callable[[dict], None], repeats: int | None = None) -> None:
    """Build ``case`` and time each of its modes for every provider, calling ``emit`` with each record."""
    torch._dynamo.reset()  # each case compiles afresh: no cache limit reached across cases
    work = case.build(case, device, case.providers)
    for provider, reason in work.skipped.items():
        emit(dict(common, case=case.name, level=case.level, provider=provider, mode=None, shape=list(case.shape),
                  dtype=case.dtype, median_ms=None, skipped=reason))
    # First call of every provider in every mode, before any timing: it checks the provider (and
    # compiles it), and its result (output, or gradients) is compared with the reference provider's.
    # Training calls change state (BatchNorm statistics, weights), so this is where every provider has
    # made the same calls.
    errors: dict[tuple[str, str], str] = {}
    rel_errs: dict[tuple[str, str], float | None] = {}
    for mode in case.modes:
        reference_result = None
        for provider, modes in work.calls.items():
            if mode not in modes:
                continue
            result = _guarded(errors, (provider, mode), device, lambda: _detached(modes[mode]()))
            if (provider, mode) in errors or provider in OTHER_MODELS:
                continue
            if reference_result is None:
                reference_result = result
            else:
                rel_errs[provider, mode] = _rel_err(result, reference_result)
        del reference_result
    for mode in case.modes:
        calls = {p: modes[mode] for p, modes in work.calls.items() if mode in modes and (p, mode) not in errors}
        interpreted = {p for p in calls if p in TRITON_PROVIDERS and device.type != "cuda"}
        seconds = _seconds(calls, interpreted, repeats or case.repeats, device, errors, mode)
        reference = next((p for p in case.providers if p in seconds), None)
        # counted in one more call, outside the timing (a failure there loses the counts, not the time);
        # compiled code is not dispatched op by op
        work_done = {p: _guarded({}, None, device, lambda fn=fn: _count_work(fn)) for p, fn in calls.items()
                     if p in seconds and p not in interpreted and p not in COMPILED}
        kind = "gradients" if mode in GRADIENT_MODES else "outputs"
        for provider in work.calls:
            if mode not in work.calls[provider]:
                continue
            record = dict(common, case=case.name, level=case.level, provider=provider, mode=mode,
                          shape=list(case.shape), dtype=case.dtype, reference=reference)
            if (provider, mode) in errors or provider not in seconds:
                emit(dict(record, median_ms=None, error=errors.get((provider, mode), "not timed")))
                continue
            t = seconds[provider]
            rel_err = rel_errs.get((provider, mode))
            record.update(median_ms=t * 1e3, speedup=seconds[reference] / t, rel_err=rel_err, compared=kind,
                          peak_mem_mb=_guarded({}, None, device, lambda: timing.peak_memory_mb(calls[provider], device)),
                          interpreted=provider in interpreted)
            if rel_err is not None:
                record["mismatch"] = rel_err > REL_ERR_LIMIT[kind][case.dtype]
            if work_done.get(provider):
                record["aten_ops"] = work_done[provider][1]
            if case.level == "model":
                record["images_per_s"] = case.batch / t
            if mode in work.bytes_moved:
                record["gbs"] = work.bytes_moved[mode] / t / 1e9
                record["fraction_of_copy"] = record["gbs"] / ceilings["copy_gbs"]
            # the work is the reference's computation (another model counts its own)
            count = (work_done.get(provider if provider in OTHER_MODELS else reference) or (0,))[0]
            if count:
                record["tflops"] = count / t / 1e12
                record["fraction_of_matmul"] = record["tflops"] / ceilings["matmul_tflops"][case.dtype]
            emit(record)


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_record(r: dict) -> str:
    shape = "x".join(map(str, r["shape"]))
    head = f"{r['level']:>6} {r['case']:<22} {shape:<16} {r['dtype']:<8} {str(r['mode'] or ''):<16} {r['provider']:<27}"
    if r.get("skipped"):
        return f"{head} skipped: {r['skipped']}"
    if r.get("error"):
        return f"{head} ERROR {r['error']}"
    rate = ""
    if r.get("gbs") is not None:
        rate = f"{r['gbs']:8.1f} GB/s ({r['fraction_of_copy']:6.1%} copy)"
    elif r.get("tflops") is not None:
        rate = f"{r['tflops']:8.3f} TFLOP/s ({r['fraction_of_matmul']:6.1%} mm)"
    return (f"{head} {r['median_ms']:10.3f} ms {r['speedup']:6.2f}x "
            f"{_cell(r.get('images_per_s'), '9.1f') + ' img/s' if r.get('images_per_s') else ' ' * 15} {rate:<32}"
            f" mem {_cell(r.get('peak_mem_mb'), '.0f'):>6} MB  err {_cell(r.get('rel_err'), '.1e'):>7}"
            f"  ops {_cell(r.get('aten_ops'), 'd'):>6}"
            f"{' MISMATCH' if r.get('mismatch') else ''}"
            f"{'  (interpreter: not a speed)' if r.get('interpreted') else ''}")


TABLE_HEADER = (f"{'level':>6} {'case':<22} {'shape':<16} {'dtype':<8} {'mode':<16} {'provider':<27} {'median':>13} "
                f"{'vs ref':>7} {'':<15} {'achieved (fraction of ceiling)':<32} peak memory, rel. error vs ref, "
                "operations dispatched")


def key_ratios(records: list[dict], suite: str) -> dict[str, float]:
    """The suite's key ratios found in ``records``, both figures from one (case, shape, dtype, mode) and,
    when records of several runs or shapes are given, from the last such group holding both providers."""
    found = {}
    for ratio in KEY_RATIOS.get(suite, ()):
        groups: list[tuple[tuple, dict[str, float]]] = []  # in the records' order
        for r in records:
            if (r["case"] == ratio.case and r["mode"] == ratio.mode and r.get(ratio.quantity)
                    and (ratio.shape is None or tuple(r["shape"]) == ratio.shape)):
                key = (tuple(r["shape"]), r["dtype"])
                current = next((g for k, g in reversed(groups) if k == key), None)
                if current is None or r["provider"] in current:  # another run (or suite case) of this group
                    current = {}
                    groups.append((key, current))
                current[r["provider"]] = r[ratio.quantity]
        complete = [g for _, g in groups if ratio.numerator in g and ratio.denominator in g]
        if complete:
            found[ratio.name] = complete[-1][ratio.numerator] / complete[-1][ratio.denominator]
    return found


def _within(value: float, limit: float, ratio: KeyRatio) -> bool:
    return value >= limit if ratio.higher_is_better else value <= limit


def check_ratios(ratios: dict[str, float], suite: str, baseline: dict | None, limits: bool = True,
                 complete: bool = False) -> list[str]:
    """Print each key ratio against its limit (unless ``limits`` is off: another batch size than the
    suite's), its baseline (within its tolerance; when one is given) and its target (reported only);
    return the failures. In a ``complete`` run (the whole suite) a ratio with a limit must be there."""
    failures = []
    definitions: dict[str, KeyRatio] = {r.name: r for r in KEY_RATIOS.get(suite, ())}
    expected = (baseline or {}).get("ratios", {})
    wanted = set(expected) | ({n for n, r in definitions.items() if r.limit is not None} if complete and limits else set())
    failures += [f"{name}: not measured in this run (its providers did not both run)"
                 for name in sorted(wanted - set(ratios))]
    for name, value in ratios.items():
        ratio = definitions[name]
        better = "higher" if ratio.higher_is_better else "lower"
        line = f"  {name} = {value:.3f} ({ratio.meaning}; {better} is better)"
        if ratio.limit is not None and limits:
            ok = _within(value, ratio.limit, ratio)
            line += f"; limit {ratio.limit:g}: {'ok' if ok else 'REGRESSION'}"
            if not ok:
                failures.append(f"{name} = {value:.3f} is past its limit {ratio.limit:g} (set across machines)")
        if name in expected:
            ref, tol = expected[name]["value"], expected[name]["tolerance"]
            limit = ref * (1 - tol) if ratio.higher_is_better else ref * (1 + tol)
            ok = _within(value, limit, ratio)
            line += f"; baseline {ref:.3f} within {tol:.0%} ({limit:.3f}): {'ok' if ok else 'REGRESSION'}"
            if not ok:
                failures.append(f"{name} = {value:.3f} is past {limit:.3f}, this machine's baseline {ref:.3f} "
                                f"within {tol:.0%}")
        if ratio.target is not None:
            line += f"; target {ratio.target}: {'met' if value >= ratio.target else 'NOT met'}"
        print(line)
    return failures


def read_baseline(path: str | os.PathLike) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchError(f"cannot read baseline {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("ratios"), dict) or not all(
            isinstance(v, dict) and {"value", "tolerance"} <= set(v) for v in data["ratios"].values()):
        raise BenchError(f"baseline {path} has no 'ratios' of the form {{name: {{value, tolerance}}}}")
    return data


def write_baseline(path: str | os.PathLike, ratios: dict[str, float], suite: str, env: dict, tolerance: float) -> None:
    data = {"suite": suite, "measured": {k: env.get(k) for k in ("commit", "date", "device", "torch")},
            "ratios": {name: {"value": round(v, 4), "tolerance": tolerance} for name, v in ratios.items()}}
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote baseline {path}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def read_records(path: str | os.PathLike) -> list[dict]:
    try:
        text = Path(path).read_text()
        records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchError(f"cannot read benchmark records {path}: {exc}") from exc
    if not all(isinstance(r, dict) and {"case", "provider", "mode", "median_ms"} <= set(r) for r in records):
        raise BenchError(f"{path} does not hold benchmark records (dicts with case, provider, mode, median_ms)")
    return records


def main(args: argparse.Namespace) -> int:
    if args.suite == "loader":  # the input pipeline, per image: bench/loader.py
        from .loader import main as loader_report

        return loader_report(args)
    loader_flags = [flag for name, flag in (("data", "--data"), ("make_data", "--make-data"),
                                            ("img_size", "--img-size"), ("images", "--images"),
                                            ("target_images_per_s", "--target-images-per-s"))
                    if getattr(args, name, None) is not None]
    if loader_flags:
        raise BenchError(f"{', '.join(loader_flags)}: the loader suite's flags (--suite loader)")
    predict_flags = [flag for name, flag in (("card", "--card"), ("models", "--models")) if getattr(args, name, None)]
    if predict_flags and args.suite != "predict":
        raise BenchError(f"{', '.join(predict_flags)}: the predict suite's flags (--suite predict)")
    if args.suite == "predict":  # a time model, calibrated on published tables: bench/predict.py
        from .predict import main as predict_report

        return predict_report(args)
    if args.suite == "cost":  # static figures, nothing timed
        from .cost import main as cost_report

        return cost_report(args)
    if args.stage:
        raise BenchError("--stage takes the cost suite's shapes (--suite cost); the other suites have their cases")
    if args.batch is not None and args.batch < 1:
        raise BenchError(f"--batch must be at least 1, got {args.batch}")
    if args.repeats is not None and args.repeats < 1:
        raise BenchError(f"--repeats must be at least 1, got {args.repeats}")
    baseline = read_baseline(args.baseline) if args.baseline else None
    if args.from_json:
        records = read_records(args.from_json)
        suite = records[0].get("suite", args.suite) if records else args.suite
    else:
        records, suite = run_suite(args), args.suite
        if records is None:
            return 0
    errors = [r for r in records if r.get("error")]
    # Triton's interpreter multiplies bf16 dot products wrongly (triton issue 11584): its bf16
    # mismatches are reported but do not fail the run
    mismatches = [r for r in records if r.get("mismatch") and not (r.get("interpreted") and r["dtype"] == "bfloat16")]
    ratios = key_ratios(records, suite)
    if ratios or baseline:
        print("key ratios:")
    if args.batch is not None and any(r.limit is not None for r in KEY_RATIOS.get(suite, ())):
        print(f"  (the limits are set for the suite's own batch sizes: not checked at --batch {args.batch})")
    measured_on = (baseline or {}).get("measured", {}).get("device")
    if measured_on and records and measured_on != records[-1].get("device"):
        print(f"  note: the baseline was measured on {measured_on}, this run on {records[-1].get('device')}: "
              "time ratios differ between machines")
    complete = not (args.from_json or args.cases or args.providers)
    failures = check_ratios(ratios, suite, baseline, limits=args.batch is None, complete=complete)
    if args.write_baseline:
        write_baseline(args.write_baseline, ratios, suite, records[0] if records else {}, args.tolerance)
    if args.chart:
        from .chart import speedup_chart

        speedup_chart(records, args.chart)
        print(f"wrote {args.chart}")
    for failure in failures:
        print(f"regression: {failure}")
    if errors:
        print(f"{len(errors)} provider call(s) failed; see ERROR above")
    for r in mismatches:
        print(f"mismatch: {r['case']} {r['shape']} {r['dtype']} {r['mode']} {r['provider']}: relative error "
              f"{r['rel_err']:.2e} of its {r['compared']} against {r['reference']} "
              f"(limit {REL_ERR_LIMIT[r['compared']][r['dtype']]:.0e})")
    return 1 if failures or errors or mismatches else 0


def run_suite(args: argparse.Namespace) -> list[dict] | None:
    """Run the selected cases, printing each record as it is measured; None when only listing."""
    cases = select_cases(args.suite, args.cases, args.providers, args.batch)
    if args.list:
        for case in cases:
            print(f"{case.level:>6} {case.name:<22} {'x'.join(map(str, case.shape)):<16} {case.dtype:<8} "
                  f"modes {', '.join(case.modes)}; providers {', '.join(case.providers)}")
        return None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda asked for, but no CUDA device is available")
    env = timing.environment(device)
    ceilings = {"copy_gbs": timing.copy_bandwidth_gbs(device),
                "matmul_tflops": {d: timing.matmul_tflops(device, getattr(torch, d)) for d in sorted({c.dtype for c in cases})}}
    print(f"suite {args.suite} on {env['device']} (torch {env['torch']}, commit {env['commit']}): "
          f"copy {ceilings['copy_gbs']:.1f} GB/s; matmul "
          + ", ".join(f"{d} {v:.2f} TFLOP/s" for d, v in ceilings["matmul_tflops"].items()), flush=True)
    if device.type != "cuda":
        print("CPU run: compare ratios measured side by side, not absolute times; Triton runs in its interpreter "
              "(TRITON_INTERPRET=1) or not at all here")
    common = dict(env, suite=args.suite, copy_gbs=ceilings["copy_gbs"])
    history = None
    if not args.no_save:
        history = Path(args.results_dir) / f"{_slug(env['device'])}_{args.suite}.jsonl"
        history.parent.mkdir(parents=True, exist_ok=True)
    records = []

    def emit(record: dict) -> None:
        records.append(record)
        print(format_record(record), flush=True)
        if history is not None:  # appended as measured, so a run cut short keeps what it measured
            with history.open("a") as f:
                f.write(json.dumps(record) + "\n")

    print(TABLE_HEADER)
    started = time.monotonic()
    for i, case in enumerate(cases, 1):
        if i > 1 and args.time_budget is not None and time.monotonic() - started > args.time_budget:
            print(f"time budget of {args.time_budget:.0f} s spent: {len(cases) - i + 1} case(s) not run: "
                  + ", ".join(f"{c.name} {'x'.join(map(str, c.shape))} {c.dtype}" for c in cases[i - 1:]))
            break
        print(f"[{i}/{len(cases)}] {case.level} {case.name} {tuple(case.shape)} {case.dtype}", flush=True)
        run_case(case, device, common, ceilings, emit, repeats=args.repeats)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(records, indent=2) + "\n")
        print(f"wrote {args.json}")
    if history is not None:
        print(f"appended {len(records)} records to {history}")
    return records
