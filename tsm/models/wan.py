"""Wan 2.1-style text-to-video: WanTransformer3DModel + UMT5 + AutoencoderKLWan (3D causal VAE), flow matching.

Every number is WanPipeline's (``diffusers/pipelines/wan/pipeline_wan.py``): the prompt is cleaned, tokenized
to 512 tokens and encoded with its attention mask, and the embeddings past each prompt's length are zeroed;
the transformer gets t = sigma * 1000 as the scheduler gives it (UniPCMultistepScheduler with ``flow_shift``
in the shipped configs: int64 timesteps); latents are ``(z - latents_mean) / latents_std`` per channel of
whole clips (B, 3, F, H, W) with F = 4k + 1 (the VAE keeps the first frame and compresses the rest 4x in
time), decoded as a whole clip. Training draws t from FlowMatchEulerDiscreteScheduler's table shifted by
the same ``flow_shift``.

Wan 2.2's two-transformer folders (``transformer/`` for t >= boundary_ratio * T, ``transformer_2/`` below,
``boundary_ratio`` in model_index.json) load too: `Wan.denoise` sends each sample to the transformer of its
t, as WanPipeline does per step, and `two_stage_specs` gives each transformer experts over its own range.
``tsm train`` / ``tsm sample`` attach experts to ``transformer`` only, so they refuse such folders.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tsm.errors import TsmError
from tsm.inject import ATTR
from tsm.intervals import Scale
from tsm.models.base import Components, _load
from tsm.models.flow import FlowFamily
from tsm.models.registry import register
from tsm.objectives import FlowMatchingObjective
from tsm.spec import ExpertSpec


@dataclass
class WanComponents(Components):
    """Components whose `to` also moves Wan 2.2's low-noise ``transformer_2`` (kept in ``extra``)."""

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> WanComponents:
        super().to(device, dtype)
        low = self.extra.get("transformer_2")
        if low is not None:
            low.to(device)
            if dtype is not None:
                low.to(dtype)
        return self


