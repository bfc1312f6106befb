"""Stable Diffusion 1.x/2.x: UNet2DConditionModel + CLIP, epsilon or v-prediction (DDPM)."""

from __future__ import annotations

from tsm.models.base import Family
from tsm.models.registry import register


@register
class SD15(Family):
    name = "sd15"
    denoiser_class = "UNet2DConditionModel"
