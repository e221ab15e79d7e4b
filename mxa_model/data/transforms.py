"""What a loader worker does to each uint8 (1, H, W) image of :func:`load_image` at the file's own size,
and the normalization on the training device.

One resize policy: the model sees square crops of an image resized with its aspect ratio kept, never
a whole non-square image squashed to a square (CheXpert's images are about 320 x 390). Evaluation and
prediction resize the shorter side to the input size and crop the centre (:func:`eval_crop`); training's
random resized crop takes 70-100 % of the image's area in a shape within 3:4-4:3 of a square, so that
its crops are stretched by at most that much and by nothing on average. Both stay uint8: a batch
crosses to the device at one byte a pixel, where the per-sample augmentations run on the whole batch
(:class:`mxa_model.data.augment.BatchAugment`) and :func:`normalize` maps it to ``(x / 255 - MEAN) /
STD``: [-2, 2], with a typical radiograph near mean 0 and unit spread (single-channel, so the ImageNet
statistics do not apply).

The training crop draws from a generator seeded by (seed, epoch, sample index) (:func:`sample_generator`),
so that an image's crop does not depend on which worker loads it, nor on how many there are, and a
persistent worker needs nothing but the epoch, which travels with the index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as TF

MEAN, STD = 0.5, 0.25


def crop_scale_and_ratio(strength: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """The random resized crop's area fraction and aspect ratio ranges at augmentation ``strength``."""
    aspect = 1.0 + strength / 3.0
    return (max(0.1, 1.0 - 0.3 * strength), 1.0), (1.0 / aspect, aspect)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of sample ``index``'s random crop in ``epoch``."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 2_147_483_647 + index) % 2**63)


def random_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                    generator: torch.Generator) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop with an area fraction in ``scale`` and an aspect ratio (w / h)
    log-uniform in ``ratio``: torchvision's ``RandomResizedCrop`` rule (10 tries, then the whole image
    clamped to the ratio range), drawing from ``generator``. Written again because torchvision's
    ``get_params`` draws from the global generator: forking and seeding that for each image
    (``torch.random.fork_rng``) took 0.18 ms an image against 0.04 ms here, in a 0.8 ms worker budget."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class TrainCrop:
    """The training crop of a uint8 (1, H, W) image: a random resized crop (:func:`crop_scale_and_ratio`)
    to ``img_size`` x ``img_size``, antialiased, uint8, drawn from ``generator``."""

    img_size: int
    strength: float = 1.0

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        top, left, h, w = random_crop_box(*image.shape[-2:], *crop_scale_and_ratio(self.strength), generator)
        return TF.resized_crop(image, top, left, h, w, [self.img_size, self.img_size], antialias=True)


@dataclass(frozen=True)
class EvalCrop:
    """Resize the shorter side of a uint8 (1, H, W) image to ``img_size`` (antialiased, aspect ratio kept)
    and crop the centre ``img_size`` x ``img_size`` square (:func:`eval_crop`), uint8."""

    img_size: int

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return TF.center_crop(resize_shorter_side(image, self.img_size), [self.img_size, self.img_size])


def train_transform(img_size: int, strength: float = 1.0) -> TrainCrop | EvalCrop:
    """What a loader worker does to a training image: :class:`TrainCrop` (:class:`EvalCrop` at strength
    0); the other augmentations run batched on the device (:class:`mxa_model.data.augment.BatchAugment`)."""
    if strength < 0:
        raise ValueError(f"augmentation strength {strength} is negative")
    return TrainCrop(img_size, strength) if strength > 0 else EvalCrop(img_size)


def eval_transform(img_size: int) -> EvalCrop:
    """What a loader worker does to an evaluation or prediction image: :class:`EvalCrop`."""
    return EvalCrop(img_size)


def resize_shorter_side(image: torch.Tensor, side: int) -> torch.Tensor:
    """A uint8 (1, H, W) image with its shorter side resized to ``side`` (antialiased, aspect ratio kept)."""
    return TF.resize(image, side, antialias=True)


def eval_crop(height: int, width: int) -> tuple[float, float, float]:
    """``(left, top, side)``: the square of a ``height`` x ``width`` image that :class:`EvalCrop`
    keeps, in the image's pixels."""
    side = min(height, width)
    return (width - side) / 2, (height - side) / 2, side


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images (any shape) as ``dtype``, ``(x / 255 - MEAN) / STD``; float images in [0, 1] too."""
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    return images.to(dtype) * (1.0 / (scale * STD)) - MEAN / STD  # one product, one difference
