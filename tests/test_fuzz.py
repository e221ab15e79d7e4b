"""Hostile inputs lose nothing: the fused ops (Triton; the interpreter on CPU, a GPU when present)
against their eager references.

1. Hypothesis properties: over random batches, channel counts, tiny and odd maps, window sizes, ROI
   modes, degenerate boxes, dtypes and memory layouts, ``mxa_branch`` and ``window_attention`` with
   ``backend="triton"`` either equal eager (output and every gradient, within the dtype's tolerance,
   inputs untouched) or raise a clear one-line error where one is due; never a crash or NaN.
2. The public API's argument checks (all three ops), tiny maps and odd layouts that must work, and
   the non-finite policy: NaN and Inf propagate as in eager.
3. Determinism: the same inputs give bitwise-equal outputs and gradients, run after run.

``MXA_FUZZ_EXAMPLES`` sets the examples per property (default 20); ``pytest
--hypothesis-show-statistics`` reports how many ran and, as events, how many matched eager and how
many raised a clear error.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

import mxa_kernels
from mxa_kernels.ops.cascaded_attention import kernels as cascaded_kernels
from mxa_kernels.ops.window_attention import kernels as window_kernels

from helpers import BF16_PRODUCTS, DEVICE, bias_index, mxa_run, rel_err, within_twice_eager

# NaN and Inf planted on purpose: numpy, under the Triton interpreter, warns about them
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

EXAMPLES = int(os.environ.get("MXA_FUZZ_EXAMPLES", "20"))
# Examples come from a fixed seed (derandomize), so a run is repeatable and a failure reproduces. No
# shrinking unless MXA_FUZZ_SHRINK=1: through the interpreter it takes minutes per failure, and the
# failing example is reported as drawn.
PHASES = [Phase.explicit, Phase.generate] + ([Phase.shrink] if os.environ.get("MXA_FUZZ_SHRINK") == "1" else [])
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=False,
                phases=PHASES, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.function_scoped_fixture])
# float64 is drawn too: the fused ops must refuse it clearly
FUZZ_DTYPES = [torch.float32] * 2 + [torch.float16] * 2 + [torch.float64] + ([torch.bfloat16] * 2 if BF16_PRODUCTS else [])


def _err(got, want, scale=0.0):
    """||got - want|| / max(||want||, scale) in float64; inf for non-finite values (an eager result may
    overflow in low precision; the fused result's finiteness is asserted separately)."""
    if not torch.isfinite(got).all():
        return float("inf")
    norm = max(want.double().norm().item(), 1e-12)
    return rel_err(got, want) * norm / max(norm, scale)


def assert_matches(names, got, eager, exact, dtype, scales=None):
    """Each fused result against the float64 reference, allowed twice eager's error in ``dtype`` (or the
    floor). ``scales``: for a result that is a sum of terms which may cancel to about zero, the size of
    the terms, the least the error is measured against."""
    assert len(got) == len(eager) == len(exact) <= len(names)
    scales = scales or [0.0] * len(got)
    for name, g, e, w, scale in zip(names, got, eager, exact, scales):
        assert g.shape == e.shape and g.dtype == e.dtype, (name, g.shape, e.shape, g.dtype, e.dtype)
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        err_fused, err_eager = _err(g, w, scale), _err(e, w, scale)
        assert within_twice_eager(err_fused, err_eager, dtype), f"{name}: fused {err_fused:.2e}, eager {err_eager:.2e}"


def assert_clear_error(info, pattern=None):
    message = str(info.value)
    assert message and "\n" not in message, f"not a one-line message: {message!r}"
    if pattern is not None:
        info.match(pattern)


def assert_untouched(tensors, snapshots):
    for t, s in zip(tensors, snapshots, strict=True):
        assert torch.equal(t, s), "an input was modified"


def layout(t, kind, gen):
    """``t``'s values in the memory layout ``kind`` (a leaf without gradient history)."""
    t = t.detach()
    if kind == "contiguous":
        return t.clone()
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "channel_slice":  # channels 2..2+C of a wider map
        batch, channels, height, width = t.shape
        wide = torch.randn(batch, channels + 3, height, width, generator=gen).to(t.dtype)
        wide[:, 2:2 + channels] = t
        return wide[:, 2:2 + channels]
    if kind == "transposed":  # stored (B, C, W, H)
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if kind == "strided":  # every other pixel of a larger map
        batch, channels, height, width = t.shape
        big = torch.zeros(batch, channels, 2 * height, 2 * width, dtype=t.dtype)
        big[..., ::2, ::2] = t
        return big[..., ::2, ::2]
    if kind == "batch_expanded":  # stride 0 along the batch (a gradient only: read, never written)
        return t[:1].expand_as(t)
    raise AssertionError(kind)


def test_bias_index_is_timms():
    from timm.models.efficientvit_msra import CascadedGroupAttention

    for window in range(1, 8):
        assert torch.equal(bias_index(window), CascadedGroupAttention(16, 16, 1, resolution=window).attention_bias_idxs)


# ------------------------------------------------------------------ mxa_branch

MXA_NAMES = ["out", "grad x", "grad ca_reduce_weight", "grad ca_expand_weight", "grad sa_weight", "grad boxes"]
COORDINATE = st.one_of(st.floats(-0.5, 1.5, width=32), st.sampled_from([0.0, 1.0, 0.5, 1 / 3, -1.0, 2.0]))


@st.composite
def boxes_strategy(draw, batch):
    boxes = []
    for _ in range(batch):
        x1, y1, x2, y2 = (draw(COORDINATE) for _ in range(4))
        kind = draw(st.sampled_from(["as drawn", "ordered", "zero area", "whole map"]))
        if kind == "ordered":
            x1, x2, y1, y2 = min(x1, x2), max(x1, x2), min(y1, y2), max(y1, y2)
        elif kind == "zero area":
            x2, y2 = x1, (y1 if draw(st.booleans()) else y2)
        elif kind == "whole map":
            x1, y1, x2, y2 = 0.0, 0.0, 1.0, 1.0
        boxes.append([x1, y1, x2, y2])
    return boxes


@st.composite
def mxa_cases(draw):
    batch = draw(st.integers(1, 3))
    # 32: the kernel's largest side; 33: beyond it, must raise
    side = st.integers(1, 18).map(lambda n: {17: 32, 18: 33}.get(n, n))
    return dict(
        batch=batch, channels=draw(st.integers(1, 48)), height=draw(side), width=draw(side),
        hidden=draw(st.integers(1, 4)), roi_mode=draw(st.sampled_from(mxa_kernels.ROI_MODES)),
        dtype=draw(st.sampled_from(FUZZ_DTYPES)), weight_dtype=draw(st.sampled_from(["float32", "same"])),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "channel_slice", "transposed", "strided"])),
        grad_layout=draw(st.sampled_from(["contiguous", "channels_last", "batch_expanded"])),
        weight_layout=draw(st.sampled_from(["contiguous", "transposed"])),
        boxes=draw(boxes_strategy(batch)),
        box_dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.float16])),
        box_layout=draw(st.sampled_from(["contiguous", "strided"])),
        magnitude=draw(st.sampled_from([1.0, 0.01, 10.0])), seed=draw(st.integers(0, 2 ** 16)),
    )


