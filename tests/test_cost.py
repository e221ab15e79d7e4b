"""The GPU cost report (bench/cost.py): its counts against hand-computed ones on small cases, and the CI
gate: the report at M5's shapes, built for sm_90 and sm_80, is no worse than the committed baseline."""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

import mxa_kernels
from mxa_bench import cost
from mxa_bench.arguments import stage

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
    assert forward.ops == []  # the int64 index is read as it is: no conversion
    bias, attention = launches
    # the dense bias of 64 padded tokens; the backward's plan: the pairs in offset order, each of 64 offsets'
    # first and last pair
    tile, plan = 64 * 64 * FP32, (64 * 64 + 2 * 64) * 4
    assert bias.name == "window_bias_kernel" and bias.grid == (1,)
    assert bias.bytes == 49 * FP32 + 49 * 49 * 8 + tile  # the table and the int64 index in, the tile out
    rows = 8 * 2 * 64 * FP32  # per window: each score row's maximum and reciprocal sum, 64 padded tokens
    assert attention.name == "window_attention_fwd_kernel" and attention.grid == (8,)
    assert attention.bytes == 4 * maps + tile + rows  # q, k, v, out, the bias tile, rows
    backward, launches = cost.count_pass(passes["backward"])
    assert [n for n, _ in backward.ops] == ["sum"]  # the bias gradient's window sum
    (launch,) = launches
    # q, k, v, grad out, tile, plan, rows in; grad q, k, v and per-window gradients of 64 offsets out
    assert launch.bytes == 7 * maps + tile + plan + rows + 8 * 64 * FP32
    # no loop: the bias gradient is a sort-ordered prefix sum, not a walk over the table's offsets
    assert cost.loop_trips(launch) == []


# the align mode's interpolation matrix of one axis (align_resize_matrix, then _two_tap_matrix)
ALIGN_AXIS = ["arange", "mul", "sub", "add", "sub", "mul", "add", "clamp",  # src: lo*size - 0.5 + (out + 0.5)(hi - lo)
              "floor", "_to_copy", "clamp", "sub", "add", "clamp",  # i0 (floor, to long, clamp), lam, i1
              "arange", "eq", "rsub", "mul", "eq", "mul", "add"]  # (columns == i0)(1 - lam) + (columns == i1) lam
CHANNEL_SPATIAL = ["mean", "convolution", "relu", "convolution", "sigmoid", "mul",  # channel attention
                   "max", "mean", "cat", "convolution", "sigmoid", "mul"]  # spatial attention


def test_mxa_branch_eager_counts_by_hand():
    """B = 2, 4 channels, 3x3 maps, float32: the align forward and the crop backward (no box gradient)."""
    x, w1, w2, ws = meta(2, 4, 3, 3), meta(1, 4, 1, 1), meta(4, 1, 1, 1), meta(1, 2, 7, 7)
    op = mxa_kernels.OPS["mxa_branch"]
    forward, _ = cost.count_pass(cost.eager_passes(op, (x, meta(2, 4), w1, w2, ws, "align"))["forward"])
    # rows, cols, the column pass (bmm), the einsum's row pass (a permuted copy, bmm), the attentions
    assert [n for n, _ in forward.ops] == ALIGN_AXIS * 2 + ["bmm", "clone", "bmm"] + CHANNEL_SPATIAL
    maps = 2 * 4 * 9  # elements of x and of every (B, C, H, W) map
    by_position = dict(enumerate(forward.ops))
    assert by_position[42] == ("bmm", (maps + 2 * 9 + maps) * FP32)  # x, cols (B, 3, 3), out
    assert by_position[43] == ("clone", 2 * maps * FP32)
    assert by_position[45] == ("mean", (maps + 8) * FP32)  # the channel means (B, C)
    assert by_position[53] == ("cat", (2 * 18 + 36) * FP32)  # channel max and mean (B, 1, H, W) each
    assert by_position[56] == ("mul", (maps + 18 + maps) * FP32)  # z times the spatial weights (B, 1, H, W)
    passes = cost.eager_passes(op, (x, meta(2, 4), w1, w2, ws, "crop"))
    cost.count_pass(passes["forward"])
    backward, _ = cost.count_pass(passes["backward"])
    assert [n for n, _ in backward.ops] == [
        "mul", "mul", "sum", "sigmoid_backward", "convolution_backward",  # out = z2 * sigmoid(conv(stats))
        "div", "add",  # the channel mean's gradient, added to z2's
        "new_zeros", "scatter", "add",  # the channel max's: to the maximal channel
        "mul", "mul", "sum", "sigmoid_backward", "convolution_backward", "threshold_backward",
        "convolution_backward",  # z2 = z * sigmoid(W2 relu(W1 mean(z)))
        "div", "add",  # the spatial mean's gradient, added to z's
        "bmm", "clone", "bmm"]  # the row pass, the einsum's copy back, the column pass
    assert backward.ops[8] == ("scatter", (maps + 18 * 2 + 18 + maps) * FP32)  # zeros, int64 index, grads, out
    assert backward.ops[16] == ("convolution_backward", (2 + 8 + 4 + 8 + 4) * FP32)  # grad, pooled, W1; 2 grads


