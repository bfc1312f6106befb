"""What the rectified-flow families share: the flow-matching objective and sampler, and (Flux, Qwen-Image)
2x2-packed latent tokens with t / 1000 and resolution-shifted sigmas.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from tsm.errors import TsmError
from tsm.models.base import Components, Family, _load, _objective_options
from tsm.objectives import FlowMatchingObjective


class FlowFamily(Family):
    """Rectified-flow transformers: FlowMatchEulerDiscreteScheduler for sampling, t = sigma * 1000."""

    denoiser_subfolder = "transformer"

    def sampling_scheduler(self, path: str, revision: str | None) -> Any:
        import diffusers

        return _load(diffusers.FlowMatchEulerDiscreteScheduler, path, "scheduler", revision)

    def objective(
        self, scheduler_config: Any, prediction_type: str | None, options: Mapping[str, Any] | None = None
    ) -> FlowMatchingObjective:
        """Flow matching on the scheduler's own training table (its shift), as diffusers' training scripts."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        kw = _objective_options(options, self.default_weighting)
        if kw["precondition_outputs"] is None:
            kw["precondition_outputs"] = self.default_precondition
        if kw.pop("min_snr_gamma", None) is not None:
            raise TsmError(
                "objective.min_snr_gamma applies to epsilon/v-prediction models; flow models weight by objective.weighting"
            )
        return FlowMatchingObjective.from_scheduler(
            FlowMatchEulerDiscreteScheduler.from_config(scheduler_config), **kw
        )


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches as tokens, the pipelines' ``_pack_latents``."""
    b, ch, h, w = x.shape
    x = x.view(b, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), ch * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w): the inverse of `pack_latents`."""
    b, _, ch4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, ch4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return x.reshape(b, ch4 // 4, h, w)


def calculate_shift(
    image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float
) -> float:
    """mu for resolution-dependent shifting: linear in the image token count (the Flux/QwenImage pipelines')."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


class PackedFlowFamily(FlowFamily):
    """Transformers fed 2x2-packed latent tokens and t / 1000, with sigmas shifted by the image token count."""

    default_text_targets: list[str] = []  # Glance and the paper's recipes tune only the transformer
    timestep_scale = 1000.0  # the transformer gets t / 1000: experts route on t in [0, 1000]

    def vae_factor(self, c: Components) -> int:
        return 2 ** (len(c.vae.config.block_out_channels) - 1)

    def latent_shape(self, c: Components, resolution: int, num_frames: int) -> tuple[int, ...]:
        factor = self.vae_factor(c)
        if resolution % (2 * factor):
            raise TsmError(
                f"{self.name} needs a resolution divisible by {2 * factor} (2x2 latent patches), got {resolution}"
            )
        return (self.latent_channels(c), resolution // factor, resolution // factor)

    def latent_channels(self, c: Components) -> int:
        return c.vae.config.latent_channels

    def set_timesteps(
        self, c: Components, steps: int, resolution: int, device: torch.device | str | None = None
    ) -> None:
        """Sigmas 1 .. 1/steps, shifted by mu from the image token count, as the diffusers pipelines set them."""
        config = c.scheduler.config
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        mu = None
        if config.get("use_dynamic_shifting"):
            tokens = (self.latent_shape(c, resolution, 1)[-1] // 2) ** 2
            mu = calculate_shift(
                tokens,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )
        if sigmas is None:
            c.scheduler.set_timesteps(steps, device=device, mu=mu)
        else:
            c.scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
