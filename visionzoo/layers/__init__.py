"""Attention modules and the blocks that model families share, each built on :mod:`visionzoo.kernels`.

* :mod:`.neighborhood_attention` - NAT / DiNAT attention;
* :mod:`.window_attention` - Swin's (shifted) window attention;
* :mod:`.vsa_attention` - varied-size window attention (VSA);
* :mod:`.activations` - tanh-GELU on the C++ kernel;
* :mod:`.agent_attention` - agent attention (Agent-Swin / PVT / DeiT);
* :mod:`.halo_attention` - HaloNet's halo attention (blocked queries, zero-padded halo windows);
* :mod:`.mamba_mixer` - MambaVision's selective-scan token mixer;
* :mod:`.conv_norm` - convolution + BatchNorm folded into one convolution at inference;
* :mod:`.norm_act` - BatchNorm + ReLU on the fused training kernel;
* :mod:`.fast_linear` - linear layers and MLP on oneDNN for CPU inference;
* :mod:`.transformer_block` - pre-norm block around any channels-last attention module;
* :mod:`.downsample` - NAT's conv downsampler, Swin's patch merging;
* :mod:`.windows` - cutting a map into windows and back;
* :mod:`.stage` - downsampler + blocks, with gradient checkpointing;
* :mod:`.relative_position` - relative position bias indices (Swin's and NAT's conventions),
  cropping and resizing tables;
* :mod:`.swap` - giving timm's modules the class of a visionzoo subclass in place;
* :mod:`.model_base` - timm's model API (features, intermediates, pruning, head) for channels-last models.
"""
from .activations import GELUTanh, use_fast_gelu_tanh
from .agent_attention import AgentAttention, agent_position_biases, resize_agent_biases
from .fast_linear import Mlp, fused_linear_available, linear, split_linear
from .conv_norm import FoldedConvNormAct, fold_batch_norm, fold_conv_norm_act
from .downsample import ConvDownsample, PatchMerging, create_downsample
from .halo_attention import HaloAttention, halo_attention
from .mamba_mixer import MambaVisionMixer
from .model_base import ChannelsLastModel, check_image
from .neighborhood_attention import NeighborhoodAttention2d, fit_window
from .norm_act import FusedBatchNormAct2d, conv_norm_add_act, use_fused_batch_norm
from .relative_position import (
    crop_rel_pos_table,
    relative_position_index_key_minus_query,
    relative_position_index_query_minus_key,
    resize_rel_pos_table,
    rpb_from_query_minus_key_table,
)
from .stage import Stage
from .swap import swap_classes
from .transformer_block import TransformerBlock
from .vsa_attention import VSAWindowAttention, vsa_sampling_grid
from .window_attention import WindowAttention, fit_window_shift
from .windows import window_partition, window_reverse

__all__ = [
    "AgentAttention",
    "ChannelsLastModel",
    "ConvDownsample",
    "FoldedConvNormAct",
    "FusedBatchNormAct2d",
    "GELUTanh",
    "HaloAttention",
    "MambaVisionMixer",
    "Mlp",
    "NeighborhoodAttention2d",
    "PatchMerging",
    "Stage",
    "TransformerBlock",
    "VSAWindowAttention",
    "WindowAttention",
    "agent_position_biases",
    "check_image",
    "conv_norm_add_act",
    "create_downsample",
    "crop_rel_pos_table",
    "fit_window",
    "fit_window_shift",
    "fold_batch_norm",
    "fold_conv_norm_act",
    "fused_linear_available",
    "halo_attention",
    "linear",
    "relative_position_index_key_minus_query",
    "relative_position_index_query_minus_key",
    "resize_agent_biases",
    "resize_rel_pos_table",
    "rpb_from_query_minus_key_table",
    "split_linear",
    "swap_classes",
    "use_fast_gelu_tanh",
    "use_fused_batch_norm",
    "vsa_sampling_grid",
    "window_partition",
    "window_reverse",
]