def mxa_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    batch, channels, height, width, hidden = (case[k] for k in ("batch", "channels", "height", "width", "hidden"))
    dtype = case["dtype"]
    x = layout((torch.randn(batch, channels, height, width, generator=gen) * case["magnitude"]).to(dtype),
               case["layout"], gen)
    wdtype = dtype if case["weight_dtype"] == "same" else torch.float32
    weights = [(torch.randn(hidden, channels, 1, 1, generator=gen) * channels ** -0.5).to(wdtype),
               (torch.randn(channels, hidden, 1, 1, generator=gen) * hidden ** -0.5).to(wdtype),
               (torch.randn(1, 2, 7, 7, generator=gen) * 0.2).to(wdtype)]
    if case["weight_layout"] == "transposed":  # (out, in) weights stored as (in, out), the 7x7 one transposed
        weights = [w.transpose(0, 1).contiguous().transpose(0, 1) for w in weights[:2]] + [
            weights[2].transpose(2, 3).contiguous().transpose(2, 3)]
    boxes = torch.tensor(case["boxes"], dtype=case["box_dtype"])
    if case["box_layout"] == "strided":
        boxes = torch.stack([boxes, -boxes], dim=2).flatten(1)[:, ::2]
    grad = layout(torch.randn(batch, channels, height, width, generator=gen).to(dtype), case["grad_layout"], gen)
    to = dict(device=DEVICE)
    return x.to(**to), boxes.to(**to), [w.to(**to) for w in weights], grad.to(**to)


def mxa_triton(x, boxes, w1, w2, ws, roi_mode):
    return mxa_kernels.mxa_branch(x, boxes, w1, w2, ws, roi_mode=roi_mode, backend="triton")


def mxa_eager(x, boxes, w1, w2, ws, roi_mode):
    return mxa_kernels.mxa_branch(x, boxes, w1, w2, ws, roi_mode=roi_mode, backend="eager")


def mxa_check(x, boxes, weights, grad, roi_mode):
    """The fused op equals eager on these inputs (and leaves them untouched)."""
    snapshots = [t.clone() for t in (x, boxes, *weights, grad)]
    got = mxa_run(mxa_triton, x, boxes, weights, grad, roi_mode)
    assert_untouched((x, boxes, *weights, grad), snapshots)
    eager = mxa_run(mxa_eager, x, boxes, weights, grad, roi_mode)
    exact = mxa_run(mxa_kernels.mxa_branch_ref, x.double(), boxes.double(), [w.double() for w in weights],
                    grad.double(), roi_mode)
    assert_matches(MXA_NAMES, got, eager, exact, x.dtype)


@pytest.mark.slow
@FUZZ
@given(case=mxa_cases())
def test_fuzz_mxa_branch_equals_eager_or_raises(case):
    x, boxes, weights, grad = mxa_inputs(case)
    event(f"mxa_branch {case['roi_mode']}, {str(case['dtype'])[6:]}, {case['layout']}")
    if max(case["height"], case["width"]) > 32 or case["dtype"] == torch.float64:
        pattern = "maps up to 32x32" if max(case["height"], case["width"]) > 32 else "got torch.float64"
        with pytest.raises(mxa_kernels.BackendUnavailableError) as info:
            mxa_triton(x, boxes, *weights, case["roi_mode"])
        assert_clear_error(info, pattern)
        event("outcome: raised a clear error")
        return
    mxa_check(x, boxes, weights, grad, case["roi_mode"])
    event("outcome: matched eager")


# ------------------------------------------------------------------ window_attention

WINDOW_NAMES = ["out", "grad q", "grad k", "grad v", "grad bias table"]


