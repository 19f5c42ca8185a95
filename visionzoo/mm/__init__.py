"""mmdetection / mmsegmentation backbones (import ``visionzoo.mm``; needs the ``mm`` extra)."""
