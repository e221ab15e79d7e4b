"""Windowed attention with a relative-position bias: the eager reference against a per-window loop,
and the fused Triton op (interpreter on CPU, a GPU when present) against the reference: output and
the gradients of q, k, v and the bias table."""

import pytest
import torch

import mxa_kernels
from mxa_kernels import window_attention_ref
from helpers import DEVICE, HALF_DTYPES, bias_index, randomized, rel_err, within_twice_eager

def make_inputs(batch, dk, dv, height, width, window, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    idx = bias_index(window)
    tensors = [torch.randn(batch, dk, height, width, generator=gen), torch.randn(batch, dk, height, width, generator=gen),
               torch.randn(batch, dv, height, width, generator=gen), torch.randn(int(idx.max()) + 1, generator=gen),
               torch.randn(batch, dv, height, width, generator=gen)]
    q, k, v, bias, grad = (t.to(device=DEVICE, dtype=dtype) for t in tensors)
    return q, k, v, bias, idx.to(DEVICE), grad


def per_window_loop(q, k, v, bias, idx, window, scale):
    """Each window on its own, in the order timm's CascadedGroupAttention computes one head."""
    out = torch.empty(v.shape, dtype=v.dtype)
    for b in range(q.shape[0]):
        for top in range(0, q.shape[2], window):
            for left in range(0, q.shape[3], window):
                tile = (b, slice(None), slice(top, top + window), slice(left, left + window))
                qw, kw, vw = (t[tile].flatten(1) for t in (q, k, v))
                attn = ((qw * scale).transpose(0, 1) @ kw + bias[idx]).softmax(dim=-1)
                out[tile] = (vw @ attn.transpose(0, 1)).view(-1, window, window)
    return out


def test_reference_equals_a_per_window_loop():
    q, k, v, bias, idx, _ = make_inputs(2, 16, 24, 14, 21, 7)
    q, k, v, bias, idx = (t.cpu() for t in (q, k, v, bias, idx))
    torch.testing.assert_close(window_attention_ref(q, k, v, bias, idx, 7, 0.25),
                               per_window_loop(q, k, v, bias, idx, 7, 0.25))


def run(fn, q, k, v, bias, idx, grad, window):
    q, k, v, bias = (t.detach().requires_grad_() for t in (q, k, v, bias))
    out = fn(q, k, v, bias, idx, window, q.shape[1] ** -0.5)
    return [out, *torch.autograd.grad(out, (q, k, v, bias), grad)]


def fused(q, k, v, bias, idx, window, scale):
    return mxa_kernels.window_attention(q, k, v, bias, idx, window, scale, backend="triton")


NAMES = ["out", "grad q", "grad k", "grad v", "grad bias table"]


# (batch, key dim, value dim, H, W, window): the M5 stages at 224 px (14x14 and 7x7 maps in 7x7
# windows, 4x4 in one 4x4 window), padded maps as a module pads them, odd value dims, B = 1
CASES = [(2, 16, 64, 14, 14, 7), (2, 16, 64, 7, 7, 7), (2, 16, 96, 4, 4, 4), (1, 16, 112, 8, 12, 4),
         (3, 16, 16, 14, 7, 7), (1, 16, 24, 21, 14, 7), (2, 32, 40, 6, 6, 3)]


@pytest.mark.parametrize("case", CASES)
def test_fused_equals_reference(case):
    *shape, window = case
    q, k, v, bias, idx, grad = make_inputs(*shape, window)
    want = run(window_attention_ref, q, k, v, bias, idx, grad, window)
    got = run(fused, *(t.float() for t in (q, k, v, bias)), idx, grad.float(), window)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        assert rel_err(g, w) < 2e-6, (name, rel_err(g, w))


@pytest.mark.parametrize("window, table", [(7, 30), (4, 200), (3, 2)])
def test_any_offset_index_gets_its_bias_table_gradient(window, table):
    """The bias-table gradient does not rely on timm's index: random offsets into tables smaller and
    larger than the window's pairs (entries no pair uses get zero), long runs of pairs on one entry."""
    q, k, v, _, _, grad = make_inputs(2, 16, 24, 2 * window, window, window)
    gen = torch.Generator().manual_seed(window)
    idx = torch.randint(0, table, (window ** 2, window ** 2), generator=gen).to(DEVICE)
    bias = torch.randn(table, generator=gen, dtype=torch.float64).to(DEVICE)
    want = run(window_attention_ref, q, k, v, bias, idx, grad, window)
    got = run(fused, *(t.float() for t in (q, k, v, bias)), idx, grad.float(), window)
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) < 2e-6, (name, rel_err(g, w))
    unused = torch.ones(table, dtype=torch.bool, device=DEVICE).index_fill_(0, idx.flatten(), False)
    assert (got[-1][unused] == 0).all()


