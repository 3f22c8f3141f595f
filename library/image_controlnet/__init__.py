"""Pose-conditioned image-to-image ("ImageControlNet"): source face + target pose -> face at that pose.

Not a diffusion model. A feature backbone encodes the source image, a control branch injects the
target pose into the generator through zero-initialised layers (ControlNet-style), the generator
decodes the image, and a pose head reads the pose back from the generated image.

Modules: pose (angle convention, pose from keypoints), data (files, validator, dataset),
backbones, model, losses, checkpoint, train (the loop), tblog (TensorBoard + curve PNGs),
toy (synthetic head renderer and the pose-following check), argv (dash-less `key value`
arguments, as the original guide writes them).
"""
