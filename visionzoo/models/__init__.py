"""Model families; importing this module registers them with timm."""
from . import nat  # noqa: F401
from . import tome  # noqa: F401
