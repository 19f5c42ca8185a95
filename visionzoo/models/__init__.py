"""Model families; importing this module registers them with timm."""
from . import (  # noqa: F401
    agent_deit,
    agent_pvt,
    agent_swin,
    halonet,
    mambavision,
    maxxvit,
    nat,
    swin,
    swin_vsa,
    tome,
)
