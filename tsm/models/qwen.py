"""Qwen-Image: QwenImageTransformer2DModel + Qwen2.5-VL, flow matching, resolution shift, Qwen-Image VAE."""

from __future__ import annotations

import torch

from tsm.models.base import Components
from tsm.models.flow import PackedFlowFamily, pack_latents, unpack_latents
from tsm.models.registry import register


@register
class Qwen(PackedFlowFamily):
    """Qwen-Image: Qwen2.5-VL's last hidden states after a fixed system prompt; a video-style VAE (B, C, 1, H, W).

    The prompt tokens are zero-padded to ``max_text_length`` with a mask (``encoder_hidden_states_mask``), so
    conditionings of different prompts concatenate (classifier-free guidance); masked padding does not change
    the output.
    """

    name = "qwen"
    denoiser_class = "QwenImageTransformer2DModel"
    text_class = "Qwen2_5_VLForConditionalGeneration"
    vae_class = "AutoencoderKLQwenImage"
    max_text_length = 512  # text tokens after the template (QwenImagePipeline's max_sequence_length)
    prompt_template = (
        "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
        "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # QwenImagePipeline's: 50 steps, true_cfg_scale 4 (against the empty negative prompt, as tsm samples)
    default_steps, default_guidance = 50, 4.0
    prompt_template_start = 34  # tokens of the template before the prompt, dropped from the embeddings

    def encode_prompt(self, c: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        encoder, tok = c.text_encoders["text_encoder"], c.tokenizers["tokenizer"]
        drop = self.prompt_template_start
        length = min(self.max_text_length, tok.model_max_length - drop)
        enc = tok(
            [self.prompt_template.format(p) for p in captions],
            max_length=length + drop,
            padding=True,
            truncation=True,
            return_tensors="pt",
        ).to(encoder.device)
        out = encoder(input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True)
        hidden = out.hidden_states[-1]  # (B, L, d)
        embeds = hidden.new_zeros(len(captions), length, hidden.shape[-1])  # (B, length, d)
        mask = torch.zeros(len(captions), length, dtype=torch.long, device=hidden.device)
        for i, (h, m) in enumerate(zip(hidden, enc.attention_mask.bool(), strict=True)):
            tokens = h[m][drop:]  # this prompt's tokens, the template prefix dropped
            embeds[i, : len(tokens)] = tokens
            mask[i, : len(tokens)] = 1
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}

    def denoise(
        self, c: Components, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        b, _, h, w = x.shape
        out = c.denoiser(
            hidden_states=pack_latents(x),
            timestep=t.float().expand(b) / 1000,  # float32 whatever x is: routing reads it
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
            **cond,
        )[0]  # (B, h/2 * w/2, 4C)
        return unpack_latents(out, h, w)

    # --- latents: the VAE works on (B, C, F, H, W) with one frame; per-channel mean/std normalisation ----------
    def guide(self, pred_uncond: torch.Tensor, pred_cond: torch.Tensor, scale: float) -> torch.Tensor:
        """QwenImagePipeline's true CFG: the guided velocity rescaled, per token, to the conditional one's norm."""
        h, w = pred_cond.shape[-2:]
        u, v = pack_latents(pred_uncond), pack_latents(pred_cond)  # (B, L, 4C): a token is a 2x2 patch
        guided = u + scale * (v - u)
        guided = guided * (v.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
        return unpack_latents(guided, h, w)

    def vae_factor(self, c: Components) -> int:
        return 2 ** len(c.vae.config.temperal_downsample)

    def latent_channels(self, c: Components) -> int:
        return c.vae.config.z_dim

    def _stats(self, c: Components, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(c.vae.config.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(c.vae.config.latents_std).view(1, -1, 1, 1)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    def latent_dist(self, c: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = c.vae.encode(pixels[:, :, None].to(c.vae.dtype)).latent_dist
        return dist.mean[:, :, 0], dist.std[:, :, 0]  # (B, C, h, w) each

    def scale_latents(self, c: Components, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(c, z)
        return (z - mean) / std

    def decode(self, c: Components, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(c, latents)
        z = (latents * std + mean)[:, :, None]  # (B, C, 1, h, w)
        return c.vae.decode(z.to(c.vae.dtype)).sample[:, :, 0].clamp(-1, 1)
