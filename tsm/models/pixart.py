"""PixArt-alpha/sigma: PixArtTransformer2DModel + T5, epsilon (DDPM); the learned sigma is dropped."""

from __future__ import annotations

import torch

from tsm.models.base import Components, Family
from tsm.models.registry import register


@register
class PixArt(Family):
    name = "pixart"
    denoiser_subfolder = "transformer"
    denoiser_class = "PixArtTransformer2DModel"
    text_class = "T5EncoderModel"
    default_text_targets = ["q", "v"]
    max_text_length = 120
    default_steps, default_guidance = 20, 4.5  # PixArtAlphaPipeline's

    def encode_prompt(self, c: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        encoder = c.text_encoders["text_encoder"]
        ids, mask = self._tokens(c.tokenizers["tokenizer"], captions, encoder.device)
        return {"encoder_hidden_states": encoder(ids, attention_mask=mask)[0], "encoder_attention_mask": mask}

    def denoise(
        self, c: Components, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        out = c.denoiser(
            x, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}, **cond
        ).sample
        if out.shape[1] == 2 * x.shape[1]:  # learned sigma: keep the noise prediction
            out = out[:, : x.shape[1]]
        return out
