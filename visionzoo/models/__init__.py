"""Model families; importing this module registers them with timm."""
from . import nat, swin  # noqa: F401
