import json

import pytest
import timm
import torch

import mxa_model
from mxa_model import CheckpointMismatchError, MXAEfficientVitBlock
from mxa_model.mxa import MedicalXRayAttention


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_paper_parameter_counts():
    assert n_params(timm.create_model("efficientvit_m5", num_classes=14)) == 12_094_162
    assert n_params(mxa_model.create_model("mxa_efficientvit_m5", in_chans=1, num_classes=14)) == 16_149_010
    assert n_params(mxa_model.create_model("mxa_efficientvit_m5", in_chans=1, num_classes=14,
                                           distilled=True)) == 16_155_168


def test_registered_with_timm_for_every_variant():
    assert mxa_model.list_models() == [f"mxa_efficientvit_m{i}" for i in range(6)]
    for name in mxa_model.list_models():
        assert timm.is_model(name)
    model = timm.create_model("mxa_efficientvit_m1", img_size=64)
    blocks = [m for m in model.modules() if isinstance(m, MXAEfficientVitBlock)]
    assert len(blocks) == sum(mxa_model.VARIANTS["mxa_efficientvit_m1"]["depth"])
    assert all(isinstance(b.mixer.m, timm.models.efficientvit_msra.LocalWindowAttention) for b in blocks)
    assert all(hasattr(b, "mxa") for b in blocks)
    with pytest.raises(ValueError, match="unknown model 'mxa_efficientvit_m9'"):
        mxa_model.create_model("mxa_efficientvit_m9")
    with pytest.raises(ValueError, match="pretrained_file"):
        mxa_model.create_model("mxa_efficientvit_m0", pretrained=True)


def test_backbone_keys_are_timms():
    ours = mxa_model.create_model("mxa_efficientvit_m0").state_dict()
    theirs = timm.create_model("efficientvit_m0", in_chans=1, num_classes=14).state_dict()
    assert {k: v.shape for k, v in ours.items() if ".mxa." not in k} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("in_chans,num_classes", [(1, 14), (3, 1000)])
def test_timm_state_dict_loads_with_only_mxa_keys_missing(tmp_path, in_chans, num_classes):
    timm_model = timm.create_model("efficientvit_m0", in_chans=in_chans, num_classes=num_classes)
    for p in timm_model.parameters():
        torch.nn.init.normal_(p)
    path = tmp_path / "efficientvit_m0.pth"
    torch.save(timm_model.state_dict(), path)
    model = mxa_model.create_model("mxa_efficientvit_m0", in_chans=1, num_classes=14)
    report = mxa_model.load_pretrained_file(model, path)
    head_dropped = num_classes != 14
    assert {k for k in report["missing"] if ".mxa." not in k} == (
        {"head.linear.weight", "head.linear.bias"} if head_dropped else set())
    assert len(report["skipped"]) == (2 if head_dropped else 0)
    ours = model.state_dict()
    for key, value in timm_model.state_dict().items():
        if key == "patch_embed.conv1.conv.weight" and in_chans == 3:
            torch.testing.assert_close(ours[key], value.sum(dim=1, keepdim=True))  # timm's adapt_input_conv
        elif key not in report["skipped"]:
            torch.testing.assert_close(ours[key], value, msg=key)


def test_checkpoint_variants_that_still_fit(tmp_path):
    from safetensors.torch import save_file

    source = mxa_model.create_model("mxa_efficientvit_m0", fusion="gate", distilled=True)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, tmp_path / "gate_distilled.safetensors")
    plain = mxa_model.create_model("mxa_efficientvit_m0", num_classes=0)
    report = mxa_model.load_pretrained_file(plain, tmp_path / "gate_distilled.safetensors")
    assert any(k.endswith(".alpha") for k in report["skipped"]) and any(k.startswith("head_dist.") for k in report["skipped"])
    torch.testing.assert_close(plain.state_dict()["stages.2.blocks.0.mxa.spatial_attention.0.weight"],
                               state["stages.2.blocks.0.mxa.spatial_attention.0.weight"])


