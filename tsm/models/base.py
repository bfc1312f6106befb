"""What every model family shares: `Components` (a loaded model) and `Family` (how to load, encode prompts
for, call and decode one kind of diffusers model).

Everything uses the real ``from_pretrained`` of diffusers and transformers on a hub id or a local folder in
diffusers layout (``unet/`` or ``transformer/``, ``vae/``, ``text_encoder*/``, ``tokenizer*/``,
``scheduler/``). A family differs from another only in the few methods below; the training loop and the
sampler are shared. The loop and samplers see latents (B, C, h, w) and t in [0, T].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tsm.errors import TsmError
from tsm.objectives import DDPMObjective, FlowMatchingObjective
from tsm.spec import ExpertSpec

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

    @property
    def device(self) -> torch.device:
        """Where the denoiser computes (``extra["offload"]``: where its weights come for a call)."""
        return self.extra.get("offload") or next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's compute dtype (``extra["compute_dtype"]`` when its weights are stored in float8)."""
        return self.extra.get("compute_dtype") or next(self.denoiser.parameters()).dtype

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
    # the training objective's defaults where the config leaves them None: the family's reference script's
    default_weighting = "none"  # objective.weighting: the timestep density (diffusers' weighting_scheme)
    default_precondition = False  # objective.precondition_outputs (flow models)
    # sampling defaults of `tsm sample` and validation grids: the family's diffusers pipeline's own
    default_steps = 50  # StableDiffusionPipeline's num_inference_steps
    default_guidance = 7.5  # and guidance_scale

    @property
    def text_expert_subfolders(self) -> tuple[str, ...]:
        """The text encoders that get ``text_targets`` experts."""
        return self.text_subfolders

    # --- loading ---------------------------------------------------------------------------------
    def load(
        self,
        path: str,
        revision: str | None = None,
        prediction_type: str | None = None,
        objective: Mapping[str, Any] | None = None,
    ) -> Components:
        """Load every component with ``from_pretrained``; ``objective`` holds the training objective's options
        (``ObjectiveConfig``'s fields: weighting, logit_mean, logit_std, mode_scale, min_snr_gamma, shift,
        noise_offset)."""
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
        scheduler = self.sampling_scheduler(path, revision)
        obj = self.objective(
            scheduler.config, prediction_type, objective
        )  # the folder's schedule (and shift)
        for m in (denoiser, vae, *encoders.values()):
            m.requires_grad_(False)
            m.eval()
        return Components(self, denoiser, encoders, tokenizers, vae, scheduler, obj, path)

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
        self, scheduler_config: Any, prediction_type: str | None, options: Mapping[str, Any] | None = None
    ) -> DDPMObjective | FlowMatchingObjective:
        """The training objective of the model's scheduler, with the config's density and loss weighting."""
        from diffusers import DDPMScheduler

        kw = _objective_options(options, self.default_weighting)
        for key in ("shift", "precondition_outputs"):
            if kw.pop(key) is not None:
                raise TsmError(
                    f"objective.{key} applies to flow-matching models; leave it unset for this family"
                )
        override = {"prediction_type": prediction_type} if prediction_type else {}
        return DDPMObjective.from_scheduler(DDPMScheduler.from_config(scheduler_config, **override), **kw)

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

    def zero_negative(self, c: Components, negative_prompt: str) -> bool:
        """Whether guidance's unconditional half is zeros rather than the encoded negative prompt (SDXL)."""
        return False

    def size_conditioning(
        self,
        c: Components,
        cond: dict[str, torch.Tensor],
        latents: torch.Tensor,
        original_sizes: Any = None,
        crop_top_lefts: Any = None,
    ) -> dict[str, torch.Tensor]:
        """``cond`` plus the per-image size conditioning some denoisers take (SDXL's ``time_ids``), added
        after `encode_prompt` and its per-caption cache; ``original_sizes`` [(h, w)] and ``crop_top_lefts``
        [(top, left)] per sample, None when unknown (sampling). Default: ``cond`` unchanged."""
        return cond

    # --- denoiser ------------------------------------------------------------------------------------
    def denoise(
        self, c: Components, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        return c.denoiser(x, t, **cond).sample

    def denoiser_parts(self, c: Components, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Which denoiser (by `Components.modules` name) `denoise` runs for each sample of timesteps ``t`` (B,):
        {name: (B,) bool}. One denoiser here; Wan 2.2 has a high-noise and a low-noise transformer."""
        return {self.denoiser_subfolder: torch.ones(t.shape, dtype=torch.bool, device=t.device)}

    def part_specs(self, c: Components, spec: ExpertSpec) -> dict[str, ExpertSpec]:
        """The experts of each denoiser of `denoiser_parts`, given the config's ``spec`` over [0, T)."""
        return {self.denoiser_subfolder: spec}

    # what logs and file names call each denoiser of `denoiser_parts` (default: its module name)
    part_labels: dict[str, str] = {}

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

    def latent_shape(
        self, c: Components, resolution: int | tuple[int, int], num_frames: int
    ) -> tuple[int, ...]:
        """One sample's latent shape for ``resolution``: a square side, or (height, width), in pixels."""
        factor = 2 ** (len(c.vae.config.block_out_channels) - 1)
        height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
        ch = c.vae.config.latent_channels
        h, w = height // factor, width // factor
        return (ch, num_frames, h, w) if self.video else (ch, h, w)


def _objective_options(options: Mapping[str, Any] | None, default_weighting: str) -> dict[str, Any]:
    """ObjectiveConfig's fields as keyword arguments of the objectives' ``from_scheduler``."""
    kw = dict(options or {})
    kw.setdefault("shift", None)
    kw.setdefault("precondition_outputs", None)
    if kw.get("weighting") is None:
        kw["weighting"] = default_weighting
    return kw
