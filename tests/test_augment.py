"""The input pipeline: the loader workers' uint8 crops, the batched augmentations on the device, and the
run's loaders. Each augmentation at fixed parameters equals torchvision's functional op on single images;
the parameters are drawn from the distributions of torchvision's transforms as ``train_transform`` had
them (``RandomRotation(10)``, ``RandomAffine``, ``ElasticTransform``, ``GaussianBlur``,
``RandomResizedCrop``); a batch crosses to the device as uint8; persistent workers get each epoch."""

import math

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from mxa_model.data import CheXpertDataset, eval_transform, normalize, train_transform
from mxa_model.data.augment import AugmentParams, BatchAugment
from mxa_model.data.loader import make_loader, resolve_workers, workers_flag
from mxa_model.data.transforms import MEAN, STD, crop_scale_and_ratio, random_crop_box

S = 40
BILINEAR = InterpolationMode.BILINEAR


def smooth_image(side: int = S) -> torch.Tensor:
    """(1, 1, side, side) in [0, 1] without sharp edges, so that two bilinear resamplings agree closely."""
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return (0.5 + 0.4 * torch.sin(x / 3.0) * torch.cos(y / 5.0) + 0.05 * x / side).float()[None, None]


def params(**changed) -> AugmentParams:
    """One sample's parameters, the identity but for ``changed``."""
    p = dict(flip=torch.tensor([False]), angle=torch.zeros(1), translate=torch.zeros(1, 2), scale=torch.ones(1),
             shear=torch.zeros(1), field=torch.zeros(1, 2, S, S), blur_sigma=torch.zeros(1))
    return AugmentParams(**{**p, **changed})


def inner(x: torch.Tensor, margin: int) -> torch.Tensor:
    """Away from the border, where torchvision's and our zero fill may round the last pixel differently."""
    return x[..., margin:x.shape[-2] - margin, margin:x.shape[-1] - margin]


def a_field(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 2, 5, 5, generator=g) * 1.5
    return torch.nn.functional.interpolate(coarse, size=(S, S), mode="bilinear", align_corners=True)


def as_torchvision_displacement(field: torch.Tensor) -> torch.Tensor:
    """A (1, 2, H, W) field in pixels as ``TF.elastic``'s (1, H, W, 2) displacement in grid units."""
    return (field / torch.tensor([S / 2, S / 2])[None, :, None, None]).permute(0, 2, 3, 1)


AUGMENT = BatchAugment(S)
FIXED = {
    "flip": (dict(flip=torch.tensor([True])), lambda x: TF.horizontal_flip(x), 0),
    "rotation": (dict(angle=torch.tensor([7.0])), lambda x: TF.rotate(x, 7.0, interpolation=BILINEAR), 2),
    "affine": (dict(translate=torch.tensor([[2.0, -3.0]]), scale=torch.tensor([1.04]), shear=torch.tensor([4.0])),
               lambda x: TF.affine(x, 0.0, [2, -3], 1.04, [4.0, 0.0], interpolation=BILINEAR), 4),
    "elastic": (dict(field=a_field()), lambda x: TF.elastic(x, as_torchvision_displacement(a_field()),
                                                             interpolation=BILINEAR), 4),
    "blur": (dict(blur_sigma=torch.tensor([0.8])), lambda x: TF.gaussian_blur(x, [7, 7], [0.8, 0.8]), 0),
}


@pytest.mark.parametrize("name", FIXED)
def test_each_augmentation_equals_torchvisions_functional_op(name):
    changed, reference, margin = FIXED[name]
    image = smooth_image()
    got = AUGMENT.apply(image, params(**changed))
    want = reference(image)
    assert (inner(got, margin) - inner(want, margin)).abs().max() < 1e-5
    assert (got - image).abs().max() > 0.01  # it did something


def test_the_one_resampling_equals_the_ops_in_turn_within_interpolation():
    """Flip, rotation, affine and elastic composed into one grid against torchvision's four resamplings
    in turn: each of theirs interpolates again, which blurs by up to a few hundredths on this image."""
    image = smooth_image()
    composed = {k: v for name in ("flip", "rotation", "affine", "elastic") for k, v in FIXED[name][0].items()}
    in_turn = image
    for name in ("flip", "rotation", "affine", "elastic"):
        in_turn = FIXED[name][1](in_turn)
    got = AUGMENT.apply(image, params(**composed))
    assert (inner(got, 8) - inner(in_turn, 8)).abs().max() < 0.03


