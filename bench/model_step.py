"""Training-step time per image: MXA-EfficientViT vs timm's plain EfficientViT of the same variant.

    python bench/model_step.py [--variant m5 --batch 16 --img-size 224 --repeats 5 --json FILE]

Forward + backward (BCE-with-logits loss, no optimizer), fp32, both with 1 input channel and 14
classes, timed in turn in each repeat. Prints the medians and their ratio.
"""

from __future__ import annotations

import argparse

import timm
import torch

import mxa_model
from timing import environment, interleaved_medians, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="m5")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--roi-mode", default="crop")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the records to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    common = dict(in_chans=1, num_classes=14, img_size=args.img_size)
    models = {
        f"mxa_efficientvit_{args.variant} ({args.roi_mode})": mxa_model.create_model(
            f"mxa_efficientvit_{args.variant}", roi_mode=args.roi_mode, **common),
        f"timm_efficientvit_{args.variant}": timm.create_model(f"efficientvit_{args.variant}", **common),
    }
    images = torch.randn(args.batch, 1, args.img_size, args.img_size, device=device)
    labels = (torch.rand(args.batch, 14, device=device) < 0.3).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step(model):
        model.to(device).train()

        def run():
            model.zero_grad(set_to_none=True)
            loss_fn(model(images), labels).backward()
        return run

    medians = interleaved_medians({name: step(m) for name, m in models.items()}, repeats=args.repeats, device=device)
    env = environment()
    shape = [args.batch, 1, args.img_size, args.img_size]
    records = [dict(case=f"efficientvit_{args.variant}_train_step", provider=name, mode="forward+backward",
                    shape=shape, dtype="float32", median_ms=seconds * 1e3,
                    ms_per_image=seconds * 1e3 / args.batch, **env) for name, seconds in medians.items()]
    for r in records:
        print(f"{r['provider']:>28}: {r['median_ms']:8.1f} ms per step, {r['ms_per_image']:.2f} ms per image")
    mxa, plain = medians.values()
    print(f"MXA / plain step time = {mxa / plain:.3f}")
    write_json(args.json, records)


if __name__ == "__main__":
    main()
