"""VideoCrafter2-style video: UNet3DConditionModel + CLIP, latents (B, C, F, h, w)."""

from __future__ import annotations

from tsm.models.base import Family
from tsm.models.registry import register


@register
class Video3D(Family):
    name = "video3d"
    denoiser_class = "UNet3DConditionModel"
    default_targets = ["to_k", "to_v"]  # spatial and temporal attention
    default_text_targets = ["out_proj"]
    video = True
    default_steps, default_guidance = 50, 9.0  # TextToVideoSDPipeline's
