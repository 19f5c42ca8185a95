"""Model families; importing this module registers them with timm."""
from . import maxxvit, nat, swin, tome  # noqa: F401
