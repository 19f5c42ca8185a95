"""Transformer block, downsamplers and stage."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.swin_transformer import PatchMerging as TimmPatchMerging

from visionzoo.layers import ConvDownsample, PatchMerging, Stage, TransformerBlock, create_downsample


def _randomize(module):
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.5)
    return module


@pytest.mark.parametrize("height, width", [(8, 6), (7, 5)])
def test_patch_merging_equals_swins(height, width):
    ours = _randomize(PatchMerging(6, 10))
    theirs = TimmPatchMerging(6, 10)
    theirs.load_state_dict(ours.state_dict())  # same parameter names and shapes
    x = torch.randn(2, height, width, 6)
    out = ours(x)
    assert out.shape == (2, (height + 1) // 2, (width + 1) // 2, 10)
    torch.testing.assert_close(out, theirs(x))


def test_conv_downsample():
    module = _randomize(ConvDownsample(4, 8))
    x = torch.randn(2, 7, 9, 4)
    expected = F.conv2d(x.permute(0, 3, 1, 2), module.reduction.weight, stride=2, padding=1).permute(0, 2, 3, 1)
    expected = F.layer_norm(expected, (8,), module.norm.weight, module.norm.bias)
    torch.testing.assert_close(module(x), expected)
    assert module(x).shape == (2, 4, 5, 8)
    assert module.reduction.bias is None


def test_create_downsample():
    assert isinstance(create_downsample("conv", 4, 8), ConvDownsample)
    assert isinstance(create_downsample("merge", 4, 8), PatchMerging)
    assert isinstance(create_downsample(None, 4, 4), nn.Identity)
    with pytest.raises(ValueError, match="downsample_type=None keeps the width"):
        create_downsample(None, 4, 8)
    with pytest.raises(ValueError, match="downsample_type must be"):
        create_downsample("pool", 4, 8)


def test_transformer_block_computes_pre_norm_residuals():
    dim = 8
    block = _randomize(TransformerBlock(dim, nn.Linear(dim, dim), mlp_ratio=2.0, layer_scale=1e-1)).eval()
    x = torch.randn(2, 3, 5, dim)
    h = x + block.ls1.gamma * block.attn(F.layer_norm(x, (dim,), block.norm1.weight, block.norm1.bias))
    y = F.layer_norm(h, (dim,), block.norm2.weight, block.norm2.bias)
    y = F.linear(F.gelu(F.linear(y, block.mlp.fc1.weight, block.mlp.fc1.bias)), block.mlp.fc2.weight, block.mlp.fc2.bias)
    torch.testing.assert_close(block(x), h + block.ls2.gamma * y)
    assert block.mlp.fc1.out_features == 16


def test_transformer_block_names_and_options():
    plain = TransformerBlock(8, nn.Identity())
    names = {name for name, _ in plain.named_parameters()}
    assert names == {f"{m}.{p}" for m in ("norm1", "norm2", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")}
    scaled = TransformerBlock(8, nn.Identity(), layer_scale=1e-5)
    assert {"ls1.gamma", "ls2.gamma"} <= {name for name, _ in scaled.named_parameters()}
    torch.testing.assert_close(scaled.ls1.gamma, torch.full((8,), 1e-5))
    # stochastic depth drops whole samples' branches in training only
    dropping = _randomize(TransformerBlock(8, nn.Identity(), drop_path=0.5))
    x = torch.randn(64, 2, 2, 8)
    torch.manual_seed(0)
    train_out = dropping.train()(x)
    eval_out = dropping.eval()(x)
    assert not torch.allclose(train_out, eval_out)
    # a sample whose two branches were both dropped comes out unchanged (probability 1/4 each)
    unchanged = [torch.equal(out, sample) for out, sample in zip(train_out, x)]
    assert 0 < sum(unchanged) < len(unchanged)


def test_stage_runs_downsample_then_blocks_and_checkpoints():
    torch.manual_seed(0)
    blocks = [TransformerBlock(8, nn.Linear(8, 8)) for _ in range(2)]
    stage = Stage(blocks, downsample=ConvDownsample(4, 8))
    x = torch.randn(2, 8, 8, 4, requires_grad=True)
    out = stage(x)
    torch.testing.assert_close(out, stage.blocks(stage.downsample(x)))
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    stage.grad_checkpointing = True
    out_ckpt = stage(x)
    (grad_ckpt,) = torch.autograd.grad(out_ckpt.square().sum(), x)
    torch.testing.assert_close(out_ckpt, out)
    torch.testing.assert_close(grad_ckpt, grad)
    assert isinstance(Stage(blocks).downsample, nn.Identity)
