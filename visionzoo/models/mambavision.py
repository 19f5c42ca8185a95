"""MambaVision: a hybrid of convolutions, Mamba mixers and self-attention (NVIDIA).

Paper: MambaVision: A Hybrid Mamba-Transformer Vision Backbone (CVPR 2025) -
https://arxiv.org/abs/2407.08083. Official code and weights: https://github.com/NVlabs/MambaVision
(NVIDIA Source Code License-NC). This is a re-implementation: it needs neither mamba_ssm nor CUDA
(the scan is :func:`visionzoo.kernels.selective_scan`, which runs on any device).

* Stem: two 3x3 stride-2 convolutions with BatchNorm (eps 1e-4) and ReLU, ``in_dim`` then ``dim``
  channels: stride 4.
* Stages 1-2: residual conv blocks (3x3 conv with bias, BN, tanh-GELU, 3x3 conv, BN).
* Stages 3-4: the map is zero padded at the bottom / right to whole windows and cut into windows
  once per stage (tokens row-major inside a window); every block runs inside the windows on the
  padded map, so the padded tokens take part in the scan and the attention, as in the official
  code. The first half of a stage's blocks are Mamba mixers (:class:`visionzoo.layers.MambaVisionMixer`),
  the rest plain multi-head self-attention (qkv bias, no position bias) on the shared window op:
  :func:`visionzoo.kernels.na2d` with ``kernel_size = stride = window``, a window being one block.
  Pre-norm blocks with LayerNorm, GELU MLP (ratio 4) and, in B / L / L2 / L3, layer scale 1e-5.
* A 3x3 stride-2 conv (no bias) doubles the channels between stages; final BatchNorm, average
  pooling, linear classifier.

The layout is timm's (``stages.{i}.downsample`` starts stage ``i``, ``head.fc``, the blocks'
``norm1 / attn / ls1 / norm2 / mlp / ls2``); :func:`checkpoint_filter_fn` maps the official
checkpoints (``levels.{i}``, ``mixer``, ``gamma_1``, ``head``). Any input size runs.

Dense prediction (the declaration at the end, mm type ``MambaVision``): the official backbone's
per-output LayerNorm and its enlarged windows (stages 3-4: 112 / 56 for detection, 64 / 32 for
segmentation).
"""
from __future__ import annotations

import re
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ClassifierHead,
    DropPath,
    calculate_drop_path_rates,
    register_notrace_module,
)
from timm.models import checkpoint_seq, generate_default_cfgs, register_model

from visionzoo.kernels import na2d
from visionzoo.layers import (
    ChannelsLastModel,
    ConvDownsample,
    GELUTanh,
    MambaVisionMixer,
    Stage,
    TransformerBlock,
    window_partition,
    window_reverse,
)
from visionzoo.layers.token_merging import register_merge2d_attention

from .build import build_model, getter_feature_cfg
from .dense import DenseArch, DenseFamily, register_dense_family

__all__ = ["MambaVision", "attention_blocks", "checkpoint_filter_fn"]

_NUM_CONV_STAGES = 2


