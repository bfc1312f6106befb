"""Sampling with timestep experts: the denoising loop, kept visible.

The denoiser routes its experts from its ``timestep`` argument by itself. Text encoders have no timestep,
so the prompt is re-encoded when the core interval changes (once per interval, cached), so every interval
sees its own text expert; when text routers are active (assembling stage) it is re-encoded at every step,
since E[t] changes with t.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from tsm.families import Components
from tsm.inject import ATTR, set_timesteps
from tsm.intervals import expert_index


class PromptEncoder:
    """Encode prompts with text encoders routed at timestep t; cached per core interval."""

    def __init__(self, c: Components, prompts: list[str]) -> None:
        self.c, self.prompts = c, prompts
        self.routings = [
            getattr(m, ATTR) for m in c.text_encoders.values() if getattr(m, ATTR, None) is not None
        ]
        self.cache: dict[object, dict[str, torch.Tensor]] = {}

    def key(self, t: float) -> object:
        if not self.routings:
            return None
        r = self.routings[0]
        if r.stage == "assemble" and len(r.spec.scales) > 1:
            return float(t)
        return int(expert_index(torch.tensor(float(t)), r.spec.scales[0], r.spec.num_timesteps))

    @torch.no_grad()
    def __call__(self, t: float) -> dict[str, torch.Tensor]:
        key = self.key(t)
        if key not in self.cache:
            for m in self.c.text_encoders.values():
                if getattr(m, ATTR, None) is not None:
                    set_timesteps(m, torch.tensor(float(t)))
            self.cache[key] = self.c.family.encode_prompt(self.c, self.prompts)
        return self.cache[key]


@torch.no_grad()
def sample(
    c: Components,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 25,
    guidance_scale: float = 5.0,
    resolution: int = 512,
    num_frames: int = 16,
    negative_prompt: str = "",
    progress: bool = True,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] (clips (N, 3, F, H, W) for video), one per (prompt, seed) pair.

    Each sample's initial noise comes from its own seed, so a tile does not depend on the batch around it.
    """
    prompts, seeds = list(prompts), list(seeds)
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds; pass one seed per prompt")
    family, device = c.family, c.denoiser.device
    for m in (c.denoiser, *c.text_encoders.values(), c.vae):
        m.eval()
    shape = family.latent_shape(c, resolution, num_frames)
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    scheduler = c.scheduler
    scheduler.set_timesteps(steps, device=device)
    # flow-matching schedulers start from unit noise and need no input scaling
    latents = torch.stack(noise).to(device) * getattr(scheduler, "init_noise_sigma", 1.0)  # (N, C, [F,] h, w)
    cfg = guidance_scale > 1.0
    cond = PromptEncoder(c, prompts)
    uncond = PromptEncoder(c, [negative_prompt] * len(prompts)) if cfg else None
    for t in tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False):
        x = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        tt = t.to(device).expand(len(prompts))
        if cfg:  # one batch of [uncond; cond], as the diffusers pipelines do
            kw = {k: torch.cat([uncond(t)[k], v]) for k, v in cond(t).items()}
            pred_u, pred_c = family.denoise(c, torch.cat([x, x]), torch.cat([tt, tt]), kw).chunk(2)
            pred = pred_u + guidance_scale * (pred_c - pred_u)
        else:
            pred = family.denoise(c, x, tt, cond(t))
        latents = scheduler.step(pred, t, latents).prev_sample
    return family.decode(c, latents).float().cpu()