@st.composite
def window_cases(draw):
    window = draw(st.integers(1, 9))  # 8: the kernel's largest; 9: beyond it, must raise
    most = 3 if window <= 4 else 2
    tokens = window * window
    index = draw(st.sampled_from(["timm", "random"]))
    table = tokens if index == "timm" else draw(st.integers(1, tokens + 8))
    return dict(
        batch=draw(st.integers(1, 3)), window=window, n_h=draw(st.integers(1, most)), n_w=draw(st.integers(1, most)),
        dk=draw(st.integers(1, 24)), dv=draw(st.integers(1, 24)), dtype=draw(st.sampled_from(FUZZ_DTYPES)),
        bias_dtype=draw(st.sampled_from(["float32", "same"])), index=index, table=table,
        layout=draw(st.sampled_from(["separate", "projection", "projection_channels_last", "transposed", "strided"])),
        bias_layout=draw(st.sampled_from(["contiguous", "table_row", "table_column"])),
        index_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
        grad_layout=draw(st.sampled_from(["contiguous", "channels_last", "batch_expanded"])),
        scale=draw(st.sampled_from([None, 1.0, 0.01, 3.0])), magnitude=draw(st.sampled_from([1.0, 0.1, 4.0])),
        seed=draw(st.integers(0, 2 ** 16)),
    )


def window_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    batch, window, dk, dv, dtype = (case[k] for k in ("batch", "window", "dk", "dv", "dtype"))
    height, width = window * case["n_h"], window * case["n_w"]
    q, k, v = (torch.randn(batch, d, height, width, generator=gen) * case["magnitude"] for d in (dk, dk, dv))
    q, k, v = (t.to(dtype) for t in (q, k, v))
    kind = case["layout"]
    if kind.startswith("projection"):  # timm's split of one qkv projection: strided channel slices
        qkv = torch.cat([q, k, v], dim=1)
        if kind == "projection_channels_last":
            qkv = qkv.contiguous(memory_format=torch.channels_last)
        q, k, v = qkv.split([dk, dk, dv], dim=1)
    elif kind != "separate":
        q, k, v = (layout(t, kind, gen) for t in (q, k, v))
    if case["index"] == "timm":
        idx = bias_index(window)
    else:
        idx = torch.randint(0, case["table"], (window * window, window * window), generator=gen)
    table = torch.randn(case["table"], generator=gen).to(dtype if case["bias_dtype"] == "same" else torch.float32)
    if case["bias_layout"] == "table_row":  # one head's row of a (heads, offsets) table
        bias = torch.stack([-table, table])[1]
    elif case["bias_layout"] == "table_column":  # a column of an (offsets, heads) table: strided
        bias = torch.stack([-table, table], dim=1)[:, 1]
    else:
        bias = table
    grad = layout(torch.randn(batch, dv, height, width, generator=gen).to(dtype), case["grad_layout"], gen)
    scale = dk ** -0.5 if case["scale"] is None else case["scale"]
    to = dict(device=DEVICE)
    return q.to(**to), k.to(**to), v.to(**to), bias.to(**to), idx.to(case["index_dtype"]).to(**to), grad.to(**to), scale


def window_run(fn, q, k, v, bias, idx, grad, window, scale):
    q, k, v, bias = (t.detach().requires_grad_() for t in (q, k, v, bias))
    out = fn(q, k, v, bias, idx, window, scale)
    return [out, *torch.autograd.grad(out, (q, k, v, bias), grad)]


def window_triton(q, k, v, bias, idx, window, scale):
    return mxa_kernels.window_attention(q, k, v, bias, idx, window, scale, backend="triton")


def window_eager(q, k, v, bias, idx, window, scale):
    return mxa_kernels.window_attention(q, k, v, bias, idx, window, scale, backend="eager")


def window_check(q, k, v, bias, idx, grad, window, scale):
    snapshots = [t.clone() for t in (q, k, v, bias, idx, grad)]
    got = window_run(window_triton, q, k, v, bias, idx, grad, window, scale)
    assert_untouched((q, k, v, bias, idx, grad), snapshots)
    eager = window_run(window_eager, q, k, v, bias, idx, grad, window, scale)
    exact = window_run(mxa_kernels.window_attention_ref, q.double(), k.double(), v.double(), bias.double(), idx,
                       grad.double(), window, scale)
    # The bias-table gradient sums the score gradients of the pairs that share an entry; those of one
    # softmax row sum to zero, so with few entries it cancels to about zero: measure it against the
    # size of the per-pair gradients (the same attention with one table entry per pair).
    tokens = window * window
    pair_idx = torch.arange(tokens * tokens, device=idx.device).view(tokens, tokens)
    pairs = window_run(mxa_kernels.window_attention_ref, q.double(), k.double(), v.double(),
                       bias.double()[idx].flatten(), pair_idx, grad.double(), window, scale)[-1]
    assert_matches(WINDOW_NAMES, got, eager, exact, q.dtype, scales=[0.0] * 4 + [pairs.norm().item()])


@pytest.mark.slow
@FUZZ
@given(case=window_cases())
def test_fuzz_window_attention_equals_eager_or_raises(case):
    q, k, v, bias, idx, grad, scale = window_inputs(case)
    window = case["window"]
    event(f"window_attention window {window}, {str(case['dtype'])[6:]}, {case['layout']}")
    if window > 8 or case["dtype"] == torch.float64:
        pattern = "windows up to 8x8" if window > 8 else "got torch.float64"
        with pytest.raises(mxa_kernels.BackendUnavailableError) as info:
            window_triton(q, k, v, bias, idx, window, scale)
        assert_clear_error(info, pattern)
        event("outcome: raised a clear error")
        return
    window_check(q, k, v, bias, idx, grad, window, scale)
    event("outcome: matched eager")


# ------------------------------------------------------------------ argument checks of the public API

