"""The MXA branch after the ROI predictor: eager vs fused Triton vs torch.compile of eager.

    python bench/mxa_branch.py [--batch 256] [--dtypes bfloat16,float32] [--roi-mode crop] [--json FILE]

Cases: the attention-stage shapes of EfficientViT-M5 at 224 px (C, H, W) = (192, 14, 14),
(288, 7, 7), (384, 4, 4); modes forward and forward+backward. Reports the median ms, the achieved
bandwidth of the bytes a fused op must move (forward: read x, write out; forward+backward: that plus
read x and the output gradient, write the input gradient) and its fraction of the device-to-device
copy bandwidth measured in the same run. On a GPU times come from ``triton.testing.do_bench``; on
the CPU the script runs a small smoke size (the Triton provider only under TRITON_INTERPRET=1, and
interpreter times say nothing about speed).
"""

from __future__ import annotations

import argparse

import torch

import mxa_kernels
from timing import environment, interleaved_medians, write_json

M5_STAGES = [(192, 14, 14), (288, 7, 7), (384, 4, 4)]


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), measured now."""
    numel = (256 if device.type == "cuda" else 16) * 2**20
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / seconds / 1e9


def time_call(fn, device: torch.device) -> float:
    """Median seconds of one call."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    return interleaved_medians({"case": fn}, repeats=10, device=device)["case"]


def providers(roi_mode: str, device: torch.device) -> dict:
    def eager(*args):
        return mxa_kernels.mxa_branch(*args, roi_mode=roi_mode, backend="eager")

    def fused(*args):
        return mxa_kernels.mxa_branch(*args, roi_mode=roi_mode, backend="triton")

    found = {"eager": eager, "torch.compile": torch.compile(eager, dynamic=False)}
    reason = mxa_kernels.backend.triton_unavailable_reason("mxa_branch", device)
    if reason is None:
        found["triton"] = fused
    else:
        print(f"triton provider skipped: {reason}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=None, help="default: 256 on a GPU, 4 on the CPU")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--roi-mode", default="crop", choices=mxa_kernels.ROI_MODES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write the records to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    batch = args.batch or (256 if device.type == "cuda" else 4)
    env = environment()
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"{env['device']}: device copy bandwidth {copy_gbs:.0f} GB/s")
    records = []
    funcs = providers(args.roi_mode, device)
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for channels, height, width in M5_STAGES:
            torch.manual_seed(0)
            hidden = channels // 16
            x = torch.randn(batch, channels, height, width, device=device, dtype=dtype)
            lo = torch.rand(batch, 2, device=device) * 0.5
            boxes = torch.cat([lo, lo + 0.3 + 0.2 * torch.rand(batch, 2, device=device)], dim=1)
            weights = [torch.randn(hidden, channels, 1, 1, device=device) * channels ** -0.5,
                       torch.randn(channels, hidden, 1, 1, device=device) * hidden ** -0.5,
                       torch.randn(1, 2, 7, 7, device=device) * 0.2]
            grad = torch.randn_like(x)
            tensor_bytes = x.numel() * x.element_size()
            for mode, moved in (("forward", 2 * tensor_bytes), ("forward+backward", 5 * tensor_bytes)):
                for name, fn in funcs.items():
                    if mode == "forward":
                        def call(fn=fn):
                            with torch.no_grad():
                                fn(x, boxes, *weights)
                    else:
                        xg = x.detach().requires_grad_()
                        wg = [w.detach().requires_grad_() for w in weights]

                        def call(fn=fn, xg=xg, wg=wg):
                            fn(xg, boxes, *wg).backward(grad)
                    seconds = time_call(call, device)
                    gbs = moved / seconds / 1e9
                    records.append(dict(case=f"mxa_branch_{args.roi_mode}", provider=name, mode=mode,
                                        shape=[batch, channels, height, width], dtype=dtype_name,
                                        median_ms=seconds * 1e3, achieved_gbs=gbs,
                                        fraction_of_copy=gbs / copy_gbs, copy_gbs=copy_gbs, **env))
                    print(f"{dtype_name:>8} {str((batch, channels, height, width)):>20} {mode:>16} {name:>13}: "
                          f"{seconds * 1e3:9.3f} ms {gbs:8.1f} GB/s ({gbs / copy_gbs:5.1%} of copy)", flush=True)
    write_json(args.json, records)


if __name__ == "__main__":
    main()
