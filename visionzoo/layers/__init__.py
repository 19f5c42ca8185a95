"""Attention modules and shared blocks, each built on :mod:`visionzoo.kernels`."""
from .neighborhood_attention import NeighborhoodAttention2d, fit_window

__all__ = ["NeighborhoodAttention2d", "fit_window"]
