"""Swin-VSA: Swin Transformer with varied-size window attention.

Paper: VSA: Learning Varied-Size Window Attention in Vision Transformers (ECCV 2022) -
https://arxiv.org/abs/2204.08446. Official code: https://github.com/ViTAE-Transformer/ViTAE-VSA
(the VSA layer, ``vitaev2_vsa/vsa.py``; its Swin models and weights were never released).

Swin (:class:`visionzoo.models.swin.SwinTransformer`, the same stem, blocks, patch merging, widths,
depths, heads and window 7) whose every block attends with
:class:`visionzoo.layers.VSAWindowAttention`: queries on the default windows, keys and values
sampled on a window whose scale and offset each head regresses from the pooled window. The VSA
layer has no shifted windows (the official one fixes its shift to 0: the varied windows overlap
their neighbours instead), so no block is shifted. A new model starts as Swin without the shift
(zero-initialised regressors, see the layer). Parameters: Swin's plus, per block, the two
regressors ``Conv2d(dim, 2 * heads, 1)``.

Layout: Swin's (``stages.{i}.blocks.{j}.attn.{qkv, proj, relative_position_bias_table,
sampling_offsets.2, sampling_scales.2}``); ``checkpoint_filter_fn`` reads it in Swin's official
Microsoft, timm and mm layouts (the VSA layer takes the official 1x1-conv ``qkv`` / ``proj``
weights too), and plain Swin checkpoints, whose missing regressors start at zero.

Dense prediction (the declaration at the end, mm type ``SwinVSA``): the classification layer as it
is, on maps of any size (the official detection copy pads symmetrically and swaps the x / y offset
divisors; no Swin-VSA dense weights exist to keep that layout for).
"""
from __future__ import annotations

from typing import Any, Dict

import torch
from timm.models import generate_default_cfgs, register_model

from visionzoo.layers import VSAWindowAttention

from . import swin
from .dense import DenseArch, DenseFamily, register_dense_family
from .swin import SwinTransformer

__all__ = ["checkpoint_filter_fn"]


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: SwinTransformer) -> Dict[str, torch.Tensor]:
    """A Swin-VSA or Swin checkpoint in this module layout.

    Everything :func:`visionzoo.models.swin.checkpoint_filter_fn` reads (official Microsoft, timm
    and mmdet / mmseg Swin layouts, bias tables resized to the model's window). Regressors
    (``attn.sampling_offsets`` / ``attn.sampling_scales``) the checkpoint lacks take the model's
    own zero initialisation, so Swin weights start a Swin-VSA model as unshifted Swin.
    """
    out = swin.checkpoint_filter_fn(state_dict, model)
    for key, value in model.state_dict().items():
        if ".attn.sampling_" in key and key not in out:
            out[key] = value
    return out


def _create_swin_vsa(variant: str, pretrained: bool = False, **kwargs) -> SwinTransformer:
    if kwargs.get("shifted") or kwargs.get("pad_before_shift"):
        raise ValueError(f"{variant}: VSA attention has no shifted windows (shifted / pad_before_shift must be False)")
    kwargs["shifted"] = False
    return swin._create_swin(
        variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, attn_layer=VSAWindowAttention, **kwargs
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    # no released weights: the license is this implementation's
    return swin._cfg(
        license="apache-2.0",
        paper_ids="arXiv:2204.08446",
        paper_name="VSA: Learning Varied-Size Window Attention in Vision Transformers",
        origin_url="https://github.com/ViTAE-Transformer/ViTAE-VSA",
        **kwargs,
    )


default_cfgs = generate_default_cfgs({
    "visionzoo_swin_vsa_t": _cfg(),
    "visionzoo_swin_vsa_s": _cfg(),
})


@register_model
def visionzoo_swin_vsa_t(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin-T with VSA: 2-2-6-2 blocks, 96 channels, default window 7."""
    model_args = dict(swin._T, window_size=7, drop_path_rate=0.2)
    return _create_swin_vsa("visionzoo_swin_vsa_t", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_swin_vsa_s(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin-S with VSA: 2-2-18-2 blocks, 96 channels, default window 7."""
    model_args = dict(swin._S, window_size=7, drop_path_rate=0.3)
    return _create_swin_vsa("visionzoo_swin_vsa_s", pretrained=pretrained, **dict(model_args, **kwargs))


# ----------------------------------------------------------------------------------------------
# dense prediction: what visionzoo.mm registers (mmdet / mmseg backbones) and configs/ are written from
# ----------------------------------------------------------------------------------------------
# No Swin-VSA dense configs were released: the drop path rates are those of the Swin configs it
# replaces the attention of (Mask R-CNN 1x / 3x COCO 0.2, UperNet 160k ADE20K 0.3). No ImageNet
# weights either: the generated configs start from none (set ``init_cfg`` to a trained model).
register_dense_family(DenseFamily(
    name="swin_vsa",
    type_names=("SwinVSA",),
    archs={
        "tiny": DenseArch("visionzoo_swin_vsa_t", drop_path_rate=dict(det=0.2, seg=0.3)),
        "small": DenseArch("visionzoo_swin_vsa_s", drop_path_rate=dict(det=0.2, seg=0.3)),
    },
    checkpoint_filter=checkpoint_filter_fn,
))