def attention_blocks(depth: int) -> range:
    """Indices of a windowed stage's self-attention blocks: its second half (the middle block of an
    odd depth is a mixer), the official placement."""
    return range(depth // 2 + 1 if depth % 2 else depth // 2, depth)


@register_notrace_module  # BatchNorm checks its input's rank: a leaf for torch.fx, as torch's own norms
class ChannelsLastBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` on ``[B, H, W, C]`` (the final norm of a model whose stages are channels-last)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class Stem(nn.Module):
    """``[B, in_chans, H, W] -> [B, H/4, W/4, dim]``: two 3x3 stride-2 convs (no bias), each with BN and ReLU."""

    def __init__(self, in_chans: int, in_dim: int, dim: int):
        super().__init__()
        self.conv_down = nn.Sequential(
            nn.Conv2d(in_chans, in_dim, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(in_dim, eps=1e-4),
            nn.ReLU(),
            nn.Conv2d(in_dim, dim, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(dim, eps=1e-4),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_down(x).permute(0, 2, 3, 1)


class ConvBlock(nn.Module):
    """``x + drop_path(BN(conv(GELU_tanh(BN(conv(x))))))`` with 3x3 convs (bias); NCHW."""

    def __init__(self, dim: int, drop_path: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(dim)
        self.act1 = GELUTanh()
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x))))))


@register_merge2d_attention
@register_notrace_module  # the window op checks its inputs' shapes: a leaf for torch.fx
class WindowSelfAttention(nn.Module):
    """Multi-head self-attention over the tokens of one window: ``[B', window**2, dim]`` in and out,
    tokens row-major. Runs on :func:`na2d` with ``kernel_size = stride = window`` (one block)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, window_size={self.window_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        window = self.window_size
        q, k, v = self.qkv(x).view(batch, window, window, 3, self.num_heads, self.head_dim).unbind(3)
        x = na2d(q, k, v, kernel_size=window, stride=window)
        return self.proj_drop(self.proj(x.reshape(batch, tokens, channels)))


class MambaVisionStage(Stage):
    """A :class:`visionzoo.layers.Stage` whose blocks run on NCHW maps (conv stages,
    ``window_size=None``) or inside windows (``window_size``: the map is padded and cut into
    windows once, see :func:`window_partition`); ``[B, H, W, C]`` in and out."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: Optional[nn.Module], window_size: Optional[int]):
        super().__init__(blocks, downsample)
        self.window_size = window_size

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}" if self.window_size else ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.window_size is None:
            return self._run(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        height, width = x.shape[1], x.shape[2]
        x = self._run(window_partition(x, self.window_size))
        return window_reverse(x, self.window_size, height, width)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


def _per_stage(value: Union[int, Sequence[int]], num_stages: int, name: str) -> Tuple[int, ...]:
    values = (value,) * num_stages if isinstance(value, int) else tuple(value)
    if len(values) != num_stages:
        raise ValueError(f"{name} must be one int or one per stage ({num_stages}), got {value}")
    return values


class MambaVision(ChannelsLastModel):
    """MambaVision; ``[B, in_chans, H, W] -> [B, num_classes]``, any ``H, W``.

    Args:
        img_size: accepted for timm's API; nothing depends on it (the windows are given per stage).
        in_chans, num_classes, global_pool: as in timm.
        dim: width of stage 1 (stage ``i`` has ``dim * 2**i`` channels).
        in_dim: width of the stem's first conv.
        depths: blocks per stage; the first two stages are conv blocks, the others mixer and
            attention blocks (:func:`attention_blocks`).
        num_heads: attention heads per stage (the conv stages' are unused).
        window_size: window per stage, one int or one per stage (the conv stages' are unused, as
            in the official configs).
        mlp_ratio: MLP width over block width.
        layer_scale: initial layer scale of the mixer / attention blocks; ``None``: none.
        qkv_bias: bias in the attention's qkv projection.
        d_state, d_conv: the mixers' state size and convolution taps.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after the attention projection and in the MLPs.
        drop_path_rate: stochastic depth, rising linearly over all blocks to this value.
    """

    no_weight_decay_patterns = ("*.A_log", "*.D")  # the mixer's state matrix and skip (Mamba's convention)

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        dim: int = 80,
        in_dim: int = 32,
        depths: Sequence[int] = (1, 3, 8, 4),
        num_heads: Union[int, Sequence[int]] = (2, 4, 8, 16),
        window_size: Union[int, Sequence[int]] = (8, 8, 14, 7),
        mlp_ratio: float = 4.0,
        layer_scale: Optional[float] = None,
        qkv_bias: bool = True,
        d_state: int = 8,
        d_conv: int = 3,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
    ):
        super().__init__()
        num_stages = len(depths)
        if num_stages <= _NUM_CONV_STAGES:
            raise ValueError(f"depths needs more than {_NUM_CONV_STAGES} stages (the first are conv stages), got {depths}")
        num_heads = _per_stage(num_heads, num_stages, "num_heads")
        windows = _per_stage(window_size, num_stages, "window_size")
        if min(windows) < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.output_fmt = "NHWC"
        dims = [dim * 2**i for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]

        self.patch_embed = Stem(in_chans, in_dim, dim)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages, self.feature_info = [], []
        for i, depth in enumerate(depths):
            downsample = ConvDownsample(dims[i - 1], dims[i], norm_layer=nn.Identity) if i else None
            if i < _NUM_CONV_STAGES:
                blocks = [ConvBlock(dims[i], dpr[i][j]) for j in range(depth)]
                stages.append(MambaVisionStage(blocks, downsample, None))
            else:
                attention = attention_blocks(depth)
                blocks = [
                    TransformerBlock(
                        dims[i],
                        WindowSelfAttention(dims[i], num_heads[i], windows[i], qkv_bias, proj_drop_rate)
                        if j in attention else MambaVisionMixer(dims[i], d_state=d_state, d_conv=d_conv),
                        mlp_ratio=mlp_ratio,
                        layer_scale=layer_scale,
                        proj_drop=proj_drop_rate,
                        drop_path=dpr[i][j],
                    )
                    for j in range(depth)
                ]
                stages.append(MambaVisionStage(blocks, downsample, windows[i]))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)

        self.norm = ChannelsLastBatchNorm2d(self.num_features)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt="NHWC"
        )
        self.apply(self._init_weights)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: MambaVision) -> Dict[str, torch.Tensor]:
    """An official MambaVision checkpoint (``{'state_dict': sd}`` or ``sd``) in this layout.

    ``levels.{i}`` -> ``stages.{i}``, the downsampler ending official level ``i``
    (``levels.{i}.downsample.reduction.0``) starts stage ``i + 1`` (``stages.{i+1}.downsample.reduction``),
    ``mixer`` -> ``attn``, ``gamma_1`` / ``gamma_2`` -> ``ls1.gamma`` / ``ls2.gamma``, ``head`` -> ``head.fc``.
    Keys already in this layout pass unchanged.
    """
    state_dict = state_dict.get("state_dict", state_dict)
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^levels\.(\d+)\.downsample\.reduction\.0\.",
                     lambda m: f"stages.{int(m[1]) + 1}.downsample.reduction.", key)
        key = re.sub(r"^levels\.", "stages.", key)
        key = re.sub(r"\.mixer\.", ".attn.", key)
        key = re.sub(r"\.gamma_([12])$", r".ls\1.gamma", key)
        key = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", key)
        out[key] = value
    return out


def _create_mambavision(variant: str, pretrained: bool = False, **kwargs) -> MambaVision:
    feature_cfg = getter_feature_cfg(kwargs)
    return build_model(
        MambaVision,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg,
        **kwargs,
    )


def _cfg(file: str = "", repo: str = "", **kwargs) -> Dict[str, Any]:
    return {
        "url": f"https://huggingface.co/nvidia/{repo}/resolve/main/{file}" if file else "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 1.0,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.conv_down.0",
        "classifier": "head.fc",
        "license": "nvidia-source-code-license-nc",
        "paper_ids": "arXiv:2407.08083",
        "paper_name": "MambaVision: A Hybrid Mamba-Transformer Vision Backbone",
        "origin_url": "https://github.com/NVlabs/MambaVision",
        **kwargs,
    }


# crop_pct as the official validation settings
default_cfgs = generate_default_cfgs({
    "visionzoo_mambavision_t.in1k": _cfg("mambavision_tiny_1k.pth.tar", "MambaVision-T-1K"),
    "visionzoo_mambavision_t2.in1k": _cfg("mambavision_tiny2_1k.pth.tar", "MambaVision-T2-1K", crop_pct=0.98),
    "visionzoo_mambavision_s.in1k": _cfg("mambavision_small_1k.pth.tar", "MambaVision-S-1K", crop_pct=0.93),
    "visionzoo_mambavision_b.in1k": _cfg("mambavision_base_1k.pth.tar", "MambaVision-B-1K"),
    "visionzoo_mambavision_b.in21k_ft_in1k": _cfg("mambavision_base_21k.pth.tar", "MambaVision-B-21K"),
    "visionzoo_mambavision_l.in1k": _cfg("mambavision_large_1k.pth.tar", "MambaVision-L-1K"),
    "visionzoo_mambavision_l.in21k_ft_in1k": _cfg("mambavision_large_21k.pth.tar", "MambaVision-L-21K"),
    "visionzoo_mambavision_l2.in1k": _cfg("mambavision_large2_1k.pth.tar", "MambaVision-L2-1K"),
    "visionzoo_mambavision_l3_256.in21k_ft_in1k": _cfg(
        "mambavision_L3_21k_740m_256.pth.tar", "MambaVision-L3-256-21K", input_size=(3, 256, 256), pool_size=(8, 8)
    ),
})

_HEADS = (2, 4, 8, 16)
_HEADS_L = (4, 8, 16, 32)
model_args = dict(
    t=dict(depths=(1, 3, 8, 4), dim=80, in_dim=32, num_heads=_HEADS, drop_path_rate=0.2),
    t2=dict(depths=(1, 3, 11, 4), dim=80, in_dim=32, num_heads=_HEADS, drop_path_rate=0.2),
    s=dict(depths=(3, 3, 7, 5), dim=96, in_dim=64, num_heads=_HEADS, drop_path_rate=0.2),
    b=dict(depths=(3, 3, 10, 5), dim=128, in_dim=64, num_heads=_HEADS, layer_scale=1e-5, drop_path_rate=0.3),
    l=dict(depths=(3, 3, 10, 5), dim=196, in_dim=64, num_heads=_HEADS_L, layer_scale=1e-5, drop_path_rate=0.3),
    l2=dict(depths=(3, 3, 12, 5), dim=196, in_dim=64, num_heads=_HEADS_L, layer_scale=1e-5, drop_path_rate=0.3),
    l3_256=dict(depths=(3, 3, 20, 10), dim=256, in_dim=64, num_heads=_HEADS_L, window_size=(8, 8, 16, 8),
                layer_scale=1e-5, drop_path_rate=0.5),
)


def _variant(size: str, pretrained: bool, kwargs: Dict[str, Any]) -> MambaVision:
    variant = f"visionzoo_mambavision_{size}"
    return _create_mambavision(variant, pretrained=pretrained, **dict(model_args[size], **kwargs))


@register_model
def visionzoo_mambavision_t(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-T: depths 1-3-8-4, widths 80-160-320-640, windows 14 / 7."""
    return _variant("t", pretrained, kwargs)


@register_model
def visionzoo_mambavision_t2(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-T2: depths 1-3-11-4, widths 80-160-320-640, windows 14 / 7."""
    return _variant("t2", pretrained, kwargs)


@register_model
def visionzoo_mambavision_s(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-S: depths 3-3-7-5, widths 96-192-384-768, windows 14 / 7."""
    return _variant("s", pretrained, kwargs)


@register_model
def visionzoo_mambavision_b(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-B: depths 3-3-10-5, widths 128-256-512-1024, windows 14 / 7, layer scale."""
    return _variant("b", pretrained, kwargs)


@register_model
def visionzoo_mambavision_l(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-L: depths 3-3-10-5, widths 196-392-784-1568, windows 14 / 7, layer scale."""
    return _variant("l", pretrained, kwargs)


@register_model
def visionzoo_mambavision_l2(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-L2: depths 3-3-12-5, widths 196-392-784-1568, windows 14 / 7, layer scale."""
    return _variant("l2", pretrained, kwargs)


@register_model
def visionzoo_mambavision_l3_256(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-L3 at 256: depths 3-3-20-10, widths 256-512-1024-2048, windows 16 / 8, layer scale."""
    return _variant("l3_256", pretrained, kwargs)


# ----------------------------------------------------------------------------------------------
# dense prediction: what visionzoo.mm registers (mmdet / mmseg backbones) and configs/ are written from
# ----------------------------------------------------------------------------------------------
# The official dense backbone (object_detection/ and semantic_segmentation/ of the official code):
# out_indices 0-3, a LayerNorm over channels per output, and windows enlarged for the larger inputs
# (stages 3-4; the conv stages' entries are unused): Cascade Mask R-CNN 3x (8, 8, 112, 56) for
# every size, UperNet 512x512 (8, 8, 64, 32), MambaVision-S's UperNet (8, 8, 160, 56).
DENSE_WINDOWS = {"det": (8, 8, 112, 56), "seg": (8, 8, 64, 32)}
_DENSE_WINDOWS_BY_MODEL = {("visionzoo_mambavision_s", "seg"): (8, 8, 160, 56)}


def _dense_windows(model: MambaVision, task: str) -> Dict[str, Any]:
    """``task_kwargs``: the official dense windows of the variant for ``task``."""
    name = model.pretrained_cfg["architecture"]
    return {"window_size": _DENSE_WINDOWS_BY_MODEL.get((name, task), DENSE_WINDOWS[task])}


# Drop path: the official dense backbone class builds the model without passing the configs'
# drop_path_rate on (they name 0.2 / 0.3 / 0.5 for detection and 0.3 / 0.7 / 0.4 for segmentation,
# T / S / B), so every reported dense result was trained at the model's default, 0.2; declared so.
# The sizes without official dense results get no generated configs.
register_dense_family(DenseFamily(
    name="mambavision",
    type_names=("MambaVision",),
    archs={
        "tiny": DenseArch("visionzoo_mambavision_t", "in1k", dict(det=0.2, det_cascade=0.2, seg=0.2)),
        "tiny2": DenseArch("visionzoo_mambavision_t2"),
        "small": DenseArch("visionzoo_mambavision_s", "in1k", dict(det=0.2, det_cascade=0.2, seg=0.2)),
        "base": DenseArch("visionzoo_mambavision_b", "in1k", dict(det=0.2, det_cascade=0.2, seg=0.2)),
        "large": DenseArch("visionzoo_mambavision_l"),
        "large2": DenseArch("visionzoo_mambavision_l2"),
        "large3_256": DenseArch("visionzoo_mambavision_l3_256"),
    },
    task_kwargs=_dense_windows,
    checkpoint_filter=checkpoint_filter_fn,
))