def mxa_args(batch=2, channels=8, height=5, width=6, hidden=2):
    gen = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(batch, channels, height, width, generator=gen),
                boxes=torch.tensor([[0.1, 0.2, 0.7, 0.9], [0.0, 0.3, 0.5, 1.0], [0.2, 0.2, 0.8, 0.6]])[:batch],
                ca_reduce_weight=torch.randn(hidden, channels, 1, 1, generator=gen) * channels ** -0.5,
                ca_expand_weight=torch.randn(channels, hidden, 1, 1, generator=gen) * hidden ** -0.5,
                sa_weight=torch.randn(1, 2, 7, 7, generator=gen) * 0.2)


def window_args(batch=2, dk=4, dv=6, height=4, width=6, window=2):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, d, height, width, generator=gen) for d in (dk, dk, dv))
    return dict(q=q, k=k, v=v, bias=torch.randn(window * window, generator=gen), bias_idx=bias_index(window),
                window=window, scale=dk ** -0.5)


def cascaded_args(batch=2, channels=8, heads=2, key_dim=3, kernel=3, height=5, width=3, window=2):
    """Random folded parameters of a cascade: heads of C / heads channels, value width C / heads, every
    other head's depthwise kernel two smaller (the centre of its weights)."""
    gen = torch.Generator().manual_seed(0)
    group = channels // heads
    qkv_out = 2 * key_dim + group
    return dict(x=torch.randn(batch, channels, height, width, generator=gen),
                qkv_weight=torch.randn(heads, qkv_out, group, generator=gen) * group ** -0.5,
                qkv_bias=torch.randn(heads, qkv_out, generator=gen) * 0.1,
                dw_weight=torch.randn(heads, key_dim, kernel, kernel, generator=gen) / kernel,
                dw_bias=torch.randn(heads, key_dim, generator=gen) * 0.1,
                attention_biases=torch.randn(heads, window * window, generator=gen),
                bias_idx=bias_index(window).to(torch.int32),
                proj_weight=torch.randn(channels, heads * group, generator=gen) * (heads * group) ** -0.5,
                proj_bias=torch.randn(channels, generator=gen) * 0.1, window=window, scale=key_dim ** -0.5,
                kernel_sizes=[kernel if head % 2 == 0 else max(1, kernel - 2) for head in range(heads)])


def _meta(t):
    return t.to("meta")


# (argument, how to spoil it (given its valid value), error, pattern naming the argument)
MXA_BAD = [
    ("x", lambda t: t[0], ValueError, r"x must be features of shape \(B, C, H, W\)"),
    ("x", lambda t: t[None], ValueError, r"x must be features of shape \(B, C, H, W\)"),
    ("x", lambda t: t.numpy(), TypeError, "x must be a torch.Tensor, got ndarray"),
    ("x", lambda t: t.long(), TypeError, "x must be a floating-point tensor, got torch.int64"),
    ("x", lambda t: t > 0, TypeError, "x must be a floating-point tensor, got torch.bool"),
    ("x", lambda t: t[:, :, :0], ValueError, "x has no channels or an empty map"),
    ("x", lambda t: t[:, :5], ValueError, r"ca_reduce_weight must have shape \(2, 5, 1, 1\) for 5 channels"),
    ("boxes", lambda t: t[:, :3], ValueError, r"boxes must have shape \(2, 4\)"),
    ("boxes", lambda t: t.flatten(), ValueError, r"boxes must have shape \(2, 4\)"),
    ("boxes", lambda t: t[:1], ValueError, r"boxes must have shape \(2, 4\) for a batch of 2"),
    ("boxes", lambda t: (t * 10).int(), TypeError, "boxes must be a floating-point tensor, got torch.int32"),
    ("boxes", lambda t: t > 0.5, TypeError, "boxes must be a floating-point tensor, got torch.bool"),
    ("boxes", lambda t: t.tolist(), TypeError, "boxes must be a torch.Tensor, got list"),
    ("ca_reduce_weight", lambda t: t[..., 0, 0], ValueError, r"ca_reduce_weight must have shape \(hidden, 8, 1, 1\)"),
    ("ca_reduce_weight", lambda t: torch.tensor(1.0), ValueError, "ca_reduce_weight must have shape"),
    ("ca_reduce_weight", lambda t: t[:0], ValueError, "ca_reduce_weight has no hidden channels"),
    ("ca_reduce_weight", lambda t: t[:, :7], ValueError, r"ca_reduce_weight must have shape \(2, 8, 1, 1\)"),
    ("ca_reduce_weight", lambda t: t.long(), TypeError, "ca_reduce_weight must be a floating-point"),
    ("ca_expand_weight", lambda t: t[:, :1], ValueError, r"ca_expand_weight must have shape \(8, 2, 1, 1\)"),
    ("ca_expand_weight", lambda t: t > 0, TypeError, "ca_expand_weight must be a floating-point"),
    ("ca_expand_weight", lambda t: None, TypeError, "ca_expand_weight must be a torch.Tensor, got NoneType"),
    ("sa_weight", lambda t: t[..., 2:5, 2:5], ValueError, r"sa_weight must have shape \(1, 2, 7, 7\)"),
    ("sa_weight", lambda t: t.to(torch.int16), TypeError, "sa_weight must be a floating-point"),
    ("roi_mode", lambda t: "resize", ValueError, "unknown roi_mode 'resize'"),
    ("roi_mode", lambda t: None, ValueError, "unknown roi_mode None"),
    ("boxes", lambda t: _meta(t), ValueError, "boxes is on meta but x is on cpu"),
    ("ca_expand_weight", lambda t: _meta(t), ValueError, "ca_expand_weight is on meta but x is on cpu"),
    ("sa_weight", lambda t: _meta(t), ValueError, "sa_weight is on meta but x is on cpu"),
]


