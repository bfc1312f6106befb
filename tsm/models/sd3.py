"""Stable Diffusion 3: SD3Transformer2DModel (MM-DiT) + two CLIP encoders + T5, flow matching."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tsm.models.base import Components
from tsm.models.flow import FlowFamily
from tsm.models.registry import register


@register
class SD3(FlowFamily):
    name = "sd3"
    denoiser_class = "SD3Transformer2DModel"
    text_subfolders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    default_text_targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    max_t5_length = 256
    default_weighting = "logit_normal"  # train_dreambooth_lora_sd3.py's defaults
    default_precondition = True
    default_steps, default_guidance = 28, 7.0  # StableDiffusion3Pipeline's

    text_expert_subfolders = ("text_encoder", "text_encoder_2")  # the paper tunes the two CLIP encoders

    def text_class_of(self, i: int) -> str:
        return "T5EncoderModel" if i == 2 else "CLIPTextModelWithProjection"

    def encode_prompt(self, c: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        hidden, pooled = [], []
        for sub in ("text_encoder", "text_encoder_2"):
            enc = c.text_encoders[sub]
            ids, _ = self._tokens(
                c.tokenizers[sub.replace("text_encoder", "tokenizer")], captions, enc.device
            )
            out = enc(ids, output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        clip = torch.cat(hidden, dim=-1)  # (B, 77, d1 + d2)
        t5_enc = c.text_encoders["text_encoder_3"]
        tok = c.tokenizers["tokenizer_3"]
        max_length = min(tok.model_max_length, self.max_t5_length)
        ids = tok(captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        t5 = t5_enc(ids.input_ids.to(t5_enc.device))[0]  # (B, L, d_t5)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip, t5], dim=-2),
            "pooled_projections": torch.cat(pooled, -1),
        }

    def denoise(
        self, c: Components, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        return c.denoiser(hidden_states=x, timestep=t, **cond).sample