def test_a_batch_gets_each_samples_own_parameters():
    images = smooth_image().repeat(3, 1, 1, 1)
    p = params(flip=torch.tensor([True, False, False]), angle=torch.tensor([0.0, 7.0, 0.0]),
               translate=torch.zeros(3, 2), scale=torch.ones(3), shear=torch.zeros(3), field=torch.zeros(3, 2, S, S),
               blur_sigma=torch.tensor([0.0, 0.0, 0.8]))
    got = AUGMENT.apply(images, p)
    for i, name in enumerate(("flip", "rotation", "blur")):
        want = FIXED[name][1](images[i:i + 1])
        assert (inner(got[i:i + 1], 2) - inner(want, 2)).abs().max() < 1e-5, name


def draws(strength: float = 1.0, n: int = 4000, side: int = 224) -> AugmentParams:
    return BatchAugment(side, strength).sample(n, torch.device("cpu"), torch.Generator().manual_seed(0))


def torchvision_params(transform, n: int, side: int = 224) -> list[dict]:
    torch.manual_seed(0)
    image = torch.zeros(1, side, side)
    return [transform.make_params([image]) for _ in range(n)]


@pytest.mark.parametrize("strength", [1.0, 2.0])
def test_the_parameters_follow_torchvisions_distributions(strength):
    n, side, s = 4000, 224, strength
    p = draws(strength, n, side)
    # how often each is applied: flip 0.5, rotation 0.5, affine 0.5, elastic 0.1, blur 0.2
    affine = (p.scale != 1.0) | (p.shear != 0.0)
    elastic = p.field.flatten(1).abs().amax(dim=1) > 0
    for name, applied, rate in (("flip", p.flip, 0.5), ("rotation", p.angle != 0, 0.5), ("affine", affine, 0.5),
                                ("elastic", elastic, 0.1), ("blur", p.blur_sigma > 0, 0.2)):
        assert abs(applied.float().mean().item() - rate) < 4 * math.sqrt(rate * (1 - rate) / n), name

    def same_uniform(ours: torch.Tensor, theirs: list[float], low: float, high: float):
        theirs = torch.tensor(theirs)
        for values in (ours, theirs):
            assert low <= values.min() and values.max() <= high
            assert abs(values.mean() - (low + high) / 2) < 0.05 * (high - low)
            assert abs(values.std() - (high - low) / math.sqrt(12)) < 0.05 * (high - low) / math.sqrt(12)

    rotation = torchvision_params(v2.RandomRotation(10.0 * s), 2000)
    same_uniform(p.angle[p.angle != 0], [d["angle"] for d in rotation], -10 * s, 10 * s)
    torchvision_affine = v2.RandomAffine(0.0, (0.05 * s,) * 2, (1 - 0.05 * s, 1 + 0.05 * s), (-5 * s, 5 * s))
    theirs = torchvision_params(torchvision_affine, 2000)
    same_uniform(p.scale[affine], [d["scale"] for d in theirs], 1 - 0.05 * s, 1 + 0.05 * s)
    same_uniform(p.shear[affine], [d["shear"][0] for d in theirs], -5 * s, 5 * s)
    assert all(d["shear"][1] == 0 for d in theirs)  # horizontal shear only, as ours
    # whole pixels, up to 5 % of the side, as torchvision rounds them
    ours_shift, their_shift = p.translate[affine].flatten(), torch.tensor([d["translate"] for d in theirs]).flatten()
    assert torch.equal(ours_shift, ours_shift.round())
    assert ours_shift.abs().max() == their_shift.abs().max() == round(0.05 * s * side)
    assert abs(ours_shift.float().std() / their_shift.float().std() - 1) < 0.05
    blur = torchvision_params(v2.GaussianBlur(7, (0.1, max(0.1, s))), 2000)
    same_uniform(p.blur_sigma[p.blur_sigma > 0], [d["sigma"][0] for d in blur], 0.1, max(0.1, s))


def test_the_elastic_field_has_the_size_and_smoothness_of_torchvisions():
    """``train_transform``'s ElasticTransform had sigma 0.04 * side and the alpha meant to make each
    component's std 1 % of the side (alpha = 0.01 * side * sigma / 0.08; it measures 1.09 % at 96 px). Ours
    measures 1.03 %; its std and the std of its differences between neighbouring pixels (how fast it
    varies, 0.95 of theirs) are within 15 % of torchvision's, a few seeds' spread from the limits."""
    side = 96
    sigma = 0.04 * side
    theirs = torchvision_params(v2.ElasticTransform(alpha=0.01 * side * sigma / 0.08, sigma=sigma), 64, side)
    theirs = torch.cat([d["displacement"] for d in theirs]) * side / 2  # grid units to pixels
    ours = BatchAugment(side)._field(torch.ones(64, dtype=torch.bool), torch.device("cpu"),
                                     torch.Generator().manual_seed(0)).permute(0, 2, 3, 1)
    assert abs(ours.std() / (0.01 * side) - 1) < 0.1 and abs(ours.std() / theirs.std() - 1) < 0.15
    for dim in (1, 2):
        step, their_step = ours.diff(dim=dim), theirs.diff(dim=dim)
        assert abs(step.std() / their_step.std() - 1) < 0.15


