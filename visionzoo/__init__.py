"""visionzoo: vision backbones built on local, sparse and linear attention.

Importing the package registers every model family with timm (``visionzoo_*`` names).
"""
from . import kernels, layers, models  # noqa: F401
from .layers.token_merging import apply_tome, remove_tome  # noqa: F401

__version__ = "0.1.0"
