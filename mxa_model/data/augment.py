"""The per-sample training augmentations, run on a whole batch where the model runs.

The loader's workers do only the random resized crop, in uint8 (:class:`mxa_model.data.transforms.TrainCrop`);
the batch crosses to the device as uint8 and :class:`BatchAugment` does the rest, each sample with its own
parameters, drawn from the distributions (and with the probabilities) of torchvision's transforms of the
same names:

- horizontal flip, p 0.5;
- rotation, p 0.5: an angle uniform in +-10 degrees (``RandomRotation(10)``);
- affine, p 0.5: translation up to 5 % of each side in whole pixels, scale 0.95-1.05, horizontal shear
  within +-5 degrees (``RandomAffine(0, (0.05, 0.05), (0.95, 1.05), (-5, 5))``);
- elastic deformation, p 0.1: a displacement field smooth over 4 % of the side (the correlation of white
  noise blurred with a Gaussian of sigma 0.04 * side), each component of standard deviation 1 % of the
  side (``ElasticTransform`` with the alpha that gives it);
- Gaussian blur, p 0.2: sigma uniform in 0.1-1, a kernel of 7 taps (``GaussianBlur(7, (0.1, 1))``).

``strength`` scales every magnitude (angles, translation, scale, shear, displacement, blur sigma), not
the probabilities; 0 turns them all off. The flip, rotation, affine and elastic field make ONE resampling
per batch: their inverse maps composed into one sampling grid per sample (``F.affine_grid``'s points,
written out), the field added to it, one bilinear ``F.grid_sample`` with zeros outside the image (the
fill of torchvision's transforms on the [0, 1] image). The elastic field is made at 51 x 51 (a point every
2 % of the side), blurred there and upsampled, not blurred at full size (torchvision's way: a 2-D
convolution of 8 sigma taps per pixel, 150 ms per 224 px image on one core of the development machine).
The blur is one grouped convolution over the batch (a 1-tap identity for the samples not blurred).
Parameters are drawn on the device from the caller's generator: the same seed gives the same batch.
Nothing is copied from the host in a call (no ``torch.tensor`` of constants, whose copy to a GPU waits for
the queued work): no host synchronization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .transforms import normalize

FLIP_P, ROTATE_P, AFFINE_P, ELASTIC_P, BLUR_P = 0.5, 0.5, 0.5, 0.1, 0.2
DEGREES, TRANSLATE, SCALE, SHEAR = 10.0, 0.05, 0.05, 5.0  # at strength 1
ELASTIC_SMOOTH, ELASTIC_STD = 0.04, 0.01  # the field's Gaussian sigma and its std, as fractions of the side
FIELD_SIDE = 51  # points of the low-resolution field across the side: one every 2 %
FIELD_SIGMA = ELASTIC_SMOOTH * (FIELD_SIDE - 1)  # the field's blur sigma in those points (2)


def _odd(x: float) -> int:
    """The odd integer at or above x (Gaussian kernels need odd sizes)."""
    n = math.ceil(x)
    return n if n % 2 else n + 1


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """(N, size) normalized 1-D Gaussian kernels, one per sigma, torchvision's sampling of the curve."""
    x = torch.linspace(-(size - 1) / 2, (size - 1) / 2, size, device=sigma.device)
    pdf = torch.exp(-0.5 * (x / sigma[:, None]) ** 2)
    return pdf / pdf.sum(dim=1, keepdim=True)