def test_cascaded_attention_eager_counts_by_hand():
    """B = 2, 8 channels, 2 heads (q and k 3 wide, v 4), a 5x3 map in 2x2 windows, float32."""
    x = meta(2, 8, 5, 3)
    args = (x, meta(2, 10, 4), meta(2, 10), meta(2, 3, 3, 3), meta(2, 3), meta(2, 4), meta(4, 4, dtype=torch.int32),
            meta(8, 8), meta(8), 2, 0.5)
    count, _ = cost.count_pass(cost.eager_passes(mxa_kernels.OPS["cascaded_attention_infer"], args)["forward"])
    head = ["clone", "mm", "clone", "add",  # qkv: the head's channels as rows (a copy), mm, back, bias
            "convolution", "bmm", "mul", "add", "_softmax", "bmm"]  # depthwise conv on q, q^T k, scale, bias, v p^T
    assert [n for n, _ in count.ops] == (["constant_pad_nd", "clone", "index"]  # pad to 6x4, partition, bias table
                                         + head + ["add"] + head  # the cascade adds head 0's output to head 1's input
                                         + ["cat", "relu", "clone", "mm", "clone", "add", "clone"])  # proj, merge
    windows, padded = 12, 2 * 8 * 6 * 4  # 2 x 3 x 2 windows; the padded map's elements
    assert count.ops[0] == ("constant_pad_nd", (x.numel() + padded) * FP32)
    assert count.ops[2] == ("index", (8 + 16 + 2 * 16) * FP32)  # the table, the int32 index, (heads, N, N)
    assert count.ops[4] == ("mm", (windows * 4 * 4 + 4 * 10 + windows * 4 * 10) * FP32)  # 48 tokens x 4 channels
    assert count.ops[7] == ("convolution", (windows * 3 * 4 + 27 + 3 + windows * 3 * 4) * FP32)
    assert count.ops[27] == ("mm", (windows * 4 * 8 + 64 + windows * 4 * 8) * FP32)  # the projection


@triton.jit
def _loops_kernel(x_ptr, C, BC: tl.constexpr, HEADS: tl.constexpr):
    for c0 in range(0, C, BC):
        for h in tl.static_range(HEADS):
            tl.store(x_ptr + c0 + h, 0.0)
    blocks = tl.num_programs(1) * 2
    for i in range(tl.cdiv(C, 2 * BC) + blocks):
        tl.store(x_ptr + i, 1.0)


@triton.jit
def _loaded_bound_kernel(x_ptr, C):
    n = tl.load(x_ptr).to(tl.int32) + C
    for i in range(n):
        tl.store(x_ptr + i, 0.0)


def test_loop_trips_evaluate_the_bounds_with_the_launch_arguments():
    x = torch.zeros(64)
    launch = cost.TritonLaunch(_loops_kernel, (5, 3), dict(x_ptr=x, C=50), dict(BC=8, HEADS=3, num_warps=4))
    first = _loops_kernel.fn.__code__.co_firstlineno
    assert cost.loop_trips(launch) == [
        dict(line=first + 2, loop="range(0, C, BC)", trips=7, per_program=7),
        dict(line=first + 3, loop="tl.static_range(HEADS)", trips=3, per_program=21),
        dict(line=first + 6, loop="range(tl.cdiv(C, 2 * BC) + blocks)", trips=4 + 6, per_program=10)]
    with pytest.raises(NotImplementedError, match="not a function of the kernel's arguments"):
        cost.loop_trips(cost.TritonLaunch(_loaded_bound_kernel, (1,), dict(x_ptr=x, C=3), {}))


@triton.jit
def _padded_dot_kernel(a_ptr, b_ptr, out_ptr, M, K, N, P: tl.constexpr):
    i, j = tl.arange(0, P)[:, None], tl.arange(0, P)[None, :]
    a = tl.load(a_ptr + i * K + j, mask=(i < M) & (j < K), other=0.0)
    b = tl.load(b_ptr + i * N + j, mask=(i < K) & (j < N), other=0.0)
    tl.store(out_ptr + i * N + j, tl.dot(a, b, input_precision="ieee"), mask=(i < M) & (j < N))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts in Triton's interpreter")
