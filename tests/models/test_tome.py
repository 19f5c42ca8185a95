"""The registered ToMe variants: timm's ViT / DeiT with apply_tome, loading timm's plain checkpoints."""
import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from visionzoo import apply_tome
from visionzoo.layers.token_merging import ToMeBlock, parse_r

SIZE = 96  # 36 patches + the class token
DEPTH = 3


def _image(height=SIZE, width=SIZE):
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))


def _token_counts(tokens, schedule, protected=1):
    counts = [tokens]
    for r in schedule:
        counts.append(counts[-1] - min(r, (counts[-1] - protected) // 2))
    return counts[1:]


@pytest.mark.parametrize(
    "name, plain, r",
    [
        ("visionzoo_vit_s_tome", "vit_small_patch16_224.augreg_in21k_ft_in1k", 13),
        ("visionzoo_vit_b_tome", "vit_base_patch16_224.augreg_in21k_ft_in1k", 13),
        ("visionzoo_vit_l_tome", "vit_large_patch16_224.augreg_in21k_ft_in1k", 8),
        ("visionzoo_deit_t_tome", "deit_tiny_patch16_224.fb_in1k", 13),
        ("visionzoo_deit_s_tome", "deit_small_patch16_224.fb_in1k", 13),
        ("visionzoo_deit_b_tome", "deit_base_patch16_224.fb_in1k", 13),
    ],
)
def test_variants_are_timms_vit_with_the_papers_r(name, plain, r):
    with torch.device("meta"):
        model = timm.create_model(name)
        reference = timm.create_model(plain)
    assert isinstance(model, VisionTransformer) and all(isinstance(block, ToMeBlock) for block in model.blocks)
    assert [block._tome_r for block in model.blocks] == [r] * len(reference.blocks)
    shapes = {key: value.shape for key, value in reference.state_dict().items()}
    assert {key: value.shape for key, value in model.state_dict().items()} == shapes
    cfg, timm_cfg = model.pretrained_cfg, reference.pretrained_cfg
    assert cfg["hf_hub_id"] == timm_cfg["hf_hub_id"] == f"timm/{plain}"
    for key in ("mean", "std", "crop_pct", "interpolation", "input_size", "num_classes", "license"):
        assert cfg[key] == timm_cfg[key], key


@pytest.mark.parametrize(
    "name, plain",
    [("visionzoo_vit_s_tome", "vit_small_patch16_224"), ("visionzoo_deit_t_tome", "deit_tiny_patch16_224")],
)
def test_timms_plain_checkpoint_loads_unchanged(name, plain, tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model(plain, img_size=SIZE, depth=DEPTH).eval()
    path = tmp_path / "plain.pth"
    torch.save(reference.state_dict(), path)
    overlay = dict(file=str(path))
    loaded = {
        r: timm.create_model(
            name, img_size=SIZE, depth=DEPTH, pretrained=True, pretrained_cfg_overlay=overlay, tome_r=r
        )
        for r in (0, 13)
    }
    loaded = {r: model.eval() for r, model in loaded.items()}
    image = _image()
    with torch.no_grad():
        assert torch.equal(loaded[0](image), reference(image))
        merged = loaded[13](image)
        torch.testing.assert_close(merged, apply_tome(reference, 13)(image), rtol=0, atol=0)
    assert not torch.allclose(merged, loaded[0](image), atol=1e-3)


def test_schedule_argument():
    with torch.device("meta"):
        model = timm.create_model("visionzoo_vit_s_tome", tome_r=(8, 0.5))
    assert [block._tome_r for block in model.blocks] == parse_r(12, (8, 0.5)) == [4, 4, 5, 6, 6, 7, 8, 9, 9, 10, 11, 12]


def test_intermediates_are_token_sets_with_merged_counts():
    torch.manual_seed(0)
    model = timm.create_model("visionzoo_vit_s_tome", img_size=SIZE, depth=DEPTH).eval()
    image = _image()
    counts = _token_counts(37, [13] * DEPTH)
    assert counts == [24, 13, 7]
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(image, indices=[0, 1, 2], output_fmt="NLC")
        assert [tuple(x.shape) for x in intermediates] == [(2, count - 1, 384) for count in counts]
        assert final.shape == (2, counts[-1], 384)
        with pytest.raises(ValueError, match="no longer form an H x W grid; use output_fmt='NLC'"):
            model.forward_intermediates(image)
        torch.manual_seed(0)
        features = timm.create_model(
            "visionzoo_vit_s_tome", img_size=SIZE, depth=DEPTH, features_only=True, out_indices=(0, 1)
        ).eval()
        assert len(features.model.blocks) == 2  # pruned after the last output
        for feature, expected in zip(features(image), intermediates[:2]):
            torch.testing.assert_close(feature, expected)
        # without merging, timm's maps come back
        unmerged = timm.create_model("visionzoo_vit_s_tome", img_size=SIZE, depth=DEPTH, tome_r=0).eval()
        assert unmerged.forward_intermediates(image, indices=[1], intermediates_only=True)[0].shape == (2, 384, 6, 6)


def test_other_input_sizes_with_dynamic_img_size():
    model = timm.create_model(
        "visionzoo_deit_t_tome", img_size=SIZE, depth=DEPTH, dynamic_img_size=True, dynamic_img_pad=True
    ).eval()
    for height, width in ((128, 96), (100, 76)):
        image = _image(height, width)
        with torch.no_grad():
            assert model(image).shape == (2, 1000)
            tokens = model.forward_intermediates(image, indices=[0], output_fmt="NLC", intermediates_only=True)
        patches = -(-height // 16) * -(-width // 16)
        assert tokens[0].shape == (2, _token_counts(patches + 1, [13])[0] - 1, 192)