def test_a_nan_token_spoils_the_bias_gradients_eager_spoils():
    """A NaN query token: NaN in the bias-table entries whose gradients eager makes NaN, and only in those
    (the per-offset sums keep a non-finite value to its own offset)."""
    q, k, v, bias, idx, grad = make_inputs(1, 16, 8, 7, 7, 7, dtype=torch.float32)
    q[0, :, 3, 3] = float("nan")
    want = run(window_attention_ref, q, k, v, bias, idx, grad, 7)[-1]
    got = run(fused, q, k, v, bias, idx, grad, 7)[-1]
    assert torch.equal(got.isnan(), want.isnan()) and 0 < int(want.isnan().sum()) < bias.numel()
    assert rel_err(got[~want.isnan()], want[~want.isnan()]) < 1e-5


def test_the_bias_gradient_plan_follows_its_index():
    """The backward's plan (the pairs sorted by offset) is made once per index tensor, and anew when the
    index changes in place."""
    from mxa_kernels.ops.window_attention.kernels import bias_gradient_plan

    idx = bias_index(4).clone().to(DEVICE)
    plan = bias_gradient_plan(idx, 4, 16)
    assert bias_gradient_plan(idx, 4, 16) is plan
    q, k, v, bias, _, grad = make_inputs(1, 16, 16, 4, 4, 4)
    idx.copy_(idx.flip(0))
    assert bias_gradient_plan(idx, 4, 16) is not plan
    want = run(window_attention_ref, q, k, v, bias, idx, grad, 4)
    got = run(fused, *(t.float() for t in (q, k, v, bias)), idx, grad.float(), 4)
    assert rel_err(got[-1], want[-1]) < 2e-6


def test_channel_slices_of_one_projection_and_expanded_gradients():
    """q, k and v as timm cuts them from one qkv projection (strided views), and a stride-0 gradient."""
    _, _, _, bias, idx, _ = make_inputs(2, 16, 64, 14, 14, 7, dtype=torch.float32)
    qkv = torch.randn(2, 96, 14, 14, device=DEVICE, requires_grad=True)
    q, k, v = qkv.split([16, 16, 64], dim=1)
    fused(q, k, v, bias, idx, 7, 0.25).sum().backward()
    qkv_ref = qkv.detach().double().requires_grad_()
    window_attention_ref(*qkv_ref.split([16, 16, 64], dim=1), bias.double(), idx, 7, 0.25).sum().backward()
    assert rel_err(qkv.grad, qkv_ref.grad) < 2e-6


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_low_precision(dtype):
    q, k, v, bias, idx, grad = make_inputs(2, 16, 64, 14, 14, 7)
    exact = run(window_attention_ref, q, k, v, bias, idx, grad, 7)
    low = [t.to(dtype) for t in (q, k, v)]
    got = run(fused, *low, bias.float(), idx, grad.to(dtype), 7)
    eager = run(window_attention_ref, *low, bias.to(dtype), idx, grad.to(dtype), 7)
    for name, g, e, w in zip(NAMES, got, eager, exact):
        assert within_twice_eager(rel_err(g, w), rel_err(e, w), dtype), name


@pytest.mark.slow
def test_library_registration_passes_opcheck():
    q, k, v, bias, idx, _ = make_inputs(2, 16, 32, 8, 8, 4, dtype=torch.float32)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), bias.requires_grad_(), idx, 4, 0.25)
    torch.library.opcheck(torch.ops.mxa.window_attention_fwd.default, args)


def test_torch_compile_traces_through_without_graph_breaks():
    q, k, v, bias, idx, grad = make_inputs(2, 16, 32, 8, 8, 4, dtype=torch.float32)
    compiled = torch.compile(lambda *a: fused(*a) * 2, fullgraph=True)
    got = run(compiled, q, k, v, bias, idx, grad, 4)
    want = run(lambda *a: fused(*a) * 2, q, k, v, bias, idx, grad, 4)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, msg=name)


