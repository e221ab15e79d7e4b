"""The GPU cost report (bench/cost.py): its counts against hand-computed ones on small cases, and the CI
gate: the report at M5's shapes, built for sm_90 and sm_80, is no worse than the committed baseline."""

import json
import os
import subprocess
import sys

import pytest
import torch

import mxa_kernels
from mxa_bench import cost

FP32 = 4


def meta(*shape, dtype=torch.float32):
    return torch.empty(shape, device="meta", dtype=dtype)


def test_counter_counts_launching_ops_and_their_bytes():
    a, b = meta(8, 16), meta(16, 4)
    count, launches = cost.count_pass(lambda: torch.relu(a.t().t() @ b).reshape(32).clone())
    # views (t, reshape of a contiguous tensor) launch nothing; mm, relu and clone do
    assert [name for name, _ in count.ops] == ["mm", "relu", "clone"] and not launches
    assert count.bytes == (8 * 16 + 16 * 4 + 8 * 4) * FP32 + 2 * 8 * 4 * FP32 + 2 * 32 * FP32


def test_window_attention_counts_by_hand():
    """B = 2, 14x14 maps (four 7x7 windows each), 16-wide heads, float32 (no casts)."""
    q, k, v = meta(2, 16, 14, 14), meta(2, 16, 14, 14), meta(2, 16, 14, 14)
    args = (q, k, v, meta(49), meta(49, 49, dtype=torch.int64), 7, 0.25)
    eager, _ = cost.count_pass(cost.eager_passes(mxa_kernels.OPS["window_attention"], args)["forward"])
    # three window partitions (permuted copies), q^T k, * scale, bias[idx], + bias, softmax, v p^T, the
    # partition's reverse
    assert [n for n, _ in eager.ops] == ["clone"] * 3 + ["bmm", "mul", "index", "add", "_softmax", "bmm", "clone"]
    maps = 2 * 16 * 196 * FP32
    assert eager.ops[0][1] == 2 * maps and eager.ops[3][1] == 2 * maps + 8 * 49 * 49 * FP32
    passes = mxa_kernels.OPS["window_attention"].kernels_module().launch_passes(*args)
    forward, launches = cost.count_pass(passes["forward"])
    assert [n for n, _ in forward.ops] == ["_to_copy"]  # the int64 index to the kernel's int32
    assert forward.bytes == 49 * 49 * (8 + 4)
    (launch,) = launches
    rows = 8 * 2 * 64 * FP32  # per window: each score row's maximum and sum, 64 padded tokens
    assert launch.name == "window_attention_fwd_kernel" and launch.grid == (8,)
    assert launch.bytes == 4 * maps + 49 * FP32 + 49 * 49 * 4 + rows  # q, k, v, out, bias, index, rows
    backward, launches = cost.count_pass(passes["backward"])
    assert [n for n, _ in backward.ops] == ["_to_copy", "sum"]  # the index again; the bias gradient's window sum
    (launch,) = launches
    # q, k, v, grad out, bias, index, rows in; grad q, k, v and per-window bias gradients out
    assert launch.bytes == 7 * maps + 49 * FP32 + 49 * 49 * 4 + rows + 8 * 49 * FP32


