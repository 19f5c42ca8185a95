"""Model families; importing this module registers them with timm."""
from . import agent_deit, agent_pvt, mambavision, maxxvit, nat, swin, tome  # noqa: F401
