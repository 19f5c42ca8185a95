"""Swin Transformer, Swin-Free and Swin-Free-BR, built on :func:`visionzoo.kernels.na2d`.

Papers:
    * Swin Transformer: Hierarchical Vision Transformer using Shifted Windows (ICCV 2021) -
      https://arxiv.org/abs/2103.14030
    * Swin-Free: Achieving Better Cross-Window Attention and Efficiency with Size-varying Window -
      https://arxiv.org/abs/2306.13776

Official code and weights: https://github.com/microsoft/Swin-Transformer (MIT). The Swin-Free
variants follow NVIDIA's DL4AGX patch (no weights released).

* **Swin**: window attention with the window grid shifted by ``window // 2`` on odd blocks, a
  relative position bias per window offset, 4x4 patch embedding and patch merging. A stage whose
  map is not larger than the window takes the map as its window and never shifts (stage 4 at 224).
* **Swin-Free**: no shift; one window per stage, ``[7, 14, 14, 7]`` at 224 (stages 3 and 4 are one
  global window each). The windows keep their ratio to the feature maps at other resolutions:
  ``window_i = max(1, window_i(224) * (img_size / 4) // 56)`` (timm's rule for resizing Swin), e.g.
  ``[12, 24, 24, 12]`` at 384.
* **Swin-Free-BR**: Swin-Free with ``BatchNorm1d`` applied to ``[B, tokens, C]``, i.e. normalising
  over the *token* axis with statistics per position (:class:`TokenBatchNorm`), ReLU MLPs and patch
  merging without its norm. The norms are sized for the token count of ``img_size``, so the model
  takes only that input size (224 by default).

Layout: timm's (``stages.{i}.downsample`` starts stage ``i``, ``head.fc``); ``checkpoint_filter_fn``
loads official Microsoft checkpoints (downsample at the end of stage ``i``) and timm's Swin state dicts.
Inputs of any size run (except BR): maps are padded to a multiple of the window as timm does (see
:class:`visionzoo.layers.WindowAttention`), so logits equal timm's Swin given the same weights.

Dense prediction (the declaration at the end, mm types ``Swin`` and ``SwinFree``) uses the official
detection / segmentation window layout (``pad_before_shift``), and ``checkpoint_filter_fn`` reads
mmdet's / mmseg's Swin checkpoints too.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ClassifierHead,
    PatchEmbed,
    calculate_drop_path_rates,
    register_notrace_module,
    to_2tuple,
)
from timm.models import generate_default_cfgs, register_model

from visionzoo.layers import (
    ChannelsLastModel,
    PatchMerging,
    Stage,
    TransformerBlock,
    WindowAttention,
    resize_rel_pos_table,
)

from .build import build_model, getter_feature_cfg
from .dense import DenseArch, DenseFamily, register_dense_family

__all__ = ["FixedSizePatchEmbed", "SwinTransformer", "TokenBatchNorm", "stage_window_sizes"]

_int_or_tuple_2_t = Union[int, Tuple[int, int]]
_PATCH_SIZE = 4


def stage_window_sizes(
    window_size: Union[_int_or_tuple_2_t, Sequence[_int_or_tuple_2_t]],
    num_stages: int,
    img_size: _int_or_tuple_2_t,
    window_img_size: Optional[_int_or_tuple_2_t] = None,
) -> Tuple[Tuple[int, int], ...]:
    """One ``(h, w)`` window per stage at ``img_size``.

    ``window_size`` is one window (int or ``(h, w)``) or one per stage (ints or ``(h, w)``). With ``window_img_size``
    the windows were given for that input size and keep their ratio to the patch grid:
    ``max(1, window * grid // grid_ref)`` per dimension (``grid = img_size // 4``); without it they
    stay as given (Swin).
    """
    if isinstance(window_size, int) or (len(window_size) == 2 and all(isinstance(w, int) for w in window_size)):
        windows = [to_2tuple(window_size)] * num_stages  # as in timm, two ints are one (h, w) window
    else:
        windows = [to_2tuple(w) for w in window_size]
    if len(windows) != num_stages or min(min(w) for w in windows) < 1:
        raise ValueError(f"window_size must be one window >= 1 or one per stage ({num_stages}), got {window_size}")
    if window_img_size is None:
        return tuple(windows)
    grid = [s // _PATCH_SIZE for s in to_2tuple(img_size)]
    grid_ref = [s // _PATCH_SIZE for s in to_2tuple(window_img_size)]
    return tuple(tuple(max(1, w * g // r) for w, g, r in zip(window, grid, grid_ref)) for window in windows)


@register_notrace_module  # checks the token count of its input: a leaf for torch.fx
class TokenBatchNorm(nn.BatchNorm1d):
    """``BatchNorm1d`` over the token axis of ``[B, H, W, C]`` (Swin-Free-BR): one mean / variance per
    token position (``num_tokens = H * W`` features), taken over the batch and the channels.

    ``dim`` (the channels) is accepted for the ``norm_layer(dim)`` interface and unused; other
    keyword arguments (``device``, ``dtype``) go to ``BatchNorm1d``.
    """

    def __init__(self, dim: int, num_tokens: int, **kwargs: Any):
        super().__init__(num_tokens, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        if height * width != self.num_features:
            raise ValueError(
                f"TokenBatchNorm normalises each of {self.num_features} token positions, got a {height}x{width} map"
            )
        return super().forward(x.reshape(batch, height * width, channels)).reshape(x.shape)


@register_notrace_module  # checks the input's size: a leaf for torch.fx
class FixedSizePatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` for models that take one input size only (``img_size``): any other
    size is a ValueError naming both."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and tuple(x.shape[-2:]) != tuple(self.img_size):
            raise ValueError(
                f"this model normalises over token positions (BatchNorm1d over H*W tokens), so it takes only "
                f"{self.img_size[0]}x{self.img_size[1]} inputs (img_size); got {x.shape[-2]}x{x.shape[-1]}"
            )
        return super().forward(x)


def _no_norm(dim: int) -> nn.Module:
    return nn.Identity()


class SwinTransformer(ChannelsLastModel):
    """Swin / Swin-Free / Swin-Free-BR: 4x4 patch embedding, 4 stages of window attention blocks at
    strides 4, 8, 16, 32, patch merging between them.

    Args:
        img_size: input size the windows are fitted to (and, for BR, the only input size).
        in_chans: input channels.
        num_classes: classifier outputs (0: no classifier).
        global_pool: pooling of the head (timm ``ClassifierHead`` types, ``''`` for none).
        embed_dim: width of stage 0; stage ``i`` has ``embed_dim * 2**i`` channels.
        depths: blocks per stage.
        num_heads: heads per stage.
        window_size: window, one for all stages or one per stage (see :func:`stage_window_sizes`).
        window_img_size: the input size ``window_size`` is given for, if the windows scale with the
            input size (Swin-Free: 224); None keeps them (Swin).
        shifted: shift the window grid by ``window // 2`` on odd blocks (Swin).
        norm_type: ``'layer'`` (LayerNorm over channels) or ``'token_batch'`` (:class:`TokenBatchNorm`,
            fixing the input size to ``img_size``; patch merging then has no norm).
        mlp_ratio: MLP hidden width over block width.
        qkv_bias: bias in the qkv projections.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after the attention projection and in the MLP.
        attn_drop_rate: must be 0 (the softmax is inside the op).
        drop_path_rate: stochastic depth, increasing linearly over blocks up to this value.
        act_layer: MLP activation.
        pad_before_shift: the official detection / segmentation layout (mmdet / mmseg Swin): every
            stage keeps its window and shift whatever the map size, and maps are padded before the
            grid is shifted (see :class:`visionzoo.layers.WindowAttention`); the dense
            declaration at the end of this file sets it. ``False``: timm's / the classification
            code's (windows fitted to ``img_size`` and to small maps, padding after the shift).
        attn_layer: the attention module, called as ``attn_layer(dim, num_heads, window_size=,
            qkv_bias=, attn_drop=, proj_drop=)``, with ``shift_size=`` when ``shifted`` and
            ``pad_before_shift=True`` when set: :class:`visionzoo.layers.WindowAttention` (Swin),
            :class:`visionzoo.layers.VSAWindowAttention` (Swin-VSA, unshifted).
    """

    no_weight_decay_patterns = ("*.relative_position_bias_table",)

    def __init__(
        self,
        img_size: _int_or_tuple_2_t = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: Union[_int_or_tuple_2_t, Sequence[_int_or_tuple_2_t]] = 7,
        window_img_size: Optional[_int_or_tuple_2_t] = None,
        shifted: bool = True,
        norm_type: str = "layer",
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        act_layer: type = nn.GELU,
        pad_before_shift: bool = False,
        attn_layer: Callable[..., nn.Module] = WindowAttention,
    ):
        super().__init__()
        num_stages = len(depths)
        if len(num_heads) != num_stages:
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have one entry per stage")
        if norm_type not in ("layer", "token_batch"):
            raise ValueError(f"norm_type must be 'layer' or 'token_batch', got {norm_type!r}")
        self.img_size = to_2tuple(img_size)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.output_fmt = "NHWC"
        dims = [int(embed_dim * 2**i) for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]
        grid = [s // _PATCH_SIZE for s in self.img_size]
        sizes = [tuple(-(-g // 2**i) for g in grid) for i in range(num_stages)]

        def norm_layer(size):
            if norm_type == "layer":
                return nn.LayerNorm
            return functools.partial(TokenBatchNorm, num_tokens=size[0] * size[1])

        self.patch_embed = (FixedSizePatchEmbed if norm_type == "token_batch" else PatchEmbed)(
            img_size=self.img_size,
            patch_size=_PATCH_SIZE,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=norm_layer(sizes[0]),
            output_fmt="NHWC",
            strict_img_size=False,
            dynamic_img_pad=True,
        )
        windows = stage_window_sizes(window_size, num_stages, self.img_size, window_img_size)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages = []
        self.feature_info = []
        attn_kwargs: Dict[str, Any] = dict(qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=proj_drop_rate)
        if pad_before_shift:
            attn_kwargs["pad_before_shift"] = True
        for i in range(num_stages):
            if pad_before_shift:
                window = windows[i]
                shift = tuple(w // 2 for w in window) if shifted else (0, 0)
            else:  # Swin's rule: a map not larger than the window is the window, unshifted
                window = tuple(min(w, s) for w, s in zip(windows[i], sizes[i]))
                shift = tuple(w // 2 if s > w else 0 for w, s in zip(window, sizes[i])) if shifted else (0, 0)
            shifts = [dict(shift_size=shift if j % 2 else 0) if shifted else {} for j in range(depths[i])]
            blocks = [
                TransformerBlock(
                    dims[i],
                    attn_layer(dims[i], num_heads[i], window_size=window, **shifts[j], **attn_kwargs),
                    mlp_ratio=mlp_ratio,
                    proj_drop=proj_drop_rate,
                    drop_path=dpr[i][j],
                    act_layer=act_layer,
                    norm_layer=norm_layer(sizes[i]),
                )
                for j in range(depths[i])
            ]
            downsample = None
            if i > 0:
                merge_norm = nn.LayerNorm if norm_type == "layer" else _no_norm
                downsample = PatchMerging(dims[i - 1], dims[i], norm_layer=merge_norm)
            stages.append(Stage(blocks, downsample=downsample))
            self.feature_info.append(dict(num_chs=dims[i], reduction=_PATCH_SIZE * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)

        self.norm = norm_layer(sizes[-1])(self.num_features)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt="NHWC"
        )
        self.apply(self._init_weights)



def _has(model: nn.Module, key: str) -> bool:
    try:
        model.get_parameter(key)
    except AttributeError:
        return False
    return True


# mmdet / mmseg Swin key -> this layout; ``stages.{i}.downsample`` moves to stage i + 1 separately
_MM_RENAMES = (
    (r"^patch_embed\.projection\.", "patch_embed.proj."),
    (r"\.attn\.w_msa\.", ".attn."),
    (r"\.ffn\.layers\.0\.0\.", ".mlp.fc1."),
    (r"\.ffn\.layers\.1\.", ".mlp.fc2."),
)
# nn.Unfold's kernel offsets (dy, dx) = (0, 0), (0, 1), (1, 0), (1, 1) in the concatenation order
_UNFOLD_TO_CONCAT = [0, 2, 1, 3]


def _from_mm(key: str, value: torch.Tensor) -> Tuple[str, torch.Tensor]:
    """One mmdet / mmseg Swin backbone entry in this layout (see :func:`checkpoint_filter_fn`)."""
    for pattern, replacement in _MM_RENAMES:
        key = re.sub(pattern, replacement, key)
    match = re.match(r"^stages\.(\d+)\.downsample\.(.*)$", key)
    if match is None:
        return key, value
    if match[2] == "reduction.weight":  # [out, C * 4] with inputs c * 4 + k
        out_dim, in_dim = value.shape
        value = value.reshape(out_dim, in_dim // 4, 4)[:, :, _UNFOLD_TO_CONCAT].transpose(1, 2).reshape(out_dim, in_dim)
    elif match[2] in ("norm.weight", "norm.bias"):
        value = value.reshape(-1, 4)[:, _UNFOLD_TO_CONCAT].t().reshape(-1)
    return f"stages.{int(match[1]) + 1}.downsample.{match[2]}", value


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: SwinTransformer) -> Dict[str, torch.Tensor]:
    """Convert an official Microsoft / DL4AGX or a timm Swin checkpoint to this module layout.

    * official (``{'model': sd}``, ``layers.{i}.downsample`` ending stage ``i``, ``head``): the
      downsampler moves to ``stages.{i+1}``, ``head`` -> ``head.fc``;
    * timm (``layers.{i}.downsample`` starting stage ``i``, ``head.fc``): ``layers`` -> ``stages``;
    * mmdet / mmseg (the backbone of their dense checkpoints, ``backbone.`` stripped:
      ``patch_embed.projection``, ``stages.{i}.blocks.{j}.attn.w_msa``, ``ffn.layers.0.0`` /
      ``ffn.layers.1``, ``stages.{i}.downsample`` ending stage ``i``): renamed, and the patch
      merging weights reordered from their ``nn.Unfold`` channel order (``c * 4 + 2 * dy + dx``) to
      the concatenation order ``(dy, dx) = (0, 0), (1, 0), (0, 1), (1, 1)`` major;
    * the ``relative_position_index`` / ``attn_mask`` buffers and the modules of Swin-Free-BR's
      patch merging that its forward never uses (``expansion``, ``norm``) are dropped;
    * bias tables of another window are resized to the model's (bicubic, as timm does).

    Keys already in this layout pass through.
    """
    state_dict = state_dict.get("model", state_dict)
    state_dict = state_dict.get("state_dict", state_dict)
    # the official code ends stage 0 with a downsampler, timm (and this layout) never has one there
    official = "layers.0.downsample.reduction.weight" in state_dict
    mm = "patch_embed.projection.weight" in state_dict
    out = {}
    for key, value in state_dict.items():
        if re.search(r"(relative_position_index|attn_mask)$|\.downsample\.expansion\.", key):
            continue
        if mm:
            key, value = _from_mm(key, value)
        if official:
            key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"stages.{int(m[1]) + 1}.downsample.", key)
            key = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", key)
        key = re.sub(r"^layers\.(\d+)\.", r"stages.\1.", key)
        if re.match(r"stages\.\d+\.downsample\.norm\.", key) and not _has(model, key):
            continue  # Swin-Free-BR's patch merging holds a norm it never applies
        if key.endswith(".relative_position_bias_table"):
            attn = model.get_submodule(key[: -len(".relative_position_bias_table")])
            value = resize_rel_pos_table(value, attn.window_size)
        out[key] = value
    return out


def _create_swin(
    variant: str,
    pretrained: bool = False,
    pretrained_filter_fn: Callable[[Dict[str, Any], SwinTransformer], Dict[str, torch.Tensor]] = checkpoint_filter_fn,
    **kwargs,
) -> SwinTransformer:
    feature_cfg = getter_feature_cfg(kwargs)
    return build_model(
        SwinTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=pretrained_filter_fn,
        feature_cfg=feature_cfg,
        **kwargs,
    )


_URL = "https://github.com/SwinTransformer/storage/releases/download/"


def _cfg(url: str = "", **kwargs) -> Dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head.fc",
        "license": "mit",
        "paper_ids": "arXiv:2103.14030",
        "paper_name": "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
        "origin_url": "https://github.com/microsoft/Swin-Transformer",
        **kwargs,
    }


def _free_cfg(**kwargs) -> Dict[str, Any]:
    # no released weights: the license is this implementation's
    return _cfg(
        license="apache-2.0",
        paper_ids="arXiv:2306.13776",
        paper_name="Swin-Free: Achieving Better Cross-Window Attention and Efficiency with Size-varying Window",
        origin_url="https://github.com/NVIDIA/DL4AGX",
        **kwargs,
    )


_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)
_IN22K = dict(num_classes=21841)

default_cfgs = generate_default_cfgs({
    "visionzoo_swin_t.ms_in1k": _cfg(_URL + "v1.0.0/swin_tiny_patch4_window7_224.pth"),
    "visionzoo_swin_t.ms_in22k_ft_in1k": _cfg(_URL + "v1.0.8/swin_tiny_patch4_window7_224_22kto1k_finetune.pth"),
    "visionzoo_swin_t.ms_in22k": _cfg(_URL + "v1.0.8/swin_tiny_patch4_window7_224_22k.pth", **_IN22K),
    "visionzoo_swin_s.ms_in22k_ft_in1k": _cfg(_URL + "v1.0.8/swin_small_patch4_window7_224_22kto1k_finetune.pth"),
    "visionzoo_swin_s.ms_in1k": _cfg(_URL + "v1.0.0/swin_small_patch4_window7_224.pth"),
    "visionzoo_swin_s.ms_in22k": _cfg(_URL + "v1.0.8/swin_small_patch4_window7_224_22k.pth", **_IN22K),
    "visionzoo_swin_b.ms_in22k_ft_in1k": _cfg(_URL + "v1.0.0/swin_base_patch4_window7_224_22kto1k.pth"),
    "visionzoo_swin_b.ms_in1k": _cfg(_URL + "v1.0.0/swin_base_patch4_window7_224.pth"),
    "visionzoo_swin_b.ms_in22k": _cfg(_URL + "v1.0.0/swin_base_patch4_window7_224_22k.pth", **_IN22K),
    "visionzoo_swin_b_384.ms_in22k_ft_in1k": _cfg(_URL + "v1.0.0/swin_base_patch4_window12_384_22kto1k.pth", **_384),
    "visionzoo_swin_b_384.ms_in1k": _cfg(_URL + "v1.0.0/swin_base_patch4_window12_384.pth", **_384),
    "visionzoo_swin_b_384.ms_in22k": _cfg(_URL + "v1.0.0/swin_base_patch4_window12_384_22k.pth", **_384, **_IN22K),
    "visionzoo_swin_l.ms_in22k_ft_in1k": _cfg(_URL + "v1.0.0/swin_large_patch4_window7_224_22kto1k.pth"),
    "visionzoo_swin_l.ms_in22k": _cfg(_URL + "v1.0.0/swin_large_patch4_window7_224_22k.pth", **_IN22K),
    "visionzoo_swin_l_384.ms_in22k_ft_in1k": _cfg(_URL + "v1.0.0/swin_large_patch4_window12_384_22kto1k.pth", **_384),
    "visionzoo_swin_l_384.ms_in22k": _cfg(_URL + "v1.0.0/swin_large_patch4_window12_384_22k.pth", **_384, **_IN22K),
    "visionzoo_swin_free_t": _free_cfg(),
    "visionzoo_swin_free_s": _free_cfg(),
    "visionzoo_swin_free_b": _free_cfg(),
    "visionzoo_swin_free_b_dr12": _free_cfg(),
    "visionzoo_swin_free_br_t": _free_cfg(fixed_input_size=True),
    "visionzoo_swin_free_br_s": _free_cfg(fixed_input_size=True),
    "visionzoo_swin_free_br_b": _free_cfg(fixed_input_size=True),
    "visionzoo_swin_free_br_b_dr12": _free_cfg(fixed_input_size=True),
})

_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_B_DR12 = dict(embed_dim=128, depths=(2, 2, 12, 2), num_heads=(4, 8, 16, 32))
_L = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
_FREE = dict(window_size=((7, 7), (14, 14), (14, 14), (7, 7)), window_img_size=224, shifted=False)
_BR = dict(_FREE, norm_type="token_batch", act_layer=nn.ReLU)


@register_model
def visionzoo_swin_t(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin-T: 2-2-6-2 blocks, 96 channels, window 7."""
    model_args = dict(_T, window_size=7, drop_path_rate=0.2)
    return _create_swin("visionzoo_swin_t", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_swin_s(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin-S: 2-2-18-2 blocks, 96 channels, window 7."""
    model_args = dict(_S, window_size=7, drop_path_rate=0.3)
    return _create_swin("visionzoo_swin_s", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_swin_b(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin-B: 2-2-18-2 blocks, 128 channels, window 7."""
    model_args = dict(_B, window_size=7, drop_path_rate=0.5)
    return _create_swin("visionzoo_swin_b", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_swin_b_384(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin-B at 384: window 12."""
    model_args = dict(_B, window_size=12, img_size=384, drop_path_rate=0.5)
    return _create_swin("visionzoo_swin_b_384", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_swin_l(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin-L: 2-2-18-2 blocks, 192 channels, window 7 (ImageNet-22K pre-trained)."""
    model_args = dict(_L, window_size=7, drop_path_rate=0.2)
    return _create_swin("visionzoo_swin_l", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_swin_l_384(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin-L at 384: window 12."""
    model_args = dict(_L, window_size=12, img_size=384, drop_path_rate=0.2)
    return _create_swin("visionzoo_swin_l_384", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_swin_free_t(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin-Free-T: Swin-T without shift, windows 7-14-14-7 at 224."""
    model_args = dict(_T, **_FREE, drop_path_rate=0.2)
    return _create_swin("visionzoo_swin_free_t", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_swin_free_s(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin-Free-S: Swin-S without shift, windows 7-14-14-7 at 224."""
    model_args = dict(_S, **_FREE, drop_path_rate=0.3)
    return _create_swin("visionzoo_swin_free_s", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_swin_free_b(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin-Free-B: Swin-B without shift, windows 7-14-14-7 at 224."""
    model_args = dict(_B, **_FREE, drop_path_rate=0.5)
    return _create_swin("visionzoo_swin_free_b", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_swin_free_b_dr12(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin-Free-B-DR12: Swin-Free-B with 12 blocks in stage 3 (2-2-12-2)."""
    model_args = dict(_B_DR12, **_FREE, drop_path_rate=0.5)
    return _create_swin("visionzoo_swin_free_b_dr12", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_swin_free_br_t(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin-Free-BR-T: Swin-Free-T with token-axis BatchNorm and ReLU (224 inputs only)."""
    model_args = dict(_T, **_BR, drop_path_rate=0.2)
    return _create_swin("visionzoo_swin_free_br_t", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_swin_free_br_s(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin-Free-BR-S: Swin-Free-S with token-axis BatchNorm and ReLU (224 inputs only)."""
    model_args = dict(_S, **_BR, drop_path_rate=0.3)
    return _create_swin("visionzoo_swin_free_br_s", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_swin_free_br_b(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin-Free-BR-B: Swin-Free-B with token-axis BatchNorm and ReLU (224 inputs only)."""
    model_args = dict(_B, **_BR, drop_path_rate=0.5)
    return _create_swin("visionzoo_swin_free_br_b", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_swin_free_br_b_dr12(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin-Free-BR-B-DR12: Swin-Free-BR-B with 12 blocks in stage 3 (224 inputs only)."""
    model_args = dict(_B_DR12, **_BR, drop_path_rate=0.5)
    return _create_swin("visionzoo_swin_free_br_b_dr12", pretrained=pretrained, **dict(model_args, **kwargs))


# ----------------------------------------------------------------------------------------------
# dense prediction: what visionzoo.mm registers (mmdet / mmseg backbones) and configs/ are written from
# ----------------------------------------------------------------------------------------------
def _dense_windows(model: SwinTransformer, task: str) -> Dict[str, Any]:
    """``task_kwargs``: the official dense layout (windows kept at every size, padding before the
    shift) for detection and segmentation alike, so mmdet / mmseg Swin checkpoints give their features."""
    return {"pad_before_shift": True}


# Drop path rates of the official dense configs (Swin paper; mmdet's and mmseg's swin configs):
# Mask R-CNN 1x / 3x COCO 0.2 (Swin-T, Swin-S), UperNet 160k ADE20K 0.3 (every size). Swin-B and -L
# have no official Mask R-CNN config, so no generated COCO config; Swin-L starts from ImageNet-22K.
register_dense_family(DenseFamily(
    name="swin",
    type_names=("Swin",),
    archs={
        "tiny": DenseArch("visionzoo_swin_t", "ms_in1k", dict(det=0.2, seg=0.3)),
        "small": DenseArch("visionzoo_swin_s", "ms_in1k", dict(det=0.2, seg=0.3)),
        "base": DenseArch("visionzoo_swin_b", "ms_in1k", dict(seg=0.3)),
        "base_384": DenseArch("visionzoo_swin_b_384", "ms_in1k", dict(seg=0.3)),
        "large": DenseArch("visionzoo_swin_l", "ms_in22k", dict(seg=0.3)),
        "large_384": DenseArch("visionzoo_swin_l_384", "ms_in22k", dict(seg=0.3)),
    },
    task_kwargs=_dense_windows,
    checkpoint_filter=checkpoint_filter_fn,
))
# Swin-Free: no released weights and no official dense configs, so a backbone without generated
# configs; its windows stay those of 224 (7, 14, 14, 7), padded on smaller maps.
# Swin-Free-BR is not declared: its token-axis BatchNorm fixes the input size.
register_dense_family(DenseFamily(
    name="swin_free",
    type_names=("SwinFree",),
    archs={
        "tiny": DenseArch("visionzoo_swin_free_t"),
        "small": DenseArch("visionzoo_swin_free_s"),
        "base": DenseArch("visionzoo_swin_free_b"),
        "base_dr12": DenseArch("visionzoo_swin_free_b_dr12"),
    },
    task_kwargs=_dense_windows,
    checkpoint_filter=checkpoint_filter_fn,
))