def test_mxa_branch_fused_counts_by_hand():
    """B = 2, 4 channels, 3x3 maps, align mode: one forward launch; two backward launches with the
    channel-attention MLP's backward and the weight and box sums between them."""
    x, boxes, w1, w2, ws = meta(2, 4, 3, 3), meta(2, 4), meta(1, 4, 1, 1), meta(4, 1, 1, 1), meta(1, 2, 7, 7)
    passes = mxa_kernels.OPS["mxa_branch"].kernels_module().launch_passes(x, boxes, w1, w2, ws, "align")
    forward, launches = cost.count_pass(passes["forward"])
    assert not forward.ops
    (launch,) = launches
    assert launch.name == "mxa_branch_fwd_kernel" and launch.grid == (2,)
    maps, per_channel, per_pixel = 2 * 4 * 9 * FP32, 2 * 4 * FP32, 2 * 9 * FP32
    # x, boxes, the two channel-attention weights and the 7x7 one, out; pooled, hidden, channel weights,
    # max/mean, argmax, spatial weights
    assert launch.bytes == (maps + 2 * 4 * FP32 + 2 * 4 * FP32 + 98 * FP32 + maps
                            + per_channel + 2 * FP32 + per_channel + 2 * per_pixel + per_pixel + per_pixel)
    backward, launches = cost.count_pass(passes["backward"])
    assert [n for n, _ in backward.ops] == ["mul", "rsub", "mul", "clamp", "mm", "mm", "gt", "mul", "mm", "mm",
                                            "sum", "sum"]
    assert [(t.name, t.grid) for t in launches] == [("mxa_branch_bwd_channel_kernel", (2,)),
                                                   ("mxa_branch_bwd_input_kernel", (2, 1))]


def test_cascaded_attention_fused_counts_by_hand():
    """One launch, one program per (padded) window; the scratch buffers count as traffic."""
    x = meta(2, 8, 5, 3)
    args = (x, meta(2, 10, 4), meta(2, 10), meta(2, 3, 3, 3), meta(2, 3), meta(2, 4), meta(4, 4, dtype=torch.int32),
            meta(8, 8), meta(8), 2, 0.5)
    passes = mxa_kernels.OPS["cascaded_attention_infer"].kernels_module().launch_passes(*args)
    assert list(passes) == ["forward"]
    count, (launch,) = cost.count_pass(passes["forward"])
    assert not count.ops and launch.grid == (2 * 3 * 2,)  # 5x3 padded to 6x4: 3x2 windows of 2x2
    params = (2 * 10 * 4 + 2 * 10 + 2 * 27 + 2 * 3 + 2 * 4 + 64 + 8) * FP32 + 16 * 4
    scratch = 12 * 16 * 16 * FP32 + 12 * 2 * 16 * 16 * FP32  # q per window (16 x 16), each head's output
    assert launch.bytes == 2 * x.numel() * FP32 + params + scratch


def test_every_registered_op_has_cost_cases():
    assert set(cost.CASES) == set(mxa_kernels.OPS)


def test_regressions_name_worse_and_better_figures():
    record = dict(op="o", case="c", pass_="forward", eager_launches=5, eager_bytes=10, fused_launches=1,
                  fused_bytes=4, targets=["sm_90"],
                  triton=[dict(kernel="k", programs=8, sm_90=dict(registers=100, spill_bytes=0, resident=2))])
    record["pass"] = record.pop("pass_")
    assert cost.regressions([record], [record]) == ([], [])
    worse = json.loads(json.dumps(record))
    worse["fused_launches"], worse["triton"][0]["sm_90"]["resident"] = 2, 1
    worse["eager_bytes"] = 8  # better
    found, better = cost.regressions([worse], [record])
    assert found == ["o c forward fused_launches: 1 -> 2", "o c forward k sm_90 resident: 2 -> 1"]
    assert better == ["o c forward eager_bytes: 10 -> 8"]
    assert cost.regressions([], [record])[0] == ["o c forward: in the baseline, not measured"]


@pytest.mark.slow
def test_cost_report_is_no_worse_than_the_baseline(tmp_path):
    """The CI gate: every op, case and pass at M5's shapes, built for sm_90 and sm_80, in a process
    without the interpreter (the report builds kernels for GPU targets)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "cost.json"
    result = subprocess.run([sys.executable, "-m", "mxa_model.cli", "bench", "--suite", "cost", "--json", str(out)],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    records = json.loads(out.read_text())
    assert {r["op"] for r in records} == set(mxa_kernels.OPS)
    assert all(t["sm_90"]["registers"] > 0 and t["sm_80"]["registers"] > 0 for r in records for t in r["triton"])
    assert "0 figure(s) worse" in result.stdout
