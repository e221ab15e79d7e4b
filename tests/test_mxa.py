import pytest
import torch

import mxa_model
from mxa_kernels import crop_resize_loop


def authors_forward(module, x):
    """The authors' MXA forward (per-sample crop loop, then their Sequentials), with module's weights."""
    boxes = module.roi_predictor(x).mean(dim=(2, 3))
    z = crop_resize_loop(x, boxes)
    z = z * module.channel_attention(z)
    stats = torch.cat([torch.max(z, dim=1, keepdim=True)[0], torch.mean(z, dim=1, keepdim=True)], dim=1)
    return z * module.spatial_attention(stats)


def test_state_dict_keys_match_the_authors_layout():
    module = mxa_model.MedicalXRayAttention(192)
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == {
        "roi_predictor.0.weight": (96, 192, 3, 3),
        "roi_predictor.2.weight": (4, 96, 1, 1),
        "roi_predictor.2.bias": (4,),
        "channel_attention.1.weight": (12, 192, 1, 1),
        "channel_attention.3.weight": (192, 12, 1, 1),
        "spatial_attention.0.weight": (1, 2, 7, 7),
    }


@pytest.mark.parametrize("shape", [(4, 64, 14, 14), (1, 24, 7, 7), (3, 40, 4, 4), (2, 20, 9, 13)])
def test_crop_mode_equals_the_authors_forward(shape):
    module = mxa_model.MedicalXRayAttention(shape[1], roi_mode="crop")
    x = torch.randn(shape)
    torch.testing.assert_close(module(x), authors_forward(module, x), rtol=1e-5, atol=1e-5)


def test_crop_mode_leaves_the_roi_predictor_untrained():
    module = mxa_model.MedicalXRayAttention(32, roi_mode="crop")
    x = torch.randn(2, 32, 7, 7, requires_grad=True)
    module(x).square().sum().backward()
    assert all(p.grad is None for p in module.roi_predictor.parameters())
    assert x.grad is not None and module.spatial_attention[0].weight.grad is not None
    assert module.channel_attention[1].weight.grad is not None


def test_align_mode_trains_the_roi_predictor():
    module = mxa_model.MedicalXRayAttention(32, roi_mode="align")
    module(torch.randn(2, 32, 7, 7)).square().sum().backward()
    for p in module.roi_predictor.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_align_boxes_are_ordered_with_a_minimum_size():
    module = mxa_model.MedicalXRayAttention(16, roi_mode="align", min_box_size=0.2)
    with torch.no_grad():
        module.roi_predictor[2].bias.copy_(torch.tensor([3.0, -3.0, -3.0, 0.0]))  # inverted x, mixed y
    boxes = module.roi_boxes(torch.randn(5, 16, 6, 6))
    assert ((boxes >= 0) & (boxes <= 1)).all()
    assert ((boxes[:, 2] - boxes[:, 0]) >= 0.2 - 1e-6).all() and ((boxes[:, 3] - boxes[:, 1]) >= 0.2 - 1e-6).all()


def test_align_mode_starts_near_the_whole_map():
    module = mxa_model.MedicalXRayAttention(64, roi_mode="align")
    boxes = module.roi_boxes(torch.randn(4, 64, 14, 14))
    assert ((boxes[:, 2:] - boxes[:, :2]) > 0.6).all()
    model = mxa_model.create_model("mxa_efficientvit_m0", img_size=64, roi_mode="align")
    model.init_weights()  # timm's re-initialization keeps the start box
    assert all(m.roi_predictor[2].bias.tolist() == [-2.0, -2.0, 2.0, 2.0] for m in model.mxa_modules())


def test_odd_channel_counts_and_tiny_maps():
    for channels in (1, 3, 17):
        module = mxa_model.MedicalXRayAttention(channels)
        for hw in ((1, 1), (2, 2), (3, 5)):
            x = torch.randn(2, channels, *hw)
            assert module(x).shape == x.shape


def test_bad_input_raises_clear_errors():
    module = mxa_model.MedicalXRayAttention(8)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        module(torch.randn(8, 5, 5))
    with pytest.raises(ValueError, match="built for 8 channels, got 6"):
        module(torch.randn(1, 6, 5, 5))
    with pytest.raises(ValueError, match="empty batch"):
        module(torch.randn(0, 8, 5, 5))
    with pytest.raises(ValueError, match="roi_mode"):
        mxa_model.MedicalXRayAttention(8, roi_mode="box")
    with pytest.raises(ValueError, match="min_box_size"):
        mxa_model.MedicalXRayAttention(8, roi_mode="align", min_box_size=0)


@pytest.mark.parametrize("roi_mode", ["crop", "align"])
def test_nan_input_stays_in_its_sample_without_crashing(roi_mode):
    module = mxa_model.MedicalXRayAttention(8, roi_mode=roi_mode)
    x = torch.randn(2, 8, 5, 5)
    x[0, 0, 0, 0] = float("nan")
    out = module(x)
    assert out.shape == x.shape and torch.isnan(out[0]).any() and torch.isfinite(out[1]).all()
