"""Stable Diffusion XL: UNet2DConditionModel with "text_time" added conditioning + two CLIP text encoders.

As ``StableDiffusionXLPipeline`` and diffusers' ``train_text_to_image_lora_sdxl.py``: the penultimate hidden
states of ``text_encoder`` (CLIPTextModel) and ``text_encoder_2`` (CLIPTextModelWithProjection) side by side,
the pooled ``text_embeds`` of ``text_encoder_2``, and per image ``time_ids`` = (original size, crop top-left,
target size) as (h, w, top, left, H, W).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tsm.errors import TsmError
from tsm.models.base import Components, Family, _load
from tsm.models.registry import register


@register
class SDXL(Family):
    name = "sdxl"
    denoiser_class = "UNet2DConditionModel"
    text_subfolders = ("text_encoder", "text_encoder_2")
    # train_text_to_image_lora_sdxl.py's --train_text_encoder targets (both encoders)
    default_text_targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    default_steps, default_guidance = 50, 5.0  # StableDiffusionXLPipeline's

    def text_class_of(self, i: int) -> str:
        return "CLIPTextModelWithProjection" if i == 1 else "CLIPTextModel"

    def load(
        self,
        path: str,
        revision: str | None = None,
        prediction_type: str | None = None,
        objective: Mapping[str, Any] | None = None,
    ) -> Components:
        c = super().load(path, revision, prediction_type, objective)
        if c.denoiser.config.get("addition_embed_type") != "text_time":
            raise TsmError(
                f"{path}/unet is not an SDXL UNet (addition_embed_type is "
                f"{c.denoiser.config.get('addition_embed_type')!r}, not 'text_time'); use model.family=sd15"
            )
        c.extra["force_zeros_for_empty_prompt"] = _force_zeros_for_empty_prompt(path, revision)
        return c

    def sampling_scheduler(self, path: str, revision: str | None) -> Any:
        """The folder's own scheduler class, as the pipeline samples with it (SDXL ships Euler)."""
        import diffusers

        try:
            config = diffusers.EulerDiscreteScheduler.load_config(
                path, subfolder="scheduler", revision=revision
            )
            name = config.get("_class_name") or ""
        except (OSError, ValueError):
            name = ""  # _load below names the problem
        cls = getattr(diffusers, name, None)
        if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
            cls = diffusers.EulerDiscreteScheduler
        return _load(cls, path, "scheduler", revision)

    # --- text --------------------------------------------------------------------------------------
    def encode_prompt(self, c: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        """``encoder_hidden_states`` (B, L, d1 + d2) and pooled ``text_embeds`` (B, proj), as the pipeline's
        ``encode_prompt`` (clip_skip None). Text-encoder experts must be routed (tsm.set_timesteps) before."""
        hidden = []
        for sub in self.text_subfolders:
            encoder = c.text_encoders[sub]
            ids, _ = self._tokens(
                c.tokenizers[sub.replace("text_encoder", "tokenizer")], captions, encoder.device
            )
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # (B, L, d): SDXL always takes the penultimate layer
        pooled = out[0]  # text_encoder_2's projected text_embeds (B, proj): "the pooled output of the final"
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def zero_negative(self, c: Components, negative_prompt: str) -> bool:
        """No negative prompt: zeros, as the pipeline's default (``force_zeros_for_empty_prompt``)."""
        return not negative_prompt and bool(c.extra.get("force_zeros_for_empty_prompt", True))

    # --- size conditioning ---------------------------------------------------------------------------
    def size_conditioning(
        self,
        c: Components,
        cond: dict[str, torch.Tensor],
        latents: torch.Tensor,
        original_sizes: Sequence[Sequence[int]] | torch.Tensor | None = None,
        crop_top_lefts: Sequence[Sequence[int]] | torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``cond`` plus ``time_ids`` (B, 6) = (original h, w, crop top, left, target H, W) per image, the
        script's ``compute_time_ids`` / the pipeline's ``_get_add_time_ids``. The target is the pixels' size
        (latents times the VAE factor); no original sizes: the target; no crops: (0, 0), as the pipeline samples.
        """
        b = latents.shape[0]
        factor = 2 ** (len(c.vae.config.block_out_channels) - 1)
        target = torch.tensor([latents.shape[-2] * factor, latents.shape[-1] * factor]).expand(b, 2)
        original = target if original_sizes is None else _pairs(original_sizes, b, "original_sizes")
        crop = torch.zeros(b, 2) if crop_top_lefts is None else _pairs(crop_top_lefts, b, "crop_top_lefts")
        time_ids = torch.cat([original.float(), crop.float(), target.float()], dim=1)  # (B, 6)
        emb = cond["text_embeds"]
        if emb.shape[0] != b:
            raise TsmError(f"sdxl got {emb.shape[0]} prompt embeddings for {b} latents")
        return {**cond, "time_ids": time_ids.to(device=latents.device, dtype=emb.dtype)}

    # --- denoiser ------------------------------------------------------------------------------------
    def denoise(
        self, c: Components, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        if "time_ids" not in cond:  # callers that skip size_conditioning (distillation): the sampling default
            cond = self.size_conditioning(c, cond, x)
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return c.denoiser(
            x, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added
        ).sample


def _pairs(values: Sequence[Sequence[int]] | torch.Tensor, b: int, what: str) -> torch.Tensor:
    """(h, w) or (top, left) per sample as a (B, 2) tensor."""
    pairs = torch.as_tensor(values if isinstance(values, torch.Tensor) else [list(v) for v in values])
    if pairs.shape != (b, 2):
        raise TsmError(
            f"the batch's {what} has shape {tuple(pairs.shape)}, expected one (h, w) pair for {b} images"
        )
    return pairs


def _force_zeros_for_empty_prompt(path: str, revision: str | None) -> bool:
    """The pipeline's config flag (model_index.json); absent means the pipeline's default, True."""
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(path, revision=revision)
    except (OSError, ValueError):
        return True
    return bool(index.get("force_zeros_for_empty_prompt", True))