def test_mxa_branch_empty_batch_and_other_devices():
    args = mxa_args()
    args["x"], args["boxes"] = args["x"][:0], args["boxes"][:0]
    with pytest.raises(ValueError) as info:
        mxa_kernels.mxa_branch(**args)
    assert_clear_error(info, r"empty batch \(B = 0\) in x")
    meta = {n: _meta(t) for n, t in mxa_args().items()}
    with pytest.raises(mxa_kernels.BackendUnavailableError) as info:
        mxa_kernels.mxa_branch(**meta, backend="triton")
    assert_clear_error(info, "do not run on meta devices")
    args = mxa_args()
    args["x"] = _meta(args["x"])
    with pytest.raises(ValueError) as info:
        mxa_kernels.mxa_branch(**args, backend="triton")
    assert_clear_error(info, "boxes is on cpu but x is on meta")


WINDOW_BAD = [
    ("q", lambda t: t[0], ValueError, r"q and k of one shape \(B, Dk, H, W\)"),
    ("k", lambda t: t[:, :3], ValueError, r"q and k of one shape .* got \(2, 4, 4, 6\), \(2, 3, 4, 6\)"),
    ("v", lambda t: t[:1], ValueError, r"v of shape \(B, Dv, H, W\)"),
    ("q", lambda t: t.numpy(), TypeError, "q must be a torch.Tensor"),
    ("q", lambda t: t.long(), TypeError, "q must be a floating-point tensor, got torch.int64"),
    ("k", lambda t: t > 0, TypeError, "k must be a floating-point tensor, got torch.bool"),
    ("v", lambda t: t.half(), TypeError,
     "q, k and v must have one dtype, got torch.float32, torch.float32 and torch.float16"),
    ("k", lambda t: t.double(), TypeError, "q, k and v must have one dtype"),
    ("v", lambda t: t[:, :0], ValueError, "no channels or an empty map"),
    ("bias", lambda t: t[None], ValueError, r"bias must have shape \(num_offsets,\)"),
    ("bias", lambda t: t.long(), TypeError, "bias must be a floating-point tensor"),
    ("bias", lambda t: t.tolist(), TypeError, "bias must be a torch.Tensor"),
    ("bias", lambda t: t[:3], ValueError, r"bias_idx holds offsets 0..3, outside the bias table of 3 entries"),
    ("bias_idx", lambda t: t.float(), TypeError, "bias_idx must be an integer tensor, got torch.float32"),
    ("bias_idx", lambda t: t > 0, TypeError, "bias_idx must be an integer tensor, got torch.bool"),
    ("bias_idx", lambda t: t[:3], ValueError, r"bias_idx must have shape \(4, 4\)"),
    ("bias_idx", lambda t: t - 1, ValueError, "bias_idx holds offsets -1..2, outside the bias table"),
    ("window", lambda t: 0, ValueError, "window must be at least 1, got 0"),
    ("window", lambda t: 2.0, TypeError, "window must be an int, got float"),
    ("window", lambda t: 4, ValueError, r"whole 4x4 windows \(window = 4\)"),
    ("scale", lambda t: torch.tensor(0.5), TypeError, "scale must be a Python number, got Tensor"),
    ("scale", lambda t: "0.5", TypeError, "scale must be a Python number, got str"),
    ("k", lambda t: _meta(t), ValueError, "k is on meta but q is on cpu"),
    ("bias", lambda t: _meta(t), ValueError, "bias is on meta but q is on cpu"),
    ("bias_idx", lambda t: _meta(t), ValueError, "bias_idx is on meta but q is on cpu"),
]


def test_window_attention_empty_batch_and_other_devices():
    args = window_args()
    for name in ("q", "k", "v"):
        args[name] = args[name][:0]
    with pytest.raises(ValueError) as info:
        mxa_kernels.window_attention(**args)
    assert_clear_error(info, r"empty batch \(B = 0\)")
    meta = {n: _meta(t) if isinstance(t, torch.Tensor) else t for n, t in window_args().items()}
    with pytest.raises(mxa_kernels.BackendUnavailableError) as info:
        mxa_kernels.window_attention(**meta, backend="triton")
    assert_clear_error(info, "do not run on meta devices")


