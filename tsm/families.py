"""Model families: how to load, encode prompts for, and call each kind of diffusers model.

Everything here uses the real ``from_pretrained`` of diffusers and transformers on a hub id or a local
folder in diffusers layout (``unet/`` or ``transformer/``, ``vae/``, ``text_encoder*/``, ``tokenizer*/``,
``scheduler/``). A family differs from another only in the few things below; the training loop and the
sampler are shared.

    sd15     UNet2DConditionModel + CLIP                   epsilon/v (DDPM)
    pixart   PixArtTransformer2DModel + T5                 epsilon (DDPM), learned sigma dropped
    sd3      SD3Transformer2DModel (MM-DiT) + 2 CLIP + T5  flow matching
    video3d  UNet3DConditionModel (VideoCrafter2-style) + CLIP, latents (B, C, F, h, w)
    flux     FluxTransformer2DModel + CLIP (pooled) + T5   flow matching, resolution shift, guidance embedding
    qwen     QwenImageTransformer2DModel + Qwen2.5-VL      flow matching, resolution shift, Qwen-Image VAE

The shared training loop and samplers see latents (B, C, h, w) and t in [0, T]. Flux and Qwen-Image take
2x2 patches packed into tokens and t / 1000: their ``denoise`` packs, rescales and unpacks, as their
diffusers pipelines do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tsm.errors import TsmError
from tsm.objectives import DDPMObjective, FlowMatchingObjective

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class Components:
    """A loaded model: the denoiser, its text encoders (by subfolder name), tokenizers, VAE and schedulers."""

    family: Family
    denoiser: nn.Module
    text_encoders: dict[str, nn.Module]
    tokenizers: dict[str, Any]
    vae: nn.Module
    scheduler: Any  # the model's own sampling scheduler
    objective: DDPMObjective | FlowMatchingObjective
    model_id: str
    extra: dict[str, Any] = field(default_factory=dict)

    def modules(self) -> dict[str, nn.Module]:
        """The denoiser (under its subfolder name) and the text encoders: every module that can get experts."""
        return {self.family.denoiser_subfolder: self.denoiser, **self.text_encoders}

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Components:
        """Move everything to ``device``; cast the denoiser and text encoders (not the VAE) to ``dtype``."""
        self.vae.to(device)
        for m in self.modules().values():
            m.to(device)
            if dtype is not None and dtype != next(m.parameters()).dtype:
                m.to(dtype)
        return self


def _load(cls: type, path: str, subfolder: str, revision: str | None, **kw: Any) -> Any:
    local = Path(path)
    if local.exists() and not (local / subfolder).is_dir():
        raise TsmError(f"model folder {path} has no {subfolder}/ subfolder; is it a diffusers-layout model?")
    try:
        return cls.from_pretrained(path, subfolder=subfolder, revision=revision, **kw)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TsmError(f"cannot load {subfolder} from {path!r}: {first}") from None


class Family:
    """Defaults and calling conventions of one kind of model."""

    name = ""
    denoiser_subfolder = "unet"
    denoiser_class = ""
    text_subfolders: tuple[str, ...] = ("text_encoder",)
    text_class = "CLIPTextModel"
    vae_class = "AutoencoderKL"  # a diffusers class name
    default_targets: list[str] = ATTN
    default_text_targets: list[str] = ["q_proj", "v_proj"]
    video = False
    max_text_length = 77
    # the denoiser's `timestep` argument times this is t in [0, T] (1000 for t in [0, 1])
    timestep_scale = 1.0

    @property
    def text_expert_subfolders(self) -> tuple[str, ...]:
        """The text encoders that get ``text_targets`` experts."""
        return self.text_subfolders

    # --- loading ---------------------------------------------------------------------------------
    def load(self, path: str, revision: str | None = None, prediction_type: str | None = None) -> Components:
        import diffusers
        import transformers

        if not path:
            raise TsmError("model.path is empty: give a hub id or a local diffusers folder")
        if not Path(path).exists() and Path(path).is_absolute():
            raise TsmError(f"model folder {path} does not exist")
        denoiser = _load(getattr(diffusers, self.denoiser_class), path, self.denoiser_subfolder, revision)
        vae = _load(getattr(diffusers, self.vae_class), path, "vae", revision)
        encoders, tokenizers = {}, {}
        for i, sub in enumerate(self.text_subfolders):
            cls = self.text_class_of(i)
            encoders[sub] = _load(getattr(transformers, cls), path, sub, revision)
            tok_sub = sub.replace("text_encoder", "tokenizer")
            tokenizers[tok_sub] = _load(transformers.AutoTokenizer, path, tok_sub, revision)
        scheduler_config = _load(diffusers.DDPMScheduler, path, "scheduler", revision).config
        scheduler = self.sampling_scheduler(path, revision)
        objective = self.objective(scheduler_config, prediction_type)
        for m in (denoiser, vae, *encoders.values()):
            m.requires_grad_(False)
            m.eval()
        return Components(self, denoiser, encoders, tokenizers, vae, scheduler, objective, path)

    def text_class_of(self, i: int) -> str:
        return self.text_class

    def sampling_scheduler(self, path: str, revision: str | None) -> Any:
        import diffusers

        return _load(diffusers.DDIMScheduler, path, "scheduler", revision)

    def set_timesteps(
        self, c: Components, steps: int, resolution: int, device: torch.device | str | None = None
    ) -> None:
        """Set the sampling scheduler to ``steps`` steps (resolution-dependent shifts override this)."""
        c.scheduler.set_timesteps(steps, device=device)

    def objective(
        self, scheduler_config: Any, prediction_type: str | None
    ) -> DDPMObjective | FlowMatchingObjective:
        from diffusers import DDPMScheduler

        override = {"prediction_type": prediction_type} if prediction_type else {}
        return DDPMObjective.from_scheduler(DDPMScheduler.from_config(scheduler_config, **override))

    # --- text --------------------------------------------------------------------------------------
    def _tokens(
        self, tokenizer: Any, captions: list[str], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        max_length = min(tokenizer.model_max_length, self.max_text_length)
        enc = tokenizer(
            captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        return enc.input_ids.to(device), enc.attention_mask.to(device)

    def encode_prompt(self, c: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        """Conditioning kwargs for `denoise`. Text-encoder experts must be routed (tsm.set_timesteps) before."""
        encoder = c.text_encoders["text_encoder"]
        ids, _ = self._tokens(c.tokenizers["tokenizer"], captions, encoder.device)
        return {"encoder_hidden_states": encoder(ids)[0]}

    # --- denoiser ------------------------------------------------------------------------------------
    def denoise(
        self, c: Components, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        return c.denoiser(x, t, **cond).sample

    def guide(self, pred_uncond: torch.Tensor, pred_cond: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance (Ho & Salimans 2022): the model's pipelines may combine differently."""
        return pred_uncond + scale * (pred_cond - pred_uncond)

    # --- latents ---------------------------------------------------------------------------------------
    def latent_dist(self, c: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE posterior of images (B, 3, H, W), or of clips (B, 3, F, H, W) per frame."""
        if self.video:
            b, ch, f, h, w = pixels.shape
            pixels = pixels.permute(0, 2, 1, 3, 4).reshape(b * f, ch, h, w)
        dist = c.vae.encode(pixels.to(c.vae.dtype)).latent_dist
        mean, std = dist.mean, dist.std
        if self.video:
            mean, std = (v.reshape(b, f, *v.shape[1:]).permute(0, 2, 1, 3, 4) for v in (mean, std))
        return mean, std

    def scale_latents(self, c: Components, z: torch.Tensor) -> torch.Tensor:
        shift = getattr(c.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * c.vae.config.scaling_factor

    def decode(self, c: Components, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]: (B, 3, H, W), or (B, 3, F, H, W) for video."""
        shift = getattr(c.vae.config, "shift_factor", None) or 0.0
        z = latents / c.vae.config.scaling_factor + shift
        if self.video:
            b, ch, f, h, w = z.shape
            z = z.permute(0, 2, 1, 3, 4).reshape(b * f, ch, h, w)
        x = c.vae.decode(z.to(c.vae.dtype)).sample
        if self.video:
            x = x.reshape(b, f, *x.shape[1:]).permute(0, 2, 1, 3, 4)
        return x.clamp(-1, 1)

    def latent_shape(self, c: Components, resolution: int, num_frames: int) -> tuple[int, ...]:
        factor = 2 ** (len(c.vae.config.block_out_channels) - 1)
        side = resolution // factor
        ch = c.vae.config.latent_channels
        return (ch, num_frames, side, side) if self.video else (ch, side, side)


class SD15(Family):
    name = "sd15"
    denoiser_class = "UNet2DConditionModel"


class Video3D(Family):
    name = "video3d"
    denoiser_class = "UNet3DConditionModel"
    default_targets = ["to_k", "to_v"]  # spatial and temporal attention
    default_text_targets = ["out_proj"]
    video = True


class PixArt(Family):
    name = "pixart"
    denoiser_subfolder = "transformer"
    denoiser_class = "PixArtTransformer2DModel"
    text_class = "T5EncoderModel"
    default_text_targets = ["q", "v"]
    max_text_length = 120

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


class FlowFamily(Family):
    """Rectified-flow transformers: FlowMatchEulerDiscreteScheduler for sampling, t = sigma * 1000."""

    denoiser_subfolder = "transformer"

    def sampling_scheduler(self, path: str, revision: str | None) -> Any:
        import diffusers

        return _load(diffusers.FlowMatchEulerDiscreteScheduler, path, "scheduler", revision)

    def objective(self, scheduler_config: Any, prediction_type: str | None) -> FlowMatchingObjective:
        return FlowMatchingObjective(1000)


class SD3(FlowFamily):
    name = "sd3"
    denoiser_class = "SD3Transformer2DModel"
    text_subfolders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    default_text_targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    max_t5_length = 256

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


# ---------------------------------------------------------------------------------------------------------
# packed-token flow transformers: FLUX.1 and Qwen-Image
# ---------------------------------------------------------------------------------------------------------
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


class Flux(PackedFlowFamily):
    """FLUX.1: CLIP's pooled output and T5's tokens; FLUX.1-dev also embeds a guidance scale (distilled CFG)."""

    name = "flux"
    denoiser_class = "FluxTransformer2DModel"
    # default_targets (to_q, to_k, to_v, to_out.0): the attention of the double-stream blocks, and to_q, to_k,
    # to_v of the single-stream ones, whose output projection (proj_out) is shared with their MLP
    text_subfolders = ("text_encoder", "text_encoder_2")
    max_t5_length = 512
    guidance = 3.5  # the embedded guidance of guidance-distilled checkpoints (FluxPipeline's default)

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


FAMILY_CLASSES: dict[str, type[Family]] = {
    "sd15": SD15,
    "pixart": PixArt,
    "sd3": SD3,
    "video3d": Video3D,
    "flux": Flux,
    "qwen": Qwen,
}


def get_family(name: str) -> Family:
    if name == "digits":  # the digits benchmark's pixel-space model (tsm.bench), for configs/digits_*.yaml
        from tsm.bench.digits_model import DigitsFamily

        return DigitsFamily()
    if name not in FAMILY_CLASSES:
        raise TsmError(f"unknown model family {name!r}; choose one of {', '.join(FAMILY_CLASSES)}")
    return FAMILY_CLASSES[name]()
