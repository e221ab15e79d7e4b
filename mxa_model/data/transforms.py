"""Training augmentation and evaluation preprocessing for the (1, H, W) tensors of ``load_image``.

One resize policy: the model sees square crops of an image resized with its aspect ratio kept, never
a whole non-square image squashed to a square (CheXpert's images are about 320 x 390). Evaluation and
prediction resize the shorter side to the input size and crop the centre (:func:`eval_crop`); training's
random resized crop takes 70-100 % of the image's area in a shape within 3:4-4:3 of a square, so that
its crops are stretched by at most that much and by nothing on average. Both end in the same
normalization, ``(x - MEAN) / STD``, which maps the [0, 1] image to [-2, 2]
with a typical radiograph near mean 0 and unit spread (single-channel, so the ImageNet statistics
do not apply). Randomness comes from torch's global generator: ``torch.manual_seed`` (and the
DataLoader's per-worker seeding) make the augmentation reproducible.
"""

from __future__ import annotations

import math

from torchvision.transforms import v2

MEAN, STD = 0.5, 0.25


def train_transform(img_size: int, strength: float = 1.0) -> v2.Transform:
    """The paper's augmentations, each with a probability, then the normalization.

    In order: random resized crop (70-100 % of the image's area, shape 3:4-4:3, the aspect ratio jitter
    around the undistorted square crops of :func:`eval_transform`) to ``img_size`` x ``img_size``
    (always: it also sets the size, and running it first makes the rest work on small images);
    horizontal flip (p 0.5); rotation within +-10 degrees (p 0.5); affine: translation up to 5 %,
    scale 0.95-1.05, shear up to 5 degrees (p 0.5); elastic deformation, displacements of about 1 %
    of the side (p 0.1: the costliest one, about 9 ms at 128 px on one CPU core, 70 ms at 224);
    Gaussian blur, sigma 0.1-1 (p 0.2). ``strength`` scales every magnitude (crop area lost, aspect
    change, angles, translation, scale, elastic displacement, blur sigma), not the probabilities;
    0 gives :func:`eval_transform`.
    """
    if strength < 0:
        raise ValueError(f"augmentation strength {strength} is negative")
    if strength == 0:
        return eval_transform(img_size)
    s = strength
    aspect = 1.0 + s / 3.0
    blur_sigma = max(0.1, s)
    return v2.Compose([
        v2.RandomResizedCrop(img_size, scale=(max(0.1, 1.0 - 0.3 * s), 1.0), ratio=(1.0 / aspect, aspect),
                             antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply([v2.RandomRotation(10.0 * s)], p=0.5),
        v2.RandomApply([v2.RandomAffine(degrees=0.0, translate=(min(1.0, 0.05 * s),) * 2,
                                        scale=(max(0.01, 1.0 - 0.05 * s), 1.0 + 0.05 * s),
                                        shear=(-5.0 * s, 5.0 * s))], p=0.5),
        v2.RandomApply([_elastic(img_size, s)], p=0.1),
        v2.RandomApply([v2.GaussianBlur(kernel_size=_odd(6 * blur_sigma), sigma=(0.1, blur_sigma))], p=0.2),
        v2.Normalize([MEAN], [STD]),
    ])


def eval_transform(img_size: int) -> v2.Transform:
    """Resize the shorter side to ``img_size`` (antialiased, aspect ratio kept), crop the centre
    ``img_size`` x ``img_size`` square (:func:`eval_crop`), then the normalization."""
    return v2.Compose([v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size), v2.Normalize([MEAN], [STD])])


def eval_crop(height: int, width: int) -> tuple[float, float, float]:
    """``(left, top, side)``: the square of a ``height`` x ``width`` image that :func:`eval_transform`
    keeps, in the image's pixels."""
    side = min(height, width)
    return (width - side) / 2, (height - side) / 2, side


def _elastic(img_size: int, strength: float) -> v2.Transform:
    """A mild elastic deformation: a displacement field smooth over 4 % of the side, std 1 % of it."""
    # ElasticTransform blurs uniform noise with sigma (pixels) and scales it by alpha: the
    # displacement's std comes out near 0.08 * alpha / sigma pixels (measured), so solve for alpha.
    sigma = 0.04 * img_size
    return v2.ElasticTransform(alpha=0.01 * strength * img_size * sigma / 0.08, sigma=sigma)


def _odd(x: float) -> int:
    """The odd integer at or above x (Gaussian kernels need odd sizes)."""
    n = math.ceil(x)
    return n if n % 2 else n + 1