CASCADED_BAD = [
    ("x", lambda t: t[0], ValueError, r"x must be features of shape \(B, C, H, W\)"),
    ("x", lambda t: t.long(), TypeError, "x must be a floating-point tensor, got torch.int64"),
    ("x", lambda t: t[..., :0], ValueError, "x has no channels or an empty map"),
    ("x", lambda t: t[:, :6], ValueError, r"qkv_weight must have shape \(2, 10, 3\) for 6 channels"),
    ("qkv_weight", lambda t: t[0], ValueError, r"qkv_weight must have shape \(heads, 2 Dk \+ Dv, C / heads\)"),
    ("qkv_weight", lambda t: t[:0], ValueError, "qkv_weight has no heads"),
    ("qkv_weight", lambda t: t.int(), TypeError, "qkv_weight must be a floating-point tensor"),
    ("qkv_bias", lambda t: t[:, :4], ValueError, r"qkv_bias must have shape \(2, 10\)"),
    ("dw_weight", lambda t: t[0], ValueError, r"dw_weight must have shape \(heads, Dk, K, K\)"),
    ("dw_weight", lambda t: t[..., :2, :2], ValueError, r"dw_weight.*do not form a cascade"),
    ("dw_bias", lambda t: t > 0, TypeError, "dw_bias must be a floating-point tensor"),
    ("attention_biases", lambda t: t[0], ValueError, r"attention_biases must have shape \(heads, num_offsets\)"),
    ("attention_biases", lambda t: t[:, :2], ValueError, "bias_idx holds offsets 0..3, outside each head's row"),
    ("bias_idx", lambda t: t.double(), TypeError, "bias_idx must be an integer tensor, got torch.float64"),
    ("bias_idx", lambda t: t + 7, ValueError, "bias_idx holds offsets 7..10"),
    ("proj_weight", lambda t: t[:, :7], ValueError, r"proj_weight must have shape \(8, 8\)"),
    ("proj_bias", lambda t: t.tolist(), TypeError, "proj_bias must be a torch.Tensor, got list"),
    ("window", lambda t: 2.5, TypeError, "window must be an int, got float"),
    ("window", lambda t: -1, ValueError, "window must be at least 1"),
    ("scale", lambda t: None, TypeError, "scale must be a Python number, got NoneType"),
    ("proj_bias", lambda t: _meta(t), ValueError, "proj_bias is on meta but x is on cpu"),
    ("bias_idx", lambda t: _meta(t), ValueError, "bias_idx is on meta but x is on cpu"),
    ("kernel_sizes", lambda t: t[:1], ValueError, r"kernel_sizes must give each of the 2 heads an odd depthwise"),
    ("kernel_sizes", lambda t: [3, 2], ValueError, r"at most 3 \(dw_weight's\), got \[3, 2\]"),
    ("kernel_sizes", lambda t: [5, 3], ValueError, r"at most 3 \(dw_weight's\), got \[5, 3\]"),
    ("kernel_sizes", lambda t: (3.0, 1), ValueError, r"got \(3.0, 1\)"),
]


# each registered op (mxa_kernels.OPS): (its valid arguments, the spoiled arguments it must refuse)
BAD_ARGUMENTS = {
    "mxa_branch": (lambda: dict(mxa_args(), roi_mode="crop"), MXA_BAD),
    "window_attention": (window_args, WINDOW_BAD),
    "cascaded_attention_infer": (cascaded_args, CASCADED_BAD),
}


def test_every_registered_op_has_a_bad_argument_table():
    assert set(BAD_ARGUMENTS) == set(mxa_kernels.OPS)


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("op,name,spoil,error,pattern",
                         [(op, *case) for op in mxa_kernels.OPS for case in BAD_ARGUMENTS.get(op, (None, []))[1]])
def test_public_ops_reject_bad_arguments(op, name, spoil, error, pattern, backend):
    make_args, _ = BAD_ARGUMENTS[op]
    args = make_args()
    args[name] = spoil(args[name])
    with torch.no_grad(), pytest.raises(error) as info:  # no_grad: the cascade is inference only
        mxa_kernels.OPS[op].function(**args, backend=backend)
    assert_clear_error(info, pattern)


def test_cascaded_attention_empty_batch_and_other_devices():
    args = cascaded_args()
    args["x"] = args["x"][:0]
    with torch.no_grad(), pytest.raises(ValueError) as info:
        mxa_kernels.cascaded_attention_infer(**args)
    assert_clear_error(info, r"empty batch \(B = 0\)")
    meta = {n: _meta(t) if isinstance(t, torch.Tensor) else t for n, t in cascaded_args().items()}
    with torch.no_grad(), pytest.raises(mxa_kernels.BackendUnavailableError) as info:
        mxa_kernels.cascaded_attention_infer(**meta, backend="triton")
    assert_clear_error(info, "do not run on meta devices")


# ------------------------------------------------------------------ tiny maps and odd layouts work

MXA_NAMES_W = ["ca_reduce_weight", "ca_expand_weight", "sa_weight"]
LAYOUTS = ["channels_last", "channel_slice", "transposed", "strided"]


def _to_device(args):
    return {n: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for n, t in args.items()}


@pytest.mark.parametrize("height,width,roi_mode", [(1, 1, "crop"), (1, 1, "align"), (2, 2, "crop"), (2, 2, "align"),
                                                   (1, 3, "crop"), (2, 1, "align")])
def test_mxa_branch_on_tiny_maps(height, width, roi_mode):
    args = _to_device(mxa_args(batch=2, channels=3, height=height, width=width, hidden=1))
    grad = torch.randn(args["x"].shape, device=DEVICE)
    mxa_check(args["x"], args["boxes"], [args[n] for n in MXA_NAMES_W], grad, roi_mode)



@pytest.mark.parametrize("kind,roi_mode", list(zip(LAYOUTS, ["crop", "align"] * 2)))
def test_mxa_branch_on_odd_layouts(kind, roi_mode):
    gen = torch.Generator().manual_seed(1)
    args = _to_device(mxa_args(batch=2, channels=11, height=5, width=7))
    x = layout(args["x"].cpu(), kind, gen).to(DEVICE)
    grad = layout(torch.randn(args["x"].shape, generator=gen), kind, gen).to(DEVICE)
    mxa_check(x, args["boxes"], [args[n] for n in MXA_NAMES_W], grad, roi_mode)


def test_mxa_branch_box_gradient_on_the_map_border():
    """Align-mode boxes whose sample positions land exactly on the map's first or last pixel (edges at
    0 or 1; the whole map): whether such a position moves with the box is torch.clamp's gradient at its
    bounds (1 in older PyTorch, 0 since), and the kernel's box gradient follows the eager reference."""
    args = _to_device(mxa_args(batch=3, channels=6, height=5, width=4))
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.3, 0.6, 1.0], [0.25, 0.1, 1.0, 0.9]], device=DEVICE)
    mxa_check(args["x"], boxes, [args[n] for n in MXA_NAMES_W], torch.randn(args["x"].shape, device=DEVICE), "align")


