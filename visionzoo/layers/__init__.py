"""Attention modules and shared blocks, each built on :mod:`visionzoo.kernels`."""