@register
class Wan(FlowFamily):
    """Wan 2.1 T2V (1.3B / 14B); Wan 2.2 A14B's two transformers through the Python API (see the module doc)."""

    name = "wan"
    denoiser_class = "WanTransformer3DModel"
    text_class = "UMT5EncoderModel"
    vae_class = "AutoencoderKLWan"
    # default_targets (to_q, to_k, to_v, to_out.0): self- (attn1) and cross-attention (attn2) of every block
    default_text_targets: list[str] = []  # Wan LoRAs tune the transformer only; UMT5 stays frozen (cached)
    video = True
    max_text_length = 512  # WanPipeline's max_sequence_length
    default_steps, default_guidance = 50, 5.0  # WanPipeline's num_inference_steps, guidance_scale

    # --- loading ---------------------------------------------------------------------------------
    def load(
        self,
        path: str,
        revision: str | None = None,
        prediction_type: str | None = None,
        objective: Mapping[str, Any] | None = None,
    ) -> WanComponents:
        """Load as `Family.load`, plus ``transformer_2/`` and ``boundary_ratio`` of a Wan 2.2 folder."""
        import diffusers

        if prediction_type not in (None, "flow"):
            raise TsmError(
                f"wan predicts flow velocity; leave model.prediction_type unset, got {prediction_type!r}"
            )
        c = super().load(path, revision, None, objective)
        c = WanComponents(**{f: getattr(c, f) for f in c.__dataclass_fields__})
        index = _pipeline_config(path, revision)
        if index.get("expand_timesteps"):
            raise TsmError(
                f"{path} is a Wan 2.2 TI2V model (expand_timesteps: per-token timesteps); tsm's wan family "
                "supports the T2V models (Wan 2.1, Wan 2.2 A14B)"
            )
        ratio = index.get("boundary_ratio")
        has_low = index.get("transformer_2", [None])[0] is not None or (Path(path) / "transformer_2").is_dir()
        if ratio is not None and has_low:
            low = _load(diffusers.WanTransformer3DModel, path, "transformer_2", revision)
            low.requires_grad_(False)
            low.eval()
            c.extra["transformer_2"] = low
            c.extra["boundary_timestep"] = float(ratio) * c.objective.num_timesteps
        return c

    def sampling_scheduler(self, path: str, revision: str | None) -> Any:
        """The scheduler class the folder names (UniPCMultistepScheduler with flow_shift in Wan's configs)."""
        import diffusers

        try:
            config = diffusers.UniPCMultistepScheduler.load_config(
                path, subfolder="scheduler", revision=revision
            )
        except (OSError, ValueError) as e:
            raise TsmError(f"cannot load scheduler from {path!r}: {str(e).strip().splitlines()[0]}") from None
        name = config.get("_class_name", "UniPCMultistepScheduler")
        cls = getattr(diffusers, name, None)
        if cls is None or not issubclass(cls, diffusers.SchedulerMixin):
            raise TsmError(f"{path}/scheduler names {name!r}, which is not a diffusers scheduler")
        return _load(cls, path, "scheduler", revision)

    def set_timesteps(
        self, c: Components, steps: int, resolution: int, device: torch.device | str | None = None
    ) -> None:
        """WanPipeline's: ``set_timesteps(steps)``, then ``set_begin_index(0)`` (multistep solvers count steps)."""
        c.scheduler.set_timesteps(steps, device=device)
        if hasattr(c.scheduler, "set_begin_index"):
            c.scheduler.set_begin_index(0)

    def objective(
        self, scheduler_config: Any, prediction_type: str | None, options: Mapping[str, Any] | None = None
    ) -> FlowMatchingObjective:
        """Flow matching on FlowMatchEulerDiscreteScheduler's table with the sampler's ``flow_shift``."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = dict(scheduler_config)
        if "flow_shift" in config:  # a UniPC / DPM++ config: its shift, under FlowMatchEuler's name
            T = int(config.get("num_train_timesteps", 1000))
            config = FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=T, shift=float(config["flow_shift"])
            ).config
        return super().objective(config, prediction_type, options)

    # --- text --------------------------------------------------------------------------------------
    def encode_prompt(self, c: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        """UMT5's last hidden states (B, 512, d), zero past each prompt's tokens (WanPipeline's embeddings)."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        encoder, tok = c.text_encoders["text_encoder"], c.tokenizers["tokenizer"]
        enc = tok(
            [prompt_clean(p) for p in captions],
            padding="max_length",
            max_length=self.max_text_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = enc.input_ids.to(encoder.device), enc.attention_mask.to(encoder.device)
        hidden = encoder(ids, mask).last_hidden_state  # (B, 512, d)
        # the pipeline cuts each prompt at its length and pads with zeros: the same as masking
        return {"encoder_hidden_states": hidden * mask[..., None].to(hidden.dtype)}

    # --- denoiser ------------------------------------------------------------------------------------
    def denoise(
        self, c: Components, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Velocity (B, C, f, h, w). Wan 2.2: samples with t >= boundary go to ``transformer``, the others to
        ``transformer_2`` (WanPipeline's switch, per sample here so a training batch may mix them)."""
        t = t.expand(x.shape[0]) if t.dim() == 0 or t.numel() == 1 else t
        low = c.extra.get("transformer_2")
        if low is None:
            return self._call(c.denoiser, x, t, cond)
        high = t >= c.extra["boundary_timestep"]  # (B,) bool
        for part, model in (("transformer", c.denoiser), ("transformer_2", low)):
            if getattr(model, ATTR, None) is None and any(
                getattr(m, ATTR, None) is not None for m in (c.denoiser, low)
            ):
                raise TsmError(
                    f"this Wan 2.2 model has experts on one transformer only ({part} has none): attach experts "
                    "to both with tsm.models.wan.two_stage_specs (tsm train does not do this yet)"
                )
        if bool(high.all()) or not bool(high.any()):  # one model for the whole batch (always when sampling)
            return self._call(c.denoiser if bool(high.all()) else low, x, t, cond)
        out = torch.empty_like(x)
        for rows, model in ((high, c.denoiser), (~high, low)):
            out[rows] = self._call(model, x[rows], t[rows], {k: v[rows] for k, v in cond.items()})
        return out

    def _call(
        self, model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        return model(hidden_states=x, timestep=t, return_dict=False, **cond)[0]

    # --- latents: whole clips through the 3D causal VAE, per-channel mean/std normalisation -------------
    def frames_of(self, c: Components, num_frames: int) -> int:
        """Latent frames of a clip of ``num_frames`` (4k + 1) frames: the first alone, then 4 per latent."""
        k = c.vae.config.scale_factor_temporal
        if num_frames < 1 or (num_frames - 1) % k:
            raise TsmError(
                f"wan clips need num_frames = {k}k + 1 (1, {k + 1}, {2 * k + 1}, ..., 81), got {num_frames}; "
                "set data.num_frames"
            )
        return (num_frames - 1) // k + 1

    def latent_shape(self, c: Components, resolution: int, num_frames: int) -> tuple[int, ...]:
        side = c.vae.config.scale_factor_spatial * c.denoiser.config.patch_size[1]
        if resolution % side:
            raise TsmError(f"wan needs a resolution divisible by {side} (VAE x patch size), got {resolution}")
        factor = c.vae.config.scale_factor_spatial
        return (c.vae.config.z_dim, self.frames_of(c, num_frames), resolution // factor, resolution // factor)

    def _stats(self, c: Components, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(c.vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(c.vae.config.latents_std).view(1, -1, 1, 1, 1)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    def latent_dist(self, c: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the posterior of whole clips (B, 3, F, H, W): each (B, z, f, h, w)."""
        self.frames_of(c, pixels.shape[2])
        dist = c.vae.encode(pixels.to(c.vae.dtype)).latent_dist
        return dist.mean, dist.std

    def scale_latents(self, c: Components, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(c, z)
        return (z - mean) / std

    def decode(self, c: Components, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, z, f, h, w) -> clips (B, 3, 4(f - 1) + 1, H, W) in [-1, 1], as WanPipeline decodes."""
        mean, std = self._stats(c, latents)
        z = latents * std + mean
        return c.vae.decode(z.to(c.vae.dtype)).sample.clamp(-1, 1)


def _pipeline_config(path: str, revision: str | None) -> dict[str, Any]:
    """model_index.json of a folder or hub id ({} when there is none)."""
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(path, revision=revision))
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------------------
# Wan 2.2: experts per transformer, over its own timestep range
# ---------------------------------------------------------------------------------------------------------
def _scale_within(scale: Scale, lo: float, hi: float, T: int) -> Scale:
    """``scale``'s intervals laid over [lo, hi) instead of [0, T): cut points (an int n: n equal parts)."""
    if isinstance(scale, int):
        if scale == 1:
            return 1
        cuts = [lo + (hi - lo) * k / scale for k in range(1, scale)]
    else:
        cuts = [lo + (hi - lo) * float(c) / T for c in scale]
    return tuple(cuts)


def two_stage_specs(spec: ExpertSpec, boundary_timestep: float) -> dict[str, ExpertSpec]:
    """One spec per Wan 2.2 transformer: ``transformer`` (t >= boundary) and ``transformer_2`` (t < boundary),
    each with ``spec``'s scales over its own range, so none of its experts sits where it is never called.

    ``scales=(4, 1)`` with boundary 875 gives ``transformer`` cut points (906.25, 937.5, 968.75) and one
    expert over [875, T]; ``transformer_2`` cut points (218.75, 437.5, 656.25) and one over [0, 875).
    """
    T = spec.num_timesteps
    if not 0 < boundary_timestep < T:
        raise TsmError(f"the boundary timestep must be inside (0, {T}), got {boundary_timestep}")
    high = [_scale_within(s, boundary_timestep, T, T) for s in spec.scales]
    low = [_scale_within(s, 0.0, boundary_timestep, T) for s in spec.scales]
    return {
        "transformer": replace(spec, scales=tuple(high)),
        "transformer_2": replace(spec, scales=tuple(low)),
    }