def test_recording_dots_separates_useful_from_padded_products():
    """A 7x5 by 5x3 product in 16x16 tiles, on three programs: 105 of 4096 multiply-adds each."""
    a, b, out = torch.randn(7, 5), torch.randn(5, 3), torch.empty(7, 3)
    launches = []
    with cost.recording_dots(launches):
        _padded_dot_kernel[(3,)](a, b, out, 7, 5, 3, P=16)
    assert launches == [dict(kernel="_padded_dot_kernel", programs=3, padded=3 * 16 ** 3, useful=3 * 7 * 5 * 3)]
    torch.testing.assert_close(out, a @ b)


def test_every_registered_op_has_cost_cases():
    assert set(cost.CASES) == set(mxa_kernels.OPS)


def test_stages_on_the_command_line_are_checked():
    assert stage("192,14,3,64") == (192, 14, 3, 64)
    for bad in ("192,14,3", "192,14,3,x", "192,0,3,64"):
        with pytest.raises(argparse.ArgumentTypeError, match="CHANNELS,SIDE,HEADS,VALUE_DIM"):
            stage(bad)
    cost.check_stages(cost.M5_STAGES)
    with pytest.raises(ValueError, match="CHANNELS at least 16"):
        cost.check_stages([(8, 14, 2, 16)])


def test_mxa_branch_fused_counts_by_hand():
    """B = 2, 4 channels (one block), 3x3 maps, 1 hidden channel, align mode, float32: four forward and
    five backward launches, no PyTorch op between them."""
    x, boxes, w1, w2, ws = meta(2, 4, 3, 3), meta(2, 4), meta(1, 4, 1, 1), meta(4, 1, 1, 1), meta(1, 2, 7, 7)
    passes = mxa_kernels.OPS["mxa_branch"].kernels_module().launch_passes(x, boxes, w1, w2, ws, "align")
    maps, per_channel, per_pixel, box = 2 * 4 * 9, 2 * 4, 2 * 9, 2 * 4  # elements of (B, C, H, W), (B, C), ...
    sa_w, hidden = 98, 2  # the 7x7 weights; the hidden layer and each one-block share of it (B, 1)
    forward, launches = cost.count_pass(passes["forward"])
    assert not forward.ops
    assert [(t.name, t.grid, t.bytes) for t in launches] == [
        # x, box, W1 in; channel means, hidden share out
        ("mxa_branch_fwd_pool_kernel", (2, 1), (maps + box + 4 + per_channel + hidden) * FP32),
        # x, box, W2, hidden shares in; hidden, channel weights, the block's max, argmax (int32) and sum out
        ("mxa_branch_fwd_stats_kernel", (2, 1), (maps + box + 4 + hidden + hidden + per_channel + 3 * per_pixel) * FP32),
        # the three partials, the 7x7 weights in; max and mean, argmax, spatial weights out
        ("mxa_branch_fwd_spatial_kernel", (2,), (3 * per_pixel + sa_w + 2 * per_pixel + 2 * per_pixel) * FP32),
        ("mxa_branch_fwd_out_kernel", (2, 1), (maps + box + per_channel + per_pixel + maps) * FP32)]
    backward, launches = cost.count_pass(passes["backward"])
    assert not backward.ops
    assert [(t.name, t.grid, t.bytes) for t in launches] == [
        # x, grad out, box, channel weights in; the block's share of the spatial weights' gradient out
        ("mxa_branch_bwd_spatial_part_kernel", (2, 1), (2 * maps + box + per_channel + per_pixel) * FP32),
        # the share, spatial weights, max and mean, 7x7 weights in; pre-sigmoid gradient (scratch), max and
        # mean gradients, per-sample 7x7 weight gradients out
        ("mxa_branch_bwd_spatial_kernel", (2,), (3 * per_pixel + 2 * per_pixel + sa_w + 2 * per_pixel + 2 * sa_w) * FP32),
        # x, grad out, box, W2, channel weights, spatial weights, argmax, max/mean gradients in; logit
        # gradients and the hidden gradient's share out
        ("mxa_branch_bwd_channel_kernel", (2, 1),
         (2 * maps + box + 4 + per_channel + per_pixel + per_pixel + 2 * per_pixel + per_channel + hidden) * FP32),
        # as above with W1 and the hidden layer, the shares in; hidden gradient, grad x, box shares out
        ("mxa_branch_bwd_input_kernel", (2, 1), (2 * maps + box + 4 + hidden + per_channel + per_pixel + per_pixel
                                                 + 2 * per_pixel + hidden + hidden + maps + box) * FP32),
        # hidden gradient, channel means, logit gradients, hidden, per-sample 7x7 and box shares in; the
        # weights' (W1, W2, 7x7) and the boxes' gradients out
        ("mxa_branch_bwd_weights_kernel", (2,), (hidden + per_channel + per_channel + hidden + 2 * sa_w + box
                                                 + 4 + 4 + sa_w + box) * FP32)]


