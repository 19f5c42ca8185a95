"""Model families; importing this module registers them with timm."""
from . import agent_deit, agent_pvt, agent_swin, halonet, maxxvit, nat, swin, swin_vsa, tome  # noqa: F401
