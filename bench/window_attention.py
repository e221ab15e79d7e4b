"""EfficientViT's windowed attention: timm eager vs the fused Triton op vs torch.compile vs
``F.scaled_dot_product_attention`` with the gathered bias as its mask.

    python bench/window_attention.py [--batch 256] [--dtypes bfloat16,float32] [--json FILE]

Two levels, at the M5 stage shapes at 224 px (dim 192 / 288 / 384, maps 14 / 7 / 4, 3 / 3 / 4 heads,
key dim 16, windows 7 / 7 / 4):

- ``attention``: one head's attention core on (B, D, H, W) maps, forward and forward+backward
  (timm's computation is the eager reference ``window_attention_ref``; SDPA gets the window
  partition as copies and the bias as an additive mask);
- ``module``: the whole ``LocalWindowAttention`` (cascade, projections, BatchNorm), training step
  forward+backward and inference forward, timm's module vs ``FusedLocalWindowAttention`` (whose
  inference forward is the one-launch ``cascaded_attention_infer`` kernel, BatchNorms folded).

Median ms (``triton.testing.do_bench`` on a GPU; a smoke size and repeated CPU timer otherwise).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timm.models.efficientvit_msra import LocalWindowAttention

import mxa_kernels
from mxa_kernels.window_attention_ref import _windows
from mxa_model.window_attention import FusedLocalWindowAttention
from mxa_branch import time_call
from timing import environment, write_json

M5_STAGES = [(192, 3, 14, 7), (288, 3, 7, 7), (384, 4, 4, 4)]  # dim, heads, map side, window


def sdpa_attention(q, k, v, bias, bias_idx, window, scale):
    batch, _, height, width = q.shape
    qw, kw, vw = (_windows(t, window).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=bias[bias_idx].to(q.dtype), scale=scale)
    out = out.transpose(1, 2).reshape(batch, height // window, width // window, -1, window, window)
    return out.permute(0, 3, 1, 4, 2, 5).reshape(batch, -1, height, width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=None, help="default: 256 on a GPU, 2 on the CPU")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write the records to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    batch = args.batch or (256 if device.type == "cuda" else 2)
    # every stage, dtype and mode recompiles the same forward code: keep them all compiled
    torch._dynamo.config.recompile_limit = 64
    env = environment()
    fused_ok = mxa_kernels.backend.triton_unavailable_reason("window_attention", device) is None
    if not fused_ok:
        print("triton provider skipped:", mxa_kernels.backend.triton_unavailable_reason("window_attention", device))
    records = []

    def record(level, provider, mode, shape, dtype_name, seconds):
        records.append(dict(case=f"window_attention_{level}", provider=provider, mode=mode, shape=shape,
                            dtype=dtype_name, median_ms=seconds * 1e3, **env))
        print(f"{dtype_name:>8} {level:>9} {str(shape):>22} {mode:>16} {provider:>14}: {seconds * 1e3:9.3f} ms", flush=True)

    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for dim, heads, side, window in M5_STAGES:
            torch.manual_seed(0)
            value_dim = dim // heads
            reference = LocalWindowAttention(dim, 16, heads, dim / (16 * heads), side, window)
            idx = reference.attn.attention_bias_idxs.to(device)
            bias = torch.randn(int(idx.max()) + 1, device=device, requires_grad=True)
            q, k = (torch.randn(batch, 16, side, side, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
            v = torch.randn(batch, value_dim, side, side, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn(batch, value_dim, side, side, device=device, dtype=dtype)
            cores = {"timm eager": mxa_kernels.window_attention_ref, "sdpa": sdpa_attention,
                     "torch.compile": torch.compile(mxa_kernels.window_attention_ref, dynamic=False)}
            if fused_ok:
                cores["triton"] = lambda *a: mxa_kernels.window_attention(*a, backend="triton")
            for name, fn in cores.items():
                call_args = (q, k, v, bias, idx, window, 0.25)
                with torch.no_grad():
                    record("attention", name, "forward", [batch, value_dim, side, side], dtype_name,
                           time_call(lambda fn=fn: fn(*call_args), device))
                record("attention", name, "forward+backward", [batch, value_dim, side, side], dtype_name,
                       time_call(lambda fn=fn: fn(*call_args).backward(grad), device))
            modules = {"timm eager": reference}
            if fused_ok:
                fused_module = FusedLocalWindowAttention(dim, 16, heads, dim / (16 * heads), side, window)
                fused_module.load_state_dict(reference.state_dict())
                fused_module.backend = "triton"
                modules["triton"] = fused_module
            modules["torch.compile"] = torch.compile(reference, dynamic=False)
            x = torch.randn(batch, dim, side, side, device=device, dtype=dtype, requires_grad=True)
            for name, module in modules.items():
                module.to(device=device, dtype=dtype)
                module.train()
                record("module", name, "forward+backward", [batch, dim, side, side], dtype_name,
                       time_call(lambda m=module: m(x).sum().backward(), device))
                module.eval()
                with torch.no_grad():
                    record("module", name, "inference", [batch, dim, side, side], dtype_name,
                           time_call(lambda m=module: m(x), device))
    write_json(args.json, records)


if __name__ == "__main__":
    main()
