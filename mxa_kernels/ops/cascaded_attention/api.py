"""The public inference-cascade op: its argument checks and the backend dispatch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...backend import dispatch
from ...checks import (check_bias_index, check_devices, check_features, check_float, check_rank, check_scale,
                       check_tensor, check_window)
from .reference import cascaded_attention_infer_ref

OP = "cascaded_attention_infer"
PARAMETERS = ("qkv_weight", "qkv_bias", "dw_weight", "dw_bias", "attention_biases", "bias_idx", "proj_weight",
              "proj_bias")


def check_cascaded_attention_args(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_biases, bias_idx,
                                  proj_weight, proj_bias, window, scale, kernel_sizes) -> None:
    check_features(OP, x)
    params = dict(zip(PARAMETERS, (qkv_weight, qkv_bias, dw_weight, dw_bias, attention_biases, bias_idx, proj_weight,
                                   proj_bias)))
    for name, t in params.items():
        check_tensor(OP, name, t)
    check_rank(OP, "qkv_weight", qkv_weight, 3, "(heads, 2 Dk + Dv, C / heads)")
    check_rank(OP, "dw_weight", dw_weight, 4, "(heads, Dk, K, K)")
    check_rank(OP, "attention_biases", attention_biases, 2, "(heads, num_offsets)")
    check_window(OP, window)
    check_scale(OP, scale)
    heads, qkv_out, group = qkv_weight.shape
    if heads == 0:
        raise ValueError(f"{OP}: qkv_weight has no heads, shape {tuple(qkv_weight.shape)}")
    key_dim, kernel = dw_weight.shape[1], dw_weight.shape[-1]
    val_dim = qkv_out - 2 * key_dim
    expected = {
        "qkv_weight": (heads, qkv_out, x.shape[1] // heads),
        "qkv_bias": (heads, qkv_out),
        "dw_weight": (heads, key_dim, kernel, kernel),
        "dw_bias": (heads, key_dim),
        "attention_biases": (heads, attention_biases.shape[-1]),
        "bias_idx": (window * window, window * window),
        "proj_weight": (x.shape[1], heads * val_dim),
        "proj_bias": (x.shape[1],),
    }
    for name, shape in expected.items():
        tensor = params[name]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{OP}: {name} must have shape {shape} for {x.shape[1]} channels and {heads} heads, "
                             f"got {tuple(tensor.shape)}")
        if name != "bias_idx":
            check_float(OP, name, tensor)
    check_devices(OP, "x", x, params)
    if x.shape[1] % heads or (heads > 1 and val_dim != group) or val_dim < 1 or key_dim < 1 or kernel % 2 == 0:
        raise ValueError(f"{OP}: {heads} heads of {group} input channels, key width {key_dim}, value width "
                         f"{val_dim} and a {kernel}x{kernel} depthwise kernel (qkv_weight, dw_weight) do not form "
                         "a cascade (the channels must split evenly, each head's output feeds the next head's "
                         "input, the widths must be positive, the kernel odd)")
    check_bias_index(OP, bias_idx, window, attention_biases.shape[1], "each head's row of attention_biases")
    sizes_ok = isinstance(kernel_sizes, (list, tuple)) and len(kernel_sizes) == heads and all(
        isinstance(k, int) and not isinstance(k, bool) and 0 < k <= kernel and k % 2 for k in kernel_sizes)
    if not sizes_ok:
        raise ValueError(f"{OP}: kernel_sizes must give each of the {heads} heads an odd depthwise kernel size of at "
                         f"most {kernel} (dw_weight's), got {kernel_sizes!r}")


def cascaded_attention_infer(x: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, dw_weight: torch.Tensor,
                             dw_bias: torch.Tensor, attention_biases: torch.Tensor, bias_idx: torch.Tensor,
                             proj_weight: torch.Tensor, proj_bias: torch.Tensor, window: int, scale: float,
                             kernel_sizes: Sequence[int] | None = None, backend: str | None = None) -> torch.Tensor:
    """EfficientViT's whole windowed cascaded group attention at inference, BatchNorms folded (see
    :func:`cascaded_attention_infer_ref` for the arguments), served by the backend that ``backend`` (or
    the global selection) resolves to. Inference only: the fused kernel has no backward.

    x and the parameters: floating point (parameters of another floating dtype are cast); bias_idx: an
    integer (N, N) index into each head's row of attention_biases; kernel_sizes: each head's depthwise
    kernel size (odd, at most dw_weight's K, whose centre it uses; None: K for every head).
    Non-finite values are not checked (that would cost a pass over the data and, on a GPU, a host
    synchronization): NaN and Inf in the inputs propagate to the output as in the eager reference.
    """
    if kernel_sizes is None:
        kernel_sizes = [dw_weight.shape[-1]] * dw_weight.shape[0] if dw_weight.dim() == 4 else []
    args = (x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_biases, bias_idx, proj_weight, proj_bias, window,
            scale, kernel_sizes)
    check_cascaded_attention_args(*args)
    args = (*args[:-1], list(kernel_sizes))  # the registered op's int[]
    fn = dispatch(OP, backend, cascaded_attention_infer_ref, args)
    if fn is not cascaded_attention_infer_ref and torch.is_grad_enabled() and any(
            t.requires_grad for t in args if isinstance(t, torch.Tensor)):
        raise RuntimeError("the fused cascaded group attention is inference only (no backward): call it under "
                           "torch.no_grad() or torch.inference_mode(), or use the eager backend")
    return fn(*args)