def test_bad_arguments_and_unsupported_windows():
    q, k, v, bias, idx, _ = make_inputs(1, 16, 16, 9, 9, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="whole 4x4 windows"):
        mxa_kernels.window_attention(q, k, v, bias, bias_index(4), 4, 0.25)
    with pytest.raises(ValueError, match="bias_idx must have shape"):
        mxa_kernels.window_attention(q, k, v, bias, bias_index(9), 3, 0.25)
    with pytest.raises(ValueError, match="empty batch"):
        mxa_kernels.window_attention(q[:0], k[:0], v[:0], bias, idx, 3, 0.25)
    big = make_inputs(1, 16, 16, 9, 9, 9, dtype=torch.float32)
    args = (*big[:5], 9, 0.25)
    assert mxa_kernels.resolve_backend("window_attention", "auto", "cuda", args) == "eager"
    with pytest.raises(mxa_kernels.BackendUnavailableError, match="windows up to 8x8"):
        mxa_kernels.window_attention(*args, backend="triton")
    with pytest.raises(mxa_kernels.BackendUnavailableError, match="float32, float16 and bfloat16, got torch.float64"):
        mxa_kernels.window_attention(q.double(), k.double(), v.double(), bias, idx, 3, 0.25, backend="triton")


# (dim, heads, attn_ratio, map H, W, window), dim = heads * 16 * attn_ratio as in EfficientViT:
# windows 7 and 4, maps 14, 7, 4 (M5's stage 1 head sizes) and maps needing padding
MODULE_CASES = [(64, 4, 1, 14, 14, 7), (192, 3, 4, 7, 7, 7), (64, 2, 2, 4, 4, 4), (48, 3, 1, 10, 10, 7),
                (32, 2, 1, 15, 9, 7), (32, 2, 1, 10, 6, 4)]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", MODULE_CASES)
def test_module_equals_timms_local_window_attention(case, training):
    from timm.models.efficientvit_msra import LocalWindowAttention

    from mxa_model.cascaded_attention import FusedLocalWindowAttention

    dim, heads, ratio, height, width, window = case
    args = (dim, 16, heads, ratio, max(height, width), window)
    reference = randomized(LocalWindowAttention(*args)).to(DEVICE).train(training)
    fused_module = FusedLocalWindowAttention(*args).to(DEVICE).train(training)
    fused_module.load_state_dict(reference.state_dict())
    fused_module.backend = "triton"
    x = torch.randn(2, dim, height, width, device=DEVICE)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_fused = reference(x_ref), fused_module(x_fused)
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    out_fused.backward(grad)
    assert rel_err(out_fused, out_ref) < 2e-5
    assert rel_err(x_fused.grad, x_ref.grad) < 1e-4
    # per parameter, against its own size, with a floor for a gradient that nearly cancels to zero (whose
    # relative error is then the rounding of two summation orders, which another processor changes; a
    # NaN fails the comparison)
    everything = torch.cat([p.grad.flatten() for p in reference.parameters()]).norm()
    for (name, p_ref), p_fused in zip(reference.named_parameters(), fused_module.parameters()):
        assert (p_fused.grad - p_ref.grad).norm() <= 1e-4 * p_ref.grad.norm() + 1e-6 * everything, name
    if training:  # the batch statistics the BatchNorms saw were the same
        for (name, b_ref), b_fused in zip(reference.named_buffers(), fused_module.buffers()):
            torch.testing.assert_close(b_fused, b_ref, msg=name)


@pytest.mark.slow
def test_the_model_with_every_fused_op_equals_eager():
    import mxa_model

    model = mxa_model.create_model("mxa_efficientvit_m0", img_size=64, roi_mode="align").to(DEVICE)
    for block in model.modules():
        if hasattr(block, "mixer") and hasattr(block.mixer, "m"):
            randomized(block.mixer.m)
    x = torch.randn(2, 1, 64, 64, device=DEVICE)
    results = {}
    for backend in ("eager", "triton"):
        copy = mxa_model.create_model("mxa_efficientvit_m0", img_size=64, roi_mode="align", backend=backend)
        copy.load_state_dict(model.state_dict())
        out = copy.to(DEVICE).eval()(x)
        # (eval mode: BatchNorm over two samples of 1x1 maps in training would make the deepest
        # gradients ill-conditioned; the modules' training mode is tested above)
        out.square().sum().backward()
        results[backend] = (out, {n: p.grad for n, p in copy.named_parameters()})
    assert rel_err(results["triton"][0], results["eager"][0]) < 1e-4
    eager_grads, fused_grads = results["eager"][1], results["triton"][1]
    everything = torch.cat([g.flatten() for g in eager_grads.values()])
    assert rel_err(torch.cat([g.flatten() for g in fused_grads.values()]), everything) < 1e-4
    # per parameter, against its own size, with a floor for gradients that nearly cancel to zero
    # (one query BatchNorm bias here has a gradient of norm 5e-8 against 1e0 for the whole model)
    for name, grad in eager_grads.items():
        assert (fused_grads[name] - grad).norm() <= 1e-3 * grad.norm() + 1e-6 * everything.norm(), name
