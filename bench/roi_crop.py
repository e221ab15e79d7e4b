"""The MXA crop-mode ROI resample: vectorized (batched matrix products) vs the authors' per-sample loop.

    python bench/roi_crop.py [--batch 64 --channels 192 --size 14 --repeats 20 --json FILE]

Forward + backward, fp32, on the CPU (or --device cuda). Prints the median times and their ratio.
"""

from __future__ import annotations

import argparse

import torch

from mxa_kernels import crop_resize_loop, roi_resample
from timing import environment, interleaved_medians, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--channels", type=int, default=192)
    parser.add_argument("--size", type=int, default=14)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the records to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=device, requires_grad=True)
    boxes = torch.rand(args.batch, 4, device=device)
    grad = torch.randn_like(x)

    def step(resample):
        def run():
            x.grad = None
            resample(x, boxes).backward(grad)
        return run

    medians = interleaved_medians({
        "vectorized": step(lambda x, b: roi_resample(x, b, "crop")),
        "per_sample_loop": step(crop_resize_loop),
    }, repeats=args.repeats, device=device)
    env = environment()
    shape = [args.batch, args.channels, args.size, args.size]
    records = [dict(case="roi_crop_resize", provider=name, mode="forward+backward", shape=shape, dtype="float32",
                    median_ms=seconds * 1e3, **env) for name, seconds in medians.items()]
    for r in records:
        print(f"{r['provider']:>16}: {r['median_ms']:8.2f} ms  (B, C, H, W) = {tuple(shape)}, {r['device']}")
    print(f"per-sample loop / vectorized = {medians['per_sample_loop'] / medians['vectorized']:.2f}x")
    write_json(args.json, records)


if __name__ == "__main__":
    main()