@pytest.mark.parametrize("window,height,width", [(1, 1, 1), (1, 2, 2), (2, 2, 2), (1, 1, 3), (3, 3, 6)])
def test_window_attention_on_tiny_maps(window, height, width):
    args = _to_device(window_args(batch=2, dk=1, dv=3, height=height, width=width, window=window))
    grad = torch.randn(args["v"].shape, device=DEVICE)
    window_check(*(args[n] for n in ("q", "k", "v", "bias", "bias_idx")), grad, window, args["scale"])


@pytest.mark.parametrize("kind", ["projection", "projection_channels_last", *LAYOUTS])
def test_window_attention_on_odd_layouts(kind):
    gen = torch.Generator().manual_seed(2)
    args = window_args(batch=1, dk=5, dv=7, height=6, width=9, window=3)
    q, k, v = args["q"], args["k"], args["v"]
    if kind.startswith("projection"):
        qkv = torch.cat([q, k, v], dim=1)
        if kind == "projection_channels_last":
            qkv = qkv.contiguous(memory_format=torch.channels_last)
        q, k, v = qkv.split([5, 5, 7], dim=1)
    else:
        q, k, v = (layout(t, kind, gen) for t in (q, k, v))
    grad_kind = {"projection": "contiguous", "projection_channels_last": "channels_last"}.get(kind, kind)
    grad = layout(torch.randn(v.shape, generator=gen), grad_kind, gen)
    window_check(*(t.to(DEVICE) for t in (q, k, v, args["bias"], args["bias_idx"], grad)), 3, args["scale"])


def cascaded_check(args):
    with torch.no_grad():
        got = mxa_kernels.cascaded_attention_infer(**args, backend="triton")
        exact = {n: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for n, t in args.items()}
        want = mxa_kernels.cascaded_attention_infer(**exact, backend="eager")
    assert got.shape == args["x"].shape and got.dtype == args["x"].dtype
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("height,width,window", [(1, 1, 1), (1, 1, 2), (2, 2, 2), (2, 1, 3), (3, 2, 1)])
def test_cascaded_attention_on_tiny_maps(height, width, window):
    cascaded_check(_to_device(cascaded_args(height=height, width=width, window=window)))


@pytest.mark.parametrize("kind", LAYOUTS)
def test_cascaded_attention_on_odd_layouts(kind):
    args = cascaded_args(batch=1, height=5, width=6, window=4)
    args["x"] = layout(args["x"], kind, torch.Generator().manual_seed(3))
    args["qkv_weight"] = args["qkv_weight"].transpose(1, 2).contiguous().transpose(1, 2)  # strided weights too
    cascaded_check(_to_device(args))


# ------------------------------------------------------------------ non-finite inputs propagate as in eager

def assert_same_non_finite(got, want):
    """NaN where eager has NaN, +-Inf where eager has +-Inf, and the finite rest equal eager."""
    assert torch.equal(got.isnan(), want.isnan()), "NaN positions differ from eager"
    assert torch.equal(got.isposinf(), want.isposinf()) and torch.equal(got.isneginf(), want.isneginf())
    finite = want.isfinite()
    if finite.any():
        assert rel_err(got[finite], want[finite].double()) < 1e-5


def plant(t, position, value):
    t = t.clone()
    t.view(-1)[position % t.numel()] = value
    return t