def separable_conv(x: torch.Tensor, kernels: torch.Tensor, padding_mode: str) -> torch.Tensor:
    """Each (H, W) plane of ``x`` (N, C, H, W) convolved with its sample's kernel (N, k) along both axes,
    padded by ``padding_mode``: one grouped convolution per axis for the whole batch."""
    n, c, h, w = x.shape
    k = kernels.shape[1]
    weights = kernels.repeat_interleave(c, dim=0)[:, None]  # (N*C, 1, k)
    planes = F.pad(x.reshape(1, n * c, h, w), [k // 2] * 4, mode=padding_mode)
    planes = F.conv2d(planes, weights[..., None], groups=n * c)  # along H
    planes = F.conv2d(planes, weights[:, :, None, :], groups=n * c)  # along W
    return planes.reshape(n, c, h, w)


@dataclass
class AugmentParams:
    """One batch's parameters, (B,) tensors on the device (angles in degrees, translation in pixels);
    the identity value where a sample's augmentation is off."""

    flip: torch.Tensor  # bool
    angle: torch.Tensor
    translate: torch.Tensor  # (B, 2): x, y
    scale: torch.Tensor
    shear: torch.Tensor  # horizontal shear, degrees
    field: torch.Tensor  # (B, 2, S, S) displacement in pixels: x, y; zeros without elastic
    blur_sigma: torch.Tensor  # 0: no blur


class BatchAugment:
    """The training augmentations of ``img_size`` x ``img_size`` batches at ``strength`` (see the module).

    ``augment(images, generator)``: uint8 (B, 1, S, S), or float in [0, 1], -> augmented and normalized
    float32 (B, 1, S, S) (:func:`mxa_model.data.transforms.normalize`), on the images' device;
    ``generator`` is a ``torch.Generator`` on that device.
    """

    def __init__(self, img_size: int, strength: float = 1.0):
        if strength < 0:
            raise ValueError(f"augmentation strength {strength} is negative")
        self.img_size, self.strength = img_size, strength
        self.blur_max = max(0.1, strength)
        self.blur_taps = _odd(6 * self.blur_max)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.strength == 0:
            return normalize(images)
        unit = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return normalize(self.apply(unit, self.sample(images.shape[0], images.device, generator)))

    def sample(self, batch: int, device: torch.device, generator: torch.Generator) -> AugmentParams:
        """Every sample's parameters, drawn on ``device``."""
        s, side = self.strength, self.img_size

        def uniform(low, high, *shape):
            return torch.rand(batch, *shape, device=device, generator=generator) * (high - low) + low

        def chosen(p):
            return torch.rand(batch, device=device, generator=generator) < p

        flip = chosen(FLIP_P)
        angle = torch.where(chosen(ROTATE_P), uniform(-DEGREES * s, DEGREES * s), 0.0)
        affine = chosen(AFFINE_P)
        max_shift = min(1.0, TRANSLATE * s) * side
        translate = torch.where(affine[:, None], uniform(-max_shift, max_shift, 2).round(), 0.0)
        scale = torch.where(affine, uniform(max(0.01, 1.0 - SCALE * s), 1.0 + SCALE * s), 1.0)
        shear = torch.where(affine, uniform(-SHEAR * s, SHEAR * s), 0.0)
        field = self._field(chosen(ELASTIC_P), device, generator)
        blur_sigma = torch.where(chosen(BLUR_P), uniform(0.1, self.blur_max), 0.0)
        return AugmentParams(flip, angle, translate, scale, shear, field, blur_sigma)

    def _field(self, on: torch.Tensor, device: torch.device, generator: torch.Generator) -> torch.Tensor:
        """(B, 2, S, S) smooth displacement fields in pixels, zero where ``on`` is False: white noise on a
        51 x 51 grid blurred there with sigma 2 points (0.04 of the side: a point every 2 % of it), scaled
        to the wanted std (that of blurred unit noise is the sum of the squared 1-D taps) and upsampled."""
        noise = torch.randn(on.shape[0], 2, FIELD_SIDE, FIELD_SIDE, device=device, generator=generator)
        taps = gaussian_kernels(torch.full((1,), FIELD_SIGMA, device=device), _odd(6 * FIELD_SIGMA))
        smooth = separable_conv(noise, taps.expand(on.shape[0], -1), "reflect")
        std = ELASTIC_STD * self.strength * self.img_size / taps.square().sum()
        smooth = smooth * torch.where(on, std, 0.0)[:, None, None, None]
        return F.interpolate(smooth, size=(self.img_size,) * 2, mode="bilinear", align_corners=True)

    def apply(self, images: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """``images`` float (B, 1, S, S) in [0, 1] augmented with parameters ``p``, in the order flip,
        rotation, affine, elastic (one resampling), blur."""
        b, _, h, w = images.shape
        theta = self.inverse_maps(p, h, w)[:, :, :, None, None]  # (B, 2, 3, 1, 1)
        # F.affine_grid's points (pixel centres, align_corners=False), each moved by the elastic displacement
        # before the inverse maps apply (torchvision's elastic transform is the last of the four); grid units
        # are half the side. Written out: affine_grid's batched product is most of the time on a CPU.
        x = (torch.arange(w, device=images.device) + 0.5) * (2 / w) - 1 + p.field[:, 0] * (2 / w)  # (B, H, W)
        y = (torch.arange(h, device=images.device)[:, None] + 0.5) * (2 / h) - 1 + p.field[:, 1] * (2 / h)
        grid = torch.stack([theta[:, i, 0] * x + theta[:, i, 1] * y + theta[:, i, 2] for i in (0, 1)], dim=-1)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        sigma = torch.where(p.blur_sigma > 0, p.blur_sigma, 1.0)
        kernels = gaussian_kernels(sigma, self.blur_taps)
        identity = torch.zeros_like(kernels)
        identity[:, self.blur_taps // 2] = 1.0
        kernels = torch.where((p.blur_sigma > 0)[:, None], kernels, identity)
        return separable_conv(images, kernels, "reflect")

    @staticmethod
    def inverse_maps(p: AugmentParams, h: int, w: int) -> torch.Tensor:
        """(B, 2, 3) ``theta``, as ``F.affine_grid`` takes it: where each output point samples the input, in grid
        units (the image spans -1..1), through the inverse affine, rotation and flip, in that order.
        Pixel coordinates are centred (x right, y down), as torchvision's tensor transforms have them."""
        b, dev = p.angle.shape[0], p.angle.device
        rot = torch.deg2rad(-p.angle)  # torchvision rotates counter-clockwise on screen: -angle in its maps
        cos, sin = torch.cos(rot), torch.sin(rot)
        zero, one = torch.zeros(b, device=dev), torch.ones(b, device=dev)

        def matrix(rows):
            return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=1)  # (B, 3, 3)

        rotation_inverse = matrix([[cos, sin, zero], [-sin, cos, zero], [zero, zero, one]])
        tan = torch.tan(torch.deg2rad(p.shear))
        tx, ty = p.translate[:, 0], p.translate[:, 1]
        # the affine's forward map is q = T + scale * [[1, -tan], [0, 1]] p: its inverse
        affine_inverse = matrix([[1 / p.scale, tan / p.scale, -(tx + tan * ty) / p.scale],
                                 [zero, 1 / p.scale, -ty / p.scale], [zero, zero, one]])
        flip = matrix([[torch.where(p.flip, -1.0, 1.0), zero, zero], [zero, one, zero], [zero, zero, one]])
        pixels = flip @ rotation_inverse @ affine_inverse  # pixels to pixels
        # grid units to pixels on the right (columns x, y times w/2, h/2), back on the left (rows x, y)
        half = (w / 2, h / 2)
        return torch.stack([torch.stack([pixels[:, i, 0] * half[0] / half[i], pixels[:, i, 1] * half[1] / half[i],
                                         pixels[:, i, 2] / half[i]], dim=-1) for i in (0, 1)], dim=1)
