"""Wan 2.1-style text-to-video: WanTransformer3DModel + UMT5 + AutoencoderKLWan (3D causal VAE), flow matching.

Every number is WanPipeline's (``diffusers/pipelines/wan/pipeline_wan.py``): the prompt is cleaned, tokenized
to 512 tokens and encoded with its attention mask, and the embeddings past each prompt's length are zeroed;
the transformer gets t = sigma * 1000 as the scheduler gives it (UniPCMultistepScheduler with ``flow_shift``
in the shipped configs: int64 timesteps); latents are ``(z - latents_mean) / latents_std`` per channel of
whole clips (B, 3, F, H, W) with F = 4k + 1 (the VAE keeps the first frame and compresses the rest 4x in
time), decoded as a whole clip. Training draws t from FlowMatchEulerDiscreteScheduler's table shifted by
the same ``flow_shift``.

Wan 2.2 A14B's two-transformer folders (``transformer/`` for t >= boundary_ratio * T, ``transformer_2/`` below,
``boundary_ratio`` in model_index.json) load as one model: `WanComponents.modules` holds both transformers,
`Wan.denoise` sends each sample to the transformer of its t, as WanPipeline does per step, `Wan.denoiser_parts`
tells the training loop which transformer each sample went to, and `two_stage_specs` gives each transformer
experts over its own range (what `tsm train` attaches).

Wan 2.2 TI2V-5B (``expand_timesteps`` in model_index.json; one transformer of 48 latent channels, the Wan 2.2
VAE: z_dim 48, x16 space) trains and samples in its text-to-video mode: `Wan.denoise` gives the transformer one
timestep per latent token, (B, f * h/2 * w/2) float32, built exactly as WanPipeline builds it
(``(mask[0][0][:, ::2, ::2] * t).flatten()`` with an all-ones mask), and the experts' pre-hook routes each sample
by its noise level (its largest token timestep). Refused in one line: the image-to-video pipelines (the first
frame's latents as extra input channels and an image encoder); TI2V's image conditioning (the first latent
frame clean at t = 0) is not built for training or sampling.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tsm.errors import TsmError
from tsm.inject import ATTR, expert_layers
from tsm.intervals import Scale
from tsm.models.base import Components, _load
from tsm.models.flow import FlowFamily
from tsm.models.registry import register
from tsm.objectives import FlowMatchingObjective
from tsm.spec import ExpertSpec


@dataclass
class WanComponents(Components):
    """Components of a Wan folder; Wan 2.2's low-noise ``transformer_2`` (kept in ``extra``) is one of the
    `modules`, so experts, checkpoints, optimizers and `to` cover both transformers.

    ``extra["offload"]`` (a device, set by ``train.offload_inactive``): only the transformer a call runs keeps
    its frozen base weights there, the other one's wait on the CPU (its experts stay: they are small, and the
    optimizer keeps their state on the device)."""

    def modules(self) -> dict[str, nn.Module]:
        low = self.extra.get("transformer_2")
        modules = super().modules()
        return {**modules, "transformer_2": low} if low is not None else modules

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> WanComponents:
        """As `Components.to`; with ``extra["offload"]`` both transformers' base weights are cast on the CPU and
        stay there (a call brings its transformer's over), their experts go to ``device``."""
        if "offload" not in self.extra:
            return super().to(device, dtype)
        device = torch.device(device)
        self.extra["offload"] = device
        self.vae.to(device)
        for m in self.modules().values():
            if dtype is not None and dtype != next(m.parameters()).dtype:
                m.to(dtype)
            if m is self.denoiser or m is self.extra.get("transformer_2"):
                park(m, torch.device("cpu"), experts=device)
            else:
                m.to(device)
        return self


def park(model: nn.Module, device: torch.device, experts: torch.device | None = None) -> None:
    """Move ``model``'s frozen base weights and buffers to ``device``; its experts and routers stay where they
    are (the optimizer's state sits next to them), or go to ``experts``."""
    adapters = {id(p) for _, layer in expert_layers(model) for p in layer.parameters()}
    adapters -= {id(p) for _, layer in expert_layers(model) for p in layer.base_layer.parameters()}
    with torch.no_grad():
        for module in model.modules():
            for p in module.parameters(recurse=False):
                to = (experts or p.device) if id(p) in adapters else device
                if p.device != to:
                    p.data = p.data.to(to)
            for name, buf in module.named_buffers(recurse=False):
                if buf.device != device:
                    module._buffers[name] = buf.to(device)


@register
class Wan(FlowFamily):
    """Wan 2.1 T2V (1.3B / 14B); Wan 2.2 A14B's two transformers; Wan 2.2 TI2V-5B as text-to-video (module doc)."""

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
        pipeline = index.get("_class_name", "WanPipeline")
        expand = bool(index.get("expand_timesteps"))
        in_ch, out_ch = c.denoiser.config.in_channels, c.denoiser.config.out_channels
        # TI2V-5B's one transformer serves WanPipeline and WanImageToVideoPipeline alike (no extra input
        # channels): either folder trains its text-to-video mode
        t2v = pipeline == "WanPipeline" or (expand and pipeline == "WanImageToVideoPipeline")
        if not t2v or in_ch != out_ch:
            raise TsmError(
                f"{path} is a {pipeline} model (transformer in_channels {in_ch}, out {out_ch}): image-to-video "
                "needs the first frame's VAE latents and mask as extra input channels, which tsm's wan family "
                "does not build yet; it trains the text-to-video WanPipeline models (Wan 2.1, Wan 2.2 A14B)"
            )
        ratio = index.get("boundary_ratio")
        has_low = (index.get("transformer_2") or [None])[0] is not None or (
            Path(path) / "transformer_2"
        ).is_dir()
        if has_low and ratio is None:
            raise TsmError(
                f"{path} has a transformer_2 but no boundary_ratio in model_index.json, so nothing says which "
                'transformer denoises which t: add "boundary_ratio": 0.875 (Wan 2.2 T2V A14B; 0.9 for I2V)'
            )
        if has_low:
            low = _load(diffusers.WanTransformer3DModel, path, "transformer_2", revision)
            low.requires_grad_(False)
            low.eval()
            c.extra["transformer_2"] = low
            c.extra["boundary_timestep"] = float(ratio) * c.objective.num_timesteps
        if expand:
            c.extra["expand_timesteps"] = True
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
        parts = self.denoiser_parts(c, t)
        modules = c.modules()
        if len(parts) == 1:
            return self._call(c, modules[next(iter(parts))], x, t, cond)
        out = None
        for name, rows in parts.items():
            if not bool(rows.any()):
                continue
            if bool(rows.all()):  # one model for the whole batch (always when sampling)
                return self._call(c, modules[name], x, t, cond)
            # a batch of both sides (training): each transformer on its rows, both resident for the backward
            y = self._call_rows(c, modules[name], x, t, cond, rows)
            if out is None:
                out = torch.empty(x.shape[:1] + y.shape[1:], dtype=y.dtype, device=y.device)
            out[rows] = y
        return out

    def denoiser_parts(self, c: Components, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Wan 2.2: {"transformer": t >= boundary, "transformer_2": t < boundary}, each (B,) bool."""
        if "transformer_2" not in c.extra:
            return super().denoiser_parts(c, t)
        high = t >= c.extra["boundary_timestep"]  # (B,) bool
        return {"transformer": high, "transformer_2": ~high}

    def part_specs(self, c: Components, spec: ExpertSpec) -> dict[str, ExpertSpec]:
        """Wan 2.2: ``spec``'s scales laid over each transformer's own range (`two_stage_specs`)."""
        if "transformer_2" not in c.extra:
            return super().part_specs(c, spec)
        return two_stage_specs(spec, c.extra["boundary_timestep"])

    part_labels = {"transformer": "high_noise", "transformer_2": "low_noise"}

    def _call_rows(
        self,
        c: Components,
        model: nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: dict[str, torch.Tensor],
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """``model`` on the samples ``rows`` (B,) bool. The per-sample settings a training loop put on its
        routing for the whole batch (the scale each sample fosters, the shared expert's factor) are cut to
        those rows for the call: the routing reads them in the model's pre-hook."""
        routing = getattr(model, ATTR, None)
        saved = (routing.foster_scales, routing.shared_grad_scale) if routing is not None else None
        if routing is not None:
            routing.foster_scales, routing.shared_grad_scale = (_rows_of(v, rows) for v in saved)
        try:
            kw = {k: v[rows] for k, v in cond.items()}
            return self._call(c, model, x[rows], t[rows], kw, keep_others=True)
        finally:
            if routing is not None:
                routing.foster_scales, routing.shared_grad_scale = saved

    def _call(
        self,
        c: Components,
        model: nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: dict[str, torch.Tensor],
        keep_others: bool = False,
    ) -> torch.Tensor:
        """``model``'s velocity. ``train.offload_inactive``: its base weights come to the device and (unless
        ``keep_others``: a batch with samples of both, whose backward needs both) the other's go to the CPU."""
        device = c.extra.get("offload")
        if device is not None:
            if not keep_others:
                for other in (c.denoiser, c.extra.get("transformer_2")):
                    if other is not None and other is not model:
                        park(other, torch.device("cpu"))
            park(model, device)
        if c.extra.get("expand_timesteps"):
            t = token_timesteps(model, x, t)
        return model(hidden_states=x, timestep=t, return_dict=False, **cond)[0]

    # --- latents: whole clips through the 3D causal VAE, per-channel mean/std normalisation -------------
    def frames_of(self, c: Components, num_frames: int) -> int:
        """Latent frames of a clip of ``num_frames`` (4k + 1) frames: the first alone, then 4 per latent."""
        k = c.vae.config.scale_factor_temporal
        if num_frames < 1 or (num_frames - 1) % k:
            below = max(num_frames - 1, 0) // k * k + 1
            near = f"{below} or {below + k}" if num_frames > 1 else f"{below}"
            raise TsmError(
                f"wan clips need num_frames = {k}k + 1 (1, {k + 1}, {2 * k + 1}, ..., 81: the VAE keeps the first "
                f"frame and packs {k} per latent frame), got {num_frames}; set data.num_frames={near}"
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


def token_timesteps(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Wan 2.2 TI2V's per-token timesteps (B, f * h/p * w/p) for latents x (B, C, f, h, w) at t (B,): what
    WanPipeline passes with ``expand_timesteps`` (text-to-video: an all-ones float32 mask times t, strided by
    the patch (the pipeline's ``[:, ::2, ::2]``) and flattened), one row per sample so a training batch may
    hold several t. Every token of a sample has its t: no frame is clean in text-to-video."""
    _, p_h, p_w = model.config.patch_size
    mask = torch.ones(x.shape[2:], dtype=torch.float32, device=x.device)[:, ::p_h, ::p_w]  # (f, h/p, w/p)
    t = t.to(x.device).reshape(-1, 1)  # (B, 1); the scheduler's int64 t times a float32 mask: float32
    return (mask.flatten()[None] * t).expand(x.shape[0], -1)  # (B, L)


def _rows_of(value: Any, rows: torch.Tensor) -> Any:
    """A per-sample tensor (B,) cut to ``rows``; anything else (None, one int for the batch) as it is."""
    if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == rows.numel():
        return value[rows.to(value.device)]
    return value


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
