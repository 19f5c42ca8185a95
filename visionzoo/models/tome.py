"""ViT and DeiT with token merging (ToMe): timm's ``VisionTransformer`` patched by :func:`apply_tome`.

The variants are timm's own ViT-S/B/L-16 and DeiT-Ti/S/B-16 with the r of the ToMe paper (13 for
ViT-S/B and DeiT, 8 for ViT-L): no new parameters, so timm's plain checkpoints load unchanged
(``pretrained=True`` fetches timm's weights; a local file through
``pretrained_cfg_overlay=dict(file=...)``). ``tome_r=`` overrides the schedule (any form
:func:`visionzoo.layers.token_merging.parse_r` takes; 0 gives the plain model).

After merging, the tokens no longer form a grid: ``forward_intermediates(output_fmt='NLC')`` and
``features_only=True`` give ``[B, N_i, C]`` token sets (N_i the tokens left after block i, prefix
tokens split off as in timm's ViT); asking for timm's NCHW maps is an error unless ``tome_r=0``.
"""
from __future__ import annotations

from typing import Any, Dict

from timm.models import generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn

from ..layers.token_merging import Schedule, apply_tome, parse_r
from .build import build_model, getter_feature_cfg

__all__ = []  # models are reached through timm.create_model


def _create_tome_vit(variant: str, pretrained: bool, default_r: Schedule, **kwargs: Any) -> VisionTransformer:
    # the schedule over the full depth: features_only keeps only the blocks up to its last output
    schedule = parse_r(kwargs["depth"], kwargs.pop("tome_r", default_r))
    feature_cfg = getter_feature_cfg(kwargs, 3, output_fmt="NLC")
    model = build_model(
        VisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg,
        **kwargs,
    )
    return apply_tome(model, schedule[:sum(isinstance(m, Block) for m in model.modules())])


def _cfg(timm_weights: str, **kwargs: Any) -> Dict[str, Any]:
    """timm's pretrained cfg for ``timm_weights`` (``architecture.tag``), loading from its Hugging Face hub copy."""
    cfg = get_pretrained_cfg(timm_weights).to_dict()
    for key in ("architecture", "tag", "url"):  # the hub copy is a plain state dict; the url an npz for some
        cfg.pop(key, None)
    return {**cfg, "custom_load": False, "pool_size": None, **kwargs}


default_cfgs = generate_default_cfgs({
    "visionzoo_vit_s_tome.augreg_in21k_ft_in1k": _cfg("vit_small_patch16_224.augreg_in21k_ft_in1k"),
    "visionzoo_vit_b_tome.augreg_in21k_ft_in1k": _cfg("vit_base_patch16_224.augreg_in21k_ft_in1k"),
    "visionzoo_vit_l_tome.augreg_in21k_ft_in1k": _cfg("vit_large_patch16_224.augreg_in21k_ft_in1k"),
    "visionzoo_deit_t_tome.fb_in1k": _cfg("deit_tiny_patch16_224.fb_in1k"),
    "visionzoo_deit_s_tome.fb_in1k": _cfg("deit_small_patch16_224.fb_in1k"),
    "visionzoo_deit_b_tome.fb_in1k": _cfg("deit_base_patch16_224.fb_in1k"),
})


@register_model
def visionzoo_vit_s_tome(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-S/16 merging 13 tokens per block (197 -> 41 tokens at 224 px)."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_tome_vit("visionzoo_vit_s_tome", pretrained, 13, **dict(args, **kwargs))


@register_model
def visionzoo_vit_b_tome(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-B/16 merging 13 tokens per block."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_tome_vit("visionzoo_vit_b_tome", pretrained, 13, **dict(args, **kwargs))


@register_model
def visionzoo_vit_l_tome(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-L/16 merging 8 tokens per block (197 -> 5 tokens over 24 blocks)."""
    args = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
    return _create_tome_vit("visionzoo_vit_l_tome", pretrained, 8, **dict(args, **kwargs))


@register_model
def visionzoo_deit_t_tome(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Ti/16 merging 13 tokens per block."""
    args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_tome_vit("visionzoo_deit_t_tome", pretrained, 13, **dict(args, **kwargs))


@register_model
def visionzoo_deit_s_tome(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-S/16 merging 13 tokens per block."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_tome_vit("visionzoo_deit_s_tome", pretrained, 13, **dict(args, **kwargs))


@register_model
def visionzoo_deit_b_tome(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-B/16 merging 13 tokens per block."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_tome_vit("visionzoo_deit_b_tome", pretrained, 13, **dict(args, **kwargs))
