"""Model families, one file each, found by name: ``get_family("sd15")``.

    sd15     UNet2DConditionModel + CLIP                   epsilon/v (DDPM)
    sdxl     UNet2DConditionModel + 2 CLIP (pooled)        epsilon/v (DDPM), per-image time_ids
    pixart   PixArtTransformer2DModel + T5                 epsilon (DDPM), learned sigma dropped
    sd3      SD3Transformer2DModel (MM-DiT) + 2 CLIP + T5  flow matching
    video3d  UNet3DConditionModel (VideoCrafter2-style) + CLIP, latents (B, C, F, h, w)
    flux     FluxTransformer2DModel + CLIP (pooled) + T5   flow matching, resolution shift, guidance embedding
    qwen     QwenImageTransformer2DModel + Qwen2.5-VL      flow matching, resolution shift, Qwen-Image VAE
    wan      WanTransformer3DModel + UMT5 + 3D causal VAE  flow matching (flow_shift), 4k+1-frame clips
    digits   the digits benchmark's pixel-space UNet + tiny CLIP (ships with tsm)

Importing this package imports every module in it, so each ``@register`` runs: adding a family is adding
one file.
"""

from __future__ import annotations

import importlib
import pkgutil

from tsm.models.base import ATTN, Components, Family
from tsm.models.flow import calculate_shift, pack_latents, unpack_latents
from tsm.models.registry import FAMILY_CLASSES, family_names, get_family, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ATTN",
    "FAMILY_CLASSES",
    "Components",
    "Family",
    "calculate_shift",
    "family_names",
    "get_family",
    "pack_latents",
    "register",
    "unpack_latents",
]
