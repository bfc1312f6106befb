"""FLUX.1: FluxTransformer2DModel + CLIP (pooled) + T5, flow matching, resolution shift, guidance embedding."""

from __future__ import annotations

import torch

from tsm.models.base import Components
from tsm.models.flow import PackedFlowFamily, pack_latents, unpack_latents
from tsm.models.registry import register


@register
class Flux(PackedFlowFamily):
    """FLUX.1: CLIP's pooled output and T5's tokens; FLUX.1-dev also embeds a guidance scale (distilled CFG)."""

    name = "flux"
    denoiser_class = "FluxTransformer2DModel"
    # default_targets (to_q, to_k, to_v, to_out.0): the attention of the double-stream blocks, and to_q, to_k,
    # to_v of the single-stream ones, whose output projection (proj_out) is shared with their MLP
    text_subfolders = ("text_encoder", "text_encoder_2")
    max_t5_length = 512
    guidance = 3.5  # the embedded guidance of guidance-distilled checkpoints (FluxPipeline's default)
    # FluxPipeline's: 28 steps, true CFG off (true_cfg_scale 1); the embedded guidance above does the work
    default_steps, default_guidance = 28, 1.0

    def text_class_of(self, i: int) -> str:
        return "T5EncoderModel" if i == 1 else "CLIPTextModel"

    def encode_prompt(self, c: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        clip = c.text_encoders["text_encoder"]
        ids, _ = self._tokens(c.tokenizers["tokenizer"], captions, clip.device)
        pooled = clip(ids, output_hidden_states=False).pooler_output  # (B, d_clip)
        t5 = c.text_encoders["text_encoder_2"]
        tok = c.tokenizers["tokenizer_2"]
        max_length = min(tok.model_max_length, self.max_t5_length)
        ids = tok(captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        hidden = t5(ids.input_ids.to(t5.device), output_hidden_states=False)[0]  # (B, L, d_t5)
        cond = {"encoder_hidden_states": hidden, "pooled_projections": pooled}
        if c.denoiser.config.guidance_embeds:
            cond["guidance"] = torch.full((len(captions),), self.guidance, device=hidden.device)
        return cond

    def denoise(
        self, c: Components, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        b, _, h, w = x.shape
        img_ids = torch.zeros(h // 2, w // 2, 3)  # (row, column) positions of the tokens for RoPE
        img_ids[..., 1] += torch.arange(h // 2)[:, None]
        img_ids[..., 2] += torch.arange(w // 2)[None, :]
        txt_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3)
        out = c.denoiser(
            hidden_states=pack_latents(x),
            timestep=t.float().expand(b) / 1000,  # float32 whatever x is: routing reads it
            img_ids=img_ids.reshape(-1, 3).to(x.device, x.dtype),
            txt_ids=txt_ids.to(x.device, x.dtype),
            return_dict=False,
            **cond,
        )[0]  # (B, h/2 * w/2, 4C)
        return unpack_latents(out, h, w)
