"""Model families; importing this module registers them with timm."""
