"""Batch inference over a data loader: the predictions that validation during training and ``mxa eval``
score. Apart from the trainer, so that evaluation imports no training code."""

from __future__ import annotations

import torch
from tqdm import tqdm

from .data.transforms import normalize
from .train import distributed

# evaluation scores the labelled cells only: uncertain cells are left out, whatever the training policy
EVAL_POLICY = "ignore"


@torch.no_grad()
def predict_loader(model, loader, ctx: distributed.Context, dtype=None, channels_last=False, progress=False, desc="eval"):
    """Sigmoid probabilities, targets, masks and dataset indices of every sample, once each; non-finite
    outputs raise ``FloatingPointError`` naming the images (a :class:`CheXpertDataset` loader)."""
    model.eval()
    rows = {"index": [], "probs": [], "targets": [], "mask": []}
    for images, targets, mask, index in tqdm(loader, desc=desc, disable=not (progress and ctx.main), leave=False):
        images = normalize(images.to(ctx.device, non_blocking=True))  # uint8 until here
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(ctx.device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(images)
        rows["probs"].append(torch.sigmoid(logits.float()).cpu())
        rows["targets"].append(targets)
        rows["mask"].append(mask)
        rows["index"].append(index)
    index, probs, targets, mask = distributed.gather_by_index(ctx, *(torch.cat(rows[k]) for k in ("index", "probs", "targets", "mask")))
    bad = (~torch.isfinite(probs).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        records = loader.dataset.records
        files = [str(records[int(index[i])].path) for i in bad[:5]]
        raise FloatingPointError(f"the model gave non-finite outputs for {len(bad)} image(s): {', '.join(files)}"
                                 + (" ..." if len(bad) > 5 else ""))
    return probs, targets, mask, index
