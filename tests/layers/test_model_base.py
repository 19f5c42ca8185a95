"""ChannelsLastModel: timm's model API for a family built from the shared layers alone.

``TinyHierarchical`` / ``TinyIsotropic`` stand for a new family: a stem, stages (or blocks) of
:class:`TransformerBlock` around a token mixer, patch merging, a norm and a head.
"""
import pytest
import torch
import torch.nn as nn
from timm.layers import ClassifierHead
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor

from visionzoo.layers import ChannelsLastModel, Stage, TransformerBlock, create_downsample


class _Stem(nn.Module):
    def __init__(self, in_chans, dim, stride):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=stride, stride=stride)

    def forward(self, x):
        return self.proj(x).permute(0, 2, 3, 1)


class _Mixer(nn.Module):
    """A stand-in token mixer with a parameter that weight decay should skip."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros(3, 3))

    def forward(self, x):
        return self.proj(x) + self.bias_table.sum()


class TinyHierarchical(ChannelsLastModel):
    no_weight_decay_patterns = ("*.attn.bias_table",)

    def __init__(self, dims=(8, 16, 32), depths=(1, 2, 1), num_classes=5, in_chans=3):
        super().__init__()
        self.in_chans, self.num_classes, self.global_pool = in_chans, num_classes, "avg"
        self.num_features = self.head_hidden_size = dims[-1]
        self.patch_embed = _Stem(in_chans, dims[0], 4)
        self.stages = nn.Sequential(*[
            Stage(
                [TransformerBlock(dims[i], _Mixer(dims[i]), mlp_ratio=2.0) for _ in range(depths[i])],
                downsample=create_downsample("merge", dims[i - 1], dims[i]) if i else None,
            )
            for i in range(len(dims))
        ])
        self.feature_info = [dict(num_chs=d, reduction=4 * 2**i, module=f"stages.{i}") for i, d in enumerate(dims)]
        self.norm = nn.LayerNorm(dims[-1])
        self.head = ClassifierHead(dims[-1], num_classes, input_fmt="NHWC")
        self.apply(self._init_weights)


class TinyIsotropic(ChannelsLastModel):
    isotropic = True

    def __init__(self, dim=8, depth=3, num_classes=5):
        super().__init__()
        self.in_chans, self.num_classes, self.global_pool = 3, num_classes, "avg"
        self.num_features = self.head_hidden_size = dim
        self.grad_checkpointing = False
        self.patch_embed = _Stem(3, dim, 8)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, _Mixer(dim)) for _ in range(depth)])
        self.feature_info = [dict(num_chs=dim, reduction=8, module=f"blocks.{i}") for i in range(depth)]
        self.norm = nn.LayerNorm(dim)
        self.head = ClassifierHead(dim, num_classes, input_fmt="NHWC")


def _image():
    return torch.randn(2, 3, 40, 24, generator=torch.Generator().manual_seed(0))


def test_hierarchical_forward_and_intermediates():
    torch.manual_seed(0)
    model = TinyHierarchical().eval()
    image = _image()
    assert model(image).shape == (2, 5)
    final, intermediates = model.forward_intermediates(image)
    torch.testing.assert_close(final, model.forward_features(image))
    assert [tuple(f.shape) for f in intermediates] == [(2, 8, 10, 6), (2, 16, 5, 3), (2, 32, 3, 2)]
    nhwc = model.forward_intermediates(image, indices=[1], output_fmt="NHWC", intermediates_only=True)
    torch.testing.assert_close(nhwc[0], intermediates[1].permute(0, 2, 3, 1))
    normed = model.forward_intermediates(image, indices=1, norm=True, intermediates_only=True)
    torch.testing.assert_close(normed[0], model.norm(intermediates[2].permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(image, output_fmt="NCL")


def test_hierarchical_pruning_narrows_the_head():
    torch.manual_seed(0)
    model = TinyHierarchical().eval()
    image = _image()
    expected = model.forward_intermediates(image, intermediates_only=True)
    assert model.prune_intermediate_layers([0, 1]) == [0, 1]
    assert len(model.stages) == 2 and isinstance(model.norm, nn.Identity)
    assert model.num_features == model.head_hidden_size == 16 and model.num_classes == 0
    assert model(image).shape == (2, 5, 3, 16)  # no classifier, no pooling: the last kept stage
    torch.testing.assert_close(model.forward_intermediates(image, intermediates_only=True), expected[:2])


def test_api_metadata():
    model = TinyHierarchical()
    assert model.no_weight_decay() == {"stages.0.blocks.0.attn.bias_table", "stages.1.blocks.0.attn.bias_table",
                                       "stages.1.blocks.1.attn.bias_table", "stages.2.blocks.0.attn.bias_table"}
    assert model.group_matcher()["stem"] == r"^patch_embed"
    model.reset_classifier(7, "max")
    assert model.get_classifier().out_features == 7 and model.global_pool == "max"
    model.set_grad_checkpointing()
    assert all(stage.grad_checkpointing for stage in model.stages)
    iso = TinyIsotropic()
    iso.set_grad_checkpointing()
    assert iso.grad_checkpointing and iso.no_weight_decay() == set()


def test_isotropic_every_block_is_a_level():
    torch.manual_seed(0)
    model = TinyIsotropic().eval()
    image = _image()
    final, intermediates = model.forward_intermediates(image, norm=True)
    assert [tuple(f.shape) for f in intermediates] == [(2, 8, 5, 3)] * 3
    torch.testing.assert_close(final, model.forward_features(image))
    torch.testing.assert_close(intermediates[-1], final.permute(0, 3, 1, 2))  # the norm applies to every block
    model.set_grad_checkpointing()
    torch.testing.assert_close(model.forward_features(image), final)
    model.prune_intermediate_layers([1], prune_head=False)
    assert len(model.blocks) == 2 and model.num_features == 8 and model(image).shape == (2, 5)


def test_input_that_is_not_an_image_batch():
    model = TinyHierarchical(in_chans=1)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\] with C = in_chans = 1, got shape \(1, 32, 32\).*unsqueeze"):
        model(torch.randn(1, 32, 32))
    with pytest.raises(ValueError, match=r"in_chans = 1, got shape \(2, 3, 32, 32\)"):
        model.forward_intermediates(torch.randn(2, 3, 32, 32))


def test_fx_traces_through_the_shared_layers():
    torch.manual_seed(0)
    model = TinyHierarchical().eval()
    image = _image()
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    extractor = create_feature_extractor(model, return_nodes=["stages.1", "head"], tracer_kwargs=tracer_kwargs)
    out = extractor(image)
    torch.testing.assert_close(out["head"], model(image))
    torch.testing.assert_close(out["stages.1"], model.forward_intermediates(image, output_fmt="NHWC")[1][1])