def test_the_crop_draws_torchvisions_boxes():
    """With the same seed, the workers' crop box is the one ``v2.RandomResizedCrop`` draws."""
    scale, ratio = crop_scale_and_ratio(1.0)
    crop = v2.RandomResizedCrop(64, scale=scale, ratio=ratio)
    for seed in range(50):
        torch.manual_seed(seed)
        want = crop.make_params([torch.zeros(1, 390, 320)])
        got = random_crop_box(390, 320, scale, ratio, torch.Generator().manual_seed(seed))
        assert got == (want["top"], want["left"], want["height"], want["width"])


def test_the_crops_stay_uint8_and_strength_zero_is_the_evaluation_crop():
    image = torch.randint(0, 256, (1, 39, 32), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    for transform in (train_transform(16), train_transform(16, strength=2.0), eval_transform(16)):
        out = transform(image, g)
        assert out.dtype == torch.uint8 and out.shape == (1, 16, 16)
    assert torch.equal(train_transform(16, strength=0)(image, g), eval_transform(16)(image))
    with pytest.raises(ValueError, match="negative"):
        train_transform(16, strength=-1)


def test_the_same_seed_gives_the_same_batch_and_strength_zero_only_normalizes():
    images = torch.randint(0, 256, (6, 1, S, S), dtype=torch.uint8)
    first = AUGMENT(images, torch.Generator().manual_seed(3))
    assert first.dtype == torch.float32 and torch.equal(first, AUGMENT(images, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, AUGMENT(images, torch.Generator().manual_seed(4)))
    plain = BatchAugment(S, 0.0)(images, torch.Generator())
    assert torch.allclose(plain, (images.float() / 255 - MEAN) / STD, atol=1e-6)
    assert torch.equal(plain, normalize(images))


def test_batches_cross_as_uint8_and_persistent_workers_get_each_epoch(small_data):
    """Two epochs through 2 persistent workers equal the same epochs loaded in the main process: each crop
    is a function of (seed, epoch, index), the epoch travelling with the index; the epochs differ."""
    dataset = CheXpertDataset(small_data, "train", transform=train_transform(24), seed=1)
    batches = {}
    for workers in (0, 2):
        loader = make_loader(dataset, 8, workers, train=True, seed=1)
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            batches[workers, epoch] = [b for b in loader]
        if workers:
            assert loader._iterator is not None and loader._iterator._workers  # the same workers, kept
    for epoch in (0, 1):
        for (images, _, _, index), (again, _, _, index_again) in zip(batches[0, epoch], batches[2, epoch]):
            assert images.dtype == torch.uint8 and images.shape == (8, 1, 24, 24)
            assert torch.equal(index, index_again) and torch.equal(images, again)
    assert not torch.equal(batches[0, 0][0][0], batches[0, 1][0][0])


def test_a_loaders_iterators_leave_the_global_generator_alone(small_data):
    """Each epoch's iterator seeds its workers from the loader's own generator: the global one, which a
    checkpoint saves and a resumed run restores at another point of the run, is not drawn from."""
    dataset = CheXpertDataset(small_data, "train", transform=train_transform(24))
    loader = make_loader(dataset, 8, 2, train=True, seed=0)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.gpu
def test_the_batched_augmentation_makes_no_host_synchronization():
    images = torch.randint(0, 256, (8, 1, S, S), dtype=torch.uint8, device="cuda")
    generator = torch.Generator("cuda").manual_seed(0)
    AUGMENT(images, generator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        AUGMENT(images, generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_workers_auto_is_the_cpus_this_process_may_use_less_one(monkeypatch):
    monkeypatch.setattr("mxa_model.data.loader.cpu_count", lambda: 16)
    assert resolve_workers("auto") == 15 and resolve_workers(3) == 3 and resolve_workers(0) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four processes of torchrun on this node share them
    assert resolve_workers("auto") == 3
    monkeypatch.setattr("mxa_model.data.loader.cpu_count", lambda: 1)
    assert resolve_workers("auto") == 1
    assert workers_flag("auto") == "auto" and workers_flag("2") == 2
    for bad in ("-1", "many"):
        with pytest.raises(Exception, match="a count of at least 0 or 'auto'"):
            workers_flag(bad)