def plant_per_sample(t, value):
    """``value`` at one position of the first and of the last sample (the middle one stays clean)."""
    t = t.clone()
    t[0].view(-1)[t[0].numel() // 3] = value
    t[-1].view(-1)[-1] = value
    return t


def mxa_spoiled(roi_mode, target, value):
    """(fused, eager) outputs with ``value`` planted in ``target``."""
    args = _to_device(mxa_args(batch=3, channels=5, height=4, width=5))
    if target in ("x", "boxes"):
        args[target] = plant_per_sample(args[target], value)
    else:
        args[target] = plant(args[target], 7, value)
    return (mxa_kernels.mxa_branch(**args, roi_mode=roi_mode, backend="triton"),
            mxa_kernels.mxa_branch(**args, roi_mode=roi_mode, backend="eager"))


NON_FINITE = [float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("roi_mode,target,value", [
    *((m, t, v) for m in mxa_kernels.ROI_MODES for t in ("x", "boxes") for v in NON_FINITE),
    *(("align", t, v) for t in ("ca_reduce_weight", "ca_expand_weight") for v in NON_FINITE[:2])])
def test_mxa_branch_non_finite_inputs_propagate_as_in_eager(roi_mode, target, value):
    if roi_mode == "crop" and target == "boxes" and value == float("inf"):
        pytest.skip("eager snaps a +Inf coordinate with an out-of-range float->int64 cast, whose result is "
                    "platform-defined (0 on x86 CPUs); the kernel treats it as a huge coordinate")
    got, want = mxa_spoiled(roi_mode, target, value)
    if target == "x":
        assert want.isnan().any() and not want[1].isnan().any()  # the NaN reached the output, only its samples'
    assert_same_non_finite(got, want)


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("roi_mode", mxa_kernels.ROI_MODES)
@pytest.mark.parametrize("side", [4, 14])  # a flattened map and a padded one
def test_mxa_branch_non_finite_features_in_whole_map_boxes_propagate_as_in_eager(side, roi_mode, value):
    """Whole-map boxes take the kernels' identity path, which runs no product: a NaN or Inf pixel must
    still spoil its channel as eager's products with the identity matrices do (Inf times 0)."""
    args = _to_device(mxa_args(batch=2, channels=8, height=side, width=side))
    args["boxes"] = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2, device=args["x"].device)
    args["x"] = plant(args["x"], 3 * side * side + side + 2, value)  # sample 0, channel 3
    assert_same_non_finite(mxa_kernels.mxa_branch(**args, roi_mode=roi_mode, backend="triton"),
                           mxa_kernels.mxa_branch(**args, roi_mode=roi_mode, backend="eager"))


@pytest.mark.parametrize("value", NON_FINITE)
def test_mxa_branch_non_finite_spatial_weight_propagates_as_in_eager(value):
    """The kernel's 7x7 conv adds each tap only where it lands on the map, as the CPU's eager conv does
    over the zero padding: a NaN or Inf weight reaches exactly the output eager's reaches (a GPU's
    convolution may also multiply it with the padding: see docs/reliability.md)."""
    got, want = mxa_spoiled("align", "sa_weight", value)  # planted at entry 7: map 0, kernel row 1, column 0
    assert_same_non_finite(got, want)
    # Kernel column 0 reads the map 3 columns to the left: output columns 0-2 stay finite.
    assert got[..., :3].isfinite().all()
    finite = got.isfinite() & want.isfinite()
    assert rel_err(got[finite], want[finite].double()) < 1e-5


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("target", ["q", "k", "v", "bias"])
def test_window_attention_non_finite_inputs_propagate_as_in_eager(target, value):
    args = _to_device(window_args(batch=2, dk=3, dv=4, height=4, width=6, window=2))
    args[target] = plant(args[target], 5, value) if target == "bias" else plant_per_sample(args[target], value)
    got = mxa_kernels.window_attention(**args, backend="triton")
    want = mxa_kernels.window_attention(**args, backend="eager")
    assert_same_non_finite(got, want)


@pytest.mark.parametrize("target,value", [("x", float("nan")), ("x", float("inf")), ("qkv_weight", float("nan")),
                                          ("attention_biases", float("inf")), ("proj_weight", -float("inf"))])
def test_cascaded_attention_non_finite_inputs_propagate_as_in_eager(target, value):
    args = _to_device(cascaded_args(height=3, width=2, window=2))
    args[target] = plant_per_sample(args[target], value) if target == "x" else plant(args[target], 13, value)
    with torch.no_grad():
        got = mxa_kernels.cascaded_attention_infer(**args, backend="triton")
        want = mxa_kernels.cascaded_attention_infer(**args, backend="eager")
    assert_same_non_finite(got, want)


def test_fused_kernels_never_read_outside_the_bias_table():
    """The range of bias_idx is checked only for CPU tensors (a GPU check would synchronize): the
    kernels themselves give NaN scores for an offset outside the table instead of reading past it."""
    args = window_args(batch=1, dk=2, dv=3, height=2, width=2, window=2)
    bad_idx = args["bias_idx"].clone()
    bad_idx[1, 2] = 1000  # query token 1, key token 2
    bad_idx[3, 0] = -5  # query token 3
    q, k, v = (args[n].to(DEVICE) for n in ("q", "k", "v"))
    out, *_ = window_kernels.window_attention_forward(q, k, v, args["bias"].to(DEVICE), bad_idx.to(DEVICE), 2,
                                                              args["scale"])
    tokens = out.flatten(2)[0]  # (Dv, N)
    assert tokens[:, [1, 3]].isnan().all() and tokens[:, [0, 2]].isfinite().all()
    cargs = cascaded_args(batch=1, height=2, width=2, window=2)
    cargs["bias_idx"] = bad_idx.to(torch.int32)
    out = cascaded_kernels.cascaded_attention_infer_forward(*_to_device(cargs).values())
    assert out.isnan().all()  # the cascade carries a NaN token into every token of the window


# ------------------------------------------------------------------ run-to-run determinism

REPEATS = 20 if DEVICE == "cuda" else 3


def test_mxa_branch_is_bitwise_deterministic():
    args = _to_device(mxa_args(batch=2, channels=20, height=7, width=9, hidden=3))
    args["boxes"] = torch.tensor([[0.1, 0.2, 0.7, 0.9], [-0.2, 0.1, 0.8, 1.3]], device=DEVICE)
    grad = torch.randn(args["x"].shape, device=DEVICE)
    weights = [args[n] for n in MXA_NAMES_W]
    for roi_mode in mxa_kernels.ROI_MODES:
        first = mxa_run(mxa_triton, args["x"], args["boxes"], weights, grad, roi_mode)
        for _ in range(REPEATS - 1):
            again = mxa_run(mxa_triton, args["x"], args["boxes"], weights, grad, roi_mode)
            for name, a, b in zip(MXA_NAMES, first, again):
                assert torch.equal(a, b), f"{roi_mode} {name} differs between runs"


def test_window_attention_is_bitwise_deterministic():
    args = _to_device(window_args(batch=2, dk=16, dv=24, height=8, width=8, window=4))
    grad = torch.randn(args["v"].shape, device=DEVICE)
    inputs = [args[n] for n in ("q", "k", "v", "bias", "bias_idx")]
    first = window_run(window_triton, *inputs, grad, 4, args["scale"])
    for _ in range(REPEATS - 1):
        again = window_run(window_triton, *inputs, grad, 4, args["scale"])
        for name, a, b in zip(WINDOW_NAMES, first, again):
            assert torch.equal(a, b), f"{name} differs between runs"