def test_attention_biases_are_resized_to_the_models_windows(tmp_path):
    timm_model = timm.create_model("efficientvit_m0", in_chans=1, num_classes=14)  # 224 px: windows 7, 7, 4
    torch.nn.init.normal_(timm_model.stages[0].blocks[0].mixer.m.attn.attention_biases)
    torch.save(timm_model.state_dict(), tmp_path / "m0.pth")
    small = mxa_model.create_model("mxa_efficientvit_m0", img_size=64)  # windows 4, 2, 1
    mxa_model.load_pretrained_file(small, tmp_path / "m0.pth")
    loaded = small.stages[0].blocks[0].mixer.m.attn.attention_biases
    assert loaded.shape == (4, 16)
    expected = timm.layers.resize_rel_pos_bias_table_levit(
        timm_model.stages[0].blocks[0].mixer.m.attn.attention_biases.detach().T, (16, 4)).T
    torch.testing.assert_close(loaded.detach(), expected)


def test_pretrained_file_argument_and_project_checkpoint(tmp_path):
    source = mxa_model.create_model("mxa_efficientvit_m0", img_size=64, fusion="gate", distilled=True)
    path = tmp_path / "project.pth"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)
    model = mxa_model.create_model("mxa_efficientvit_m0", img_size=64, fusion="gate", distilled=True,
                                   pretrained_file=str(path))
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_checkpoints_of_other_models_are_refused(tmp_path):
    model = mxa_model.create_model("mxa_efficientvit_m0")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other_variant = tmp_path / "m5.pth"
    torch.save(timm.create_model("efficientvit_m5").state_dict(), other_variant)
    with pytest.raises(CheckpointMismatchError, match="another EfficientViT variant"):
        mxa_model.load_pretrained_file(model, other_variant)
    other_model = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), other_model)
    with pytest.raises(CheckpointMismatchError, match="unexpected keys"):
        mxa_model.load_pretrained_file(model, other_model)
    with pytest.raises(FileNotFoundError, match="no_such.pth"):
        mxa_model.load_pretrained_file(model, tmp_path / "no_such.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="cannot read checkpoint"):
        mxa_model.load_pretrained_file(model, corrupt)
    truncated = tmp_path / "truncated.pth"
    partial = {k: v for k, v in timm.create_model("efficientvit_m0").state_dict().items() if "stages.2" not in k}
    torch.save(partial, truncated)
    with pytest.raises(CheckpointMismatchError, match="missing backbone keys"):
        mxa_model.load_pretrained_file(model, truncated)
    for key, value in model.state_dict().items():  # nothing was loaded from the refused files
        torch.testing.assert_close(value, before[key])


class _Payload:
    def __reduce__(self):
        return (exec, ("raise SystemExit('payload ran')",))


def test_pickle_payload_is_refused_without_running(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": _Payload()}, path)
    with pytest.raises(CheckpointMismatchError, match="cannot read checkpoint"):
        mxa_model.load_pretrained_file(mxa_model.create_model("mxa_efficientvit_m0"), path)


@pytest.mark.parametrize("fusion", mxa_model.FUSIONS)
@pytest.mark.parametrize("roi_mode", ["crop", "align"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_m0_forward_backward_at_a_small_size(fusion, roi_mode, in_chans):
    model = mxa_model.create_model("mxa_efficientvit_m0", img_size=80, in_chans=in_chans, fusion=fusion,
                                   roi_mode=roi_mode)
    x = torch.randn(2, in_chans, 80, 80)
    out = model(x)
    assert out.shape == (2, 14)
    out.sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert grads["patch_embed.conv1.conv.weight"] is not None
    mxa_grads = [g for name, g in grads.items() if ".mxa.roi_predictor." in name]
    assert all((g is not None) == (roi_mode == "align") for g in mxa_grads)
    assert all(g is not None for name, g in grads.items() if ".mxa.spatial_attention" in name)
    alphas = [g for name, g in grads.items() if name.endswith(".alpha")]
    assert len(alphas) == (6 if fusion.endswith("gate") else 0) and all(g is not None for g in alphas)


@pytest.mark.parametrize("fusion", ["sum", "gate"])  # the authors' two: test_authors_block_computes_their_formula
def test_fusions_compute_their_formula(fusion):
    """The MXA block against timm's plain block with the same weights, whose attention's output gets a
    stand-alone MXA module's added (sum: ``x + attn(x) + mxa(x)``; gate: ``x + s attn(x) + (1 - s) mxa(x)``,
    ``s = sigmoid(alpha)``) by a forward hook: timm's own forward does the rest."""
    from timm.models.efficientvit_msra import EfficientVitBlock

    block = mxa_model.create_model("mxa_efficientvit_m0", img_size=64, fusion=fusion).stages[0].blocks[0]
    for p in block.parameters():  # timm zero-initializes some BatchNorms; make every path count
        torch.nn.init.normal_(p, std=0.2)
    if fusion == "gate":
        torch.nn.init.constant_(block.alpha, 0.7)
    window_attn = block.mixer.m
    attn = window_attn.attn
    plain = EfficientVitBlock(64, attn.key_dim, window_attn.num_heads, attn.attn_ratio, window_attn.resolution,
                              window_attn.window_resolution, [dw.conv.kernel_size[0] for dw in attn.dws])
    plain.load_state_dict({k: v for k, v in block.state_dict().items() if not k.startswith("mxa.") and k != "alpha"})
    mxa = MedicalXRayAttention(64, roi_mode=block.mxa.roi_mode)
    mxa.load_state_dict(block.mxa.state_dict())
    gate = torch.sigmoid(torch.tensor(0.7)) if fusion == "gate" else torch.tensor(1.0)
    mixed = 1.0 if fusion == "sum" else 1 - gate
    plain.mixer.m.register_forward_hook(lambda module, args, out: gate * out + mixed * mxa(args[0]))
    block.eval(), plain.eval(), mxa.eval()
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(block(x), plain(x))


def test_distilled_heads():
    model = mxa_model.create_model("mxa_efficientvit_m0", img_size=64, distilled=True)
    x = torch.randn(3, 1, 64, 64)
    cls, dist = model(x)
    assert cls.shape == dist.shape == (3, 14)
    model.eval()
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(model(x), (model.head(features) + model.head_dist(features)) / 2)
    model.reset_classifier(5)
    assert model(x).shape == (3, 5)
    model.train().reset_classifier(0)  # a feature extractor returns the pooled features
    assert model(x).shape == (3, model.num_features)


def test_other_image_sizes_and_resizing():
    model = mxa_model.create_model("mxa_efficientvit_m0", img_size=(96, 64)).eval()
    assert model(torch.randn(1, 1, 96, 64)).shape == (1, 14)
    with pytest.raises(ValueError, match=r"built for 96x64 images, got 64x64.*set_input_size"):
        model(torch.randn(1, 1, 64, 64))
    model.set_input_size((64, 64))
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 14)


def test_bad_input_raises_clear_errors():
    model = mxa_model.create_model("mxa_efficientvit_m0", img_size=64)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(1, 64, 64))
    with pytest.raises(ValueError, match="1-channel images .*got 3 channels"):
        model(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.randn(0, 1, 64, 64))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(2, 1, 64, 64, dtype=torch.uint8))
    with pytest.raises(TypeError, match="tensor"):
        model([[0.0]])
    with pytest.raises(ValueError, match="1-channel images .*got 3 channels"):
        model.forward_intermediates(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="unknown fusion"):
        mxa_model.create_model("mxa_efficientvit_m0", fusion="concat")


def test_nan_input_gives_nan_output_without_crashing():
    model = mxa_model.create_model("mxa_efficientvit_m0", img_size=64).eval()
    x = torch.randn(2, 1, 64, 64)
    x[0, 0, 10, 10] = float("nan")
    out = model(x)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()


def _randomize(model):
    """Random weights and BatchNorm statistics, so that every path and every folded statistic counts."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.2 + (0.9 if tensor.dim() <= 1 else -0.1))
    return model


def test_every_parameter_gets_a_gradient_with_the_default_roi_mode():
    model = mxa_model.create_model("mxa_efficientvit_m0", img_size=64)
    assert {m.roi_mode for m in model.mxa_modules()} == {"align"}
    model(torch.randn(2, 1, 64, 64)).mean().backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [dict(roi_mode="crop", fusion="gate", distilled=True), dict(fusion="authors-gate")])
def test_torchscript_runs_the_eager_references_and_matches_the_model(kwargs):
    """The scripted model (the whole-map cascade and the MXA branch with the ops' eager references)
    against the model (timm's windowed attention): 160x128 pads stage 1's 10x8 map to 2x2 windows."""
    with timm.layers.set_scriptable(True):
        model = _randomize(mxa_model.create_model("mxa_efficientvit_m0", img_size=(160, 128), **kwargs)).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 1, 160, 128)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception, match="built for 160x128 images, got 128x128"):
        scripted(torch.randn(2, 1, 128, 128))


def test_fx_feature_extraction_keeps_the_fused_modules_whole():
    from torchvision.models.feature_extraction import create_feature_extractor
    from timm.models import get_notrace_modules

    model = _randomize(mxa_model.create_model("mxa_efficientvit_m0", img_size=64))
    extractor = create_feature_extractor(model, return_nodes={"stages.2": "features", "head": "logits"},
                                         tracer_kwargs=dict(leaf_modules=get_notrace_modules()))
    called = {node.target for node in extractor.graph.nodes if node.op == "call_module"}
    assert "stages.0.blocks.0.mxa" in called and "stages.0.blocks.0.mixer.m" in called
    x = torch.randn(2, 1, 64, 64)
    out = extractor(x)
    torch.testing.assert_close(out["features"], model.forward_features(x))
    torch.testing.assert_close(out["logits"], model(x))
    out["logits"].mean().backward()
    assert [name for name, p in extractor.named_parameters() if p.grad is None] == []


def test_hugging_face_format_round_trip(tmp_path):
    from timm.models import save_for_hf

    for n, kwargs in enumerate([{}, dict(roi_mode="crop", fusion="gate", distilled=True, num_classes=5,
                                         img_size=(96, 64))]):
        model = _randomize(mxa_model.create_model("mxa_efficientvit_m0", **kwargs)).eval()
        save_for_hf(model, tmp_path / str(n))
        saved_args = json.loads((tmp_path / str(n) / "config.json").read_text())["model_args"]
        assert saved_args["roi_mode"] == kwargs.get("roi_mode", "align")  # recorded even when left at its default
        loaded = timm.create_model(f"local-dir:{tmp_path / str(n)}", pretrained=True).eval()
        x = torch.randn(2, 1, *model.input_hw)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
        assert {m.roi_mode for m in loaded.mxa_modules()} == {kwargs.get("roi_mode", "align")}
    with pytest.raises(ValueError, match="no pretrained weights are published.*local-dir:DIR"):
        timm.create_model("mxa_efficientvit_m0", pretrained=True)


def test_a_classifier_put_back_after_the_pooling_was_removed_brings_the_pooling_back():
    model = mxa_model.create_model("mxa_efficientvit_m0", img_size=64, num_classes=0, global_pool="")
    x = torch.randn(2, 1, 64, 64)
    assert model(x).shape == (2, model.num_features, 1, 1)
    model.reset_classifier(3)
    assert model.global_pool.pool_type == "avg" and model(x).shape == (2, 3)


@pytest.mark.parametrize("fusion", ["authors", "authors-gate"])
def test_authors_block_computes_their_formula(fusion):
    """The authors' block, composed here from its description: x1 = (x + LWA(x)) + (x + MXA(x)) (gated:
    s (x + LWA(x)) + (1 - s) (x + MXA(x))), then x2 = x1 + DW0(x1), x3 = x2 + FFN0(x2), x4 = x3 + LWA(x3)
    with the same LWA, x5 = x4 + DW1(x4), out = x5 + FFN1(x5); random weights, crop boxes not empty."""
    from mxa_kernels import snap_boxes

    model = _randomize(mxa_model.create_model("mxa_efficientvit_m0", img_size=128, fusion=fusion, roi_mode="crop"))
    block = model.eval().stages[0].blocks[0]
    with torch.no_grad():  # boxes (0.05, 0.05, 0.95, 0.95): the 8x8 map's pixels 0..6, neither empty nor whole
        block.mxa.roi_predictor[2].weight.zero_()
        block.mxa.roi_predictor[2].bias.copy_(torch.tensor([-3.0, -3.0, 3.0, 3.0]))
    x = torch.randn(2, 64, 8, 8)
    assert snap_boxes(block.mxa.roi_boxes(x), 8, 8).tolist() == [[0, 0, 7, 7]] * 2
    lwa, mxa = block.mixer.m, block.mxa
    with torch.no_grad():
        if fusion == "authors":
            x1 = (x + lwa(x)) + (x + mxa(x))
        else:
            s = torch.sigmoid(block.alpha)
            x1 = s * (x + lwa(x)) + (1 - s) * (x + mxa(x))
        x2 = x1 + block.dw0.m(x1)
        x3 = x2 + block.ffn0.m(x2)
        x4 = x3 + lwa(x3)
        x5 = x4 + block.dw1.m(x4)
        torch.testing.assert_close(block(x), x5 + block.ffn1.m(x5))


def _in_the_authors_layout(state):
    """A state_dict in the authors' checkpoint names (Microsoft's Cream EfficientViT: patch_embed.0/2/4/6,
    blocks1..3 with the downsampling as blocksN.0/.1/.2, c/bn pairs, head.l, mxa.m, poi_predictor)."""
    import re

    out = {}
    for key, value in state.items():
        key = re.sub(r"^patch_embed\.conv(\d)", lambda m: f"patch_embed.{2 * (int(m[1]) - 1)}", key)
        key = re.sub(r"^stages\.0\.blocks\.(\d+)", r"blocks1.\1", key)
        key = re.sub(r"^stages\.(\d)\.downsample\.(res1|patchmerge|res2)",
                     lambda m: f"blocks{int(m[1]) + 1}.{('res1', 'patchmerge', 'res2').index(m[2])}", key)
        key = re.sub(r"^stages\.(\d)\.blocks\.(\d+)", lambda m: f"blocks{int(m[1]) + 1}.{int(m[2]) + 3}", key)
        key = key.replace(".mxa.roi_predictor.", ".mxa.m.poi_predictor.").replace(".mxa.", ".mxa.m.")
        key = key.replace(".mxa.m.m.", ".mxa.m.").replace(".conv.", ".c.").replace("head.linear.", "head.l.")
        out[key.replace("head_dist.linear.", "head_dist.l.")] = value
    return out


@pytest.mark.parametrize("fusion", ["authors", "authors-gate"])
def test_authors_checkpoint_layout_loads_and_reproduces_the_model(tmp_path, fusion):
    import argparse

    kwargs = dict(img_size=64, fusion=fusion, roi_mode="crop", distilled=True)
    source = _randomize(mxa_model.create_model("mxa_efficientvit_m0", **kwargs)).eval()
    theirs = _in_the_authors_layout(source.state_dict())
    # names of the authors' model as their code builds it (Cream's Conv2d_BN, Residual, FFN, PatchMerging)
    assert {"patch_embed.6.c.weight", "blocks1.0.mxa.m.poi_predictor.0.weight", "blocks2.0.0.m.c.weight",
            "blocks2.0.1.m.pw1.c.weight", "blocks2.1.conv1.c.weight", "blocks2.1.se.fc1.weight",
            "blocks2.2.1.m.pw2.bn.running_var", "blocks2.3.mixer.m.attn.qkvs.0.c.weight",
            "blocks3.5.mixer.m.attn.proj.1.c.weight", "blocks3.5.mxa.m.spatial_attention.0.weight",
            "head.l.weight", "head_dist.bn.weight"} <= set(theirs)
    theirs["blocks1.0.mixer.m.attn.attention_bias_idxs"] = torch.zeros(49, 49, dtype=torch.long)
    torch.save({"model": theirs, "args": argparse.Namespace(lr=1e-3), "epoch": 49}, tmp_path / "authors.pth")
    model = mxa_model.create_model("mxa_efficientvit_m0", **kwargs, pretrained_file=str(tmp_path / "authors.pth"))
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), source(x))
    other = "authors" if fusion == "authors-gate" else "authors-gate"
    for wrong, fix in ((dict(fusion="sum"), f"fusion='{fusion}'"), (dict(fusion=other), f"fusion='{fusion}'"),
                       (dict(roi_mode="align"), "roi_mode='crop'"), (dict(distilled=False), "distilled=True")):
        with pytest.raises(CheckpointMismatchError, match=f"authors' model.*build it with {fix}"):
            mxa_model.create_model("mxa_efficientvit_m0", **dict(kwargs, **wrong),
                                   pretrained_file=str(tmp_path / "authors.pth"))


def test_a_cream_efficientvit_checkpoint_without_mxa_loads_its_backbone(tmp_path):
    source = _randomize(timm.create_model("efficientvit_m0", in_chans=1, num_classes=14, img_size=64))
    cream = _in_the_authors_layout(source.state_dict())
    torch.save({"model": cream}, tmp_path / "cream.pth")
    model = mxa_model.create_model("mxa_efficientvit_m0", img_size=64, pretrained_file=str(tmp_path / "cream.pth"))
    mine = model.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in source.state_dict().items() if k in mine)