def test_cascaded_attention_fused_counts_by_hand():
    """The heads' bias tiles (a program per head), the cascade (a program per padded window) and the
    output projection, one batched GEMM."""
    x = meta(2, 8, 5, 3)
    args = (x, meta(2, 10, 4), meta(2, 10), meta(2, 3, 3, 3), meta(2, 3), meta(2, 4), meta(4, 4, dtype=torch.int32),
            meta(8, 8), meta(8), 2, 0.5, [3, 1])
    passes = mxa_kernels.OPS["cascaded_attention_infer"].kernels_module().launch_passes(*args)
    assert list(passes) == ["forward"]
    count, (bias, launch) = cost.count_pass(passes["forward"])
    tiles = 2 * 16 * 16 * FP32  # each head's dense bias: windows of 2x2 tokens padded to 16
    assert bias.name == "window_bias_kernel" and bias.grid == (2,)
    assert bias.bytes == 2 * 4 * FP32 + 16 * 4 + tiles  # the table and the int32 index in
    assert launch.grid == (2 * 3 * 2,)  # 5x3 padded to 6x4: 3x2 windows of 2x2
    params = (2 * 10 * 4 + 2 * 10 + 2 * 27 + 2 * 3) * FP32 + (2 * 4 + 9) * 4  # q/k/v, depthwise; head sizes, taps
    heads_out = 2 * 8 * 5 * 3 * FP32  # the heads' ReLU'd outputs at the map's tokens
    assert launch.bytes == x.numel() * FP32 + params + tiles + heads_out
    # the projection: its input, weight and bias (expanded over the batch: read once), the output
    assert count.ops == [("baddbmm", heads_out + (64 + 8) * FP32 + x.numel() * FP32)]


def test_regressions_name_worse_and_better_figures():
    launch = dict(kernel="k", programs=8, longest_loop=12, dot_macs_padded=100, dot_efficiency=0.5,
                  sm_90=dict(registers=100, spill_bytes=0, resident=2))
    record = dict(op="o", case="c", eager_launches=5, eager_bytes=10, fused_launches=1, fused_bytes=4,
                  targets=["sm_90"], triton=[launch], **{"pass": "forward"})
    assert cost.regressions([record], [record]) == ([], [])
    worse = json.loads(json.dumps(record))
    worse["fused_launches"], worse["triton"][0]["sm_90"]["resident"] = 2, 1
    worse["triton"][0]["longest_loop"], worse["triton"][0]["dot_efficiency"] = 24, 0.25
    worse["eager_bytes"] = 8  # better
    found, better = cost.regressions([worse], [record])
    assert found == ["o c forward fused_launches: 1 -> 2", "o c forward k longest_loop: 12 -> 24",
                     "o c forward k dot_efficiency: 0.5 -> 0.25", "o c forward k sm_90 resident: 2 -> 1"]
    assert better == ["o c forward eager_bytes: 10 -> 8"]
    assert cost.regressions([], [record])[0] == ["o c forward: in the baseline, not measured"]
    old = json.loads(json.dumps(record))
    del old["triton"][0]["longest_loop"]  # a baseline written before the figure existed
    assert cost.regressions([record], [old])[0] == [
        "o c forward k longest_loop: not in the baseline (write it with --write-baseline)"]


@pytest.mark.slow
def test_cost_report_at_a_stage_given_on_the_command_line(tmp_path):
    """Window attention at a 4x4 stage with 16-wide heads: one window per sample, every side a power of
    two, so no tile is padded; no loop, the backward's bias gradient neither. Not compared with the
    baseline."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "cost.json"
    result = subprocess.run([sys.executable, "-m", "mxa_model.cli", "bench", "--suite", "cost", "--cases",
                             "window_attention", "--stage", "32,4,2,16", "--batch", "3", "--json", str(out)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert "not compared" in result.stdout
    forward, backward = json.loads(out.read_text())
    bias, attention = forward["triton"]
    assert forward["case"] == "3x16x4x4 window 4" and (bias["programs"], attention["programs"]) == (1, 3)
    assert attention["dot_efficiency"] == 1.0 and attention["longest_loop"] == 0
    assert backward["triton"][0]["longest_loop"] == 0


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
