"""Sampling with timestep experts: the denoising loop, kept visible.

The denoiser routes its experts from its ``timestep`` argument by itself. Text encoders have no timestep,
so the prompt is re-encoded when the core interval changes (once per interval, cached), so every interval
sees its own text expert; when text routers are active (assembling stage) it is re-encoded at every step,
since E[t] changes with t.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from tsm.errors import TsmError
from tsm.inject import ATTR, set_timesteps
from tsm.intervals import expert_index
from tsm.models import Components, Family

Resolution = int | tuple[int, int]  # a square side, or (height, width), in pixels


def with_trigger(prompts: Sequence[str], trigger: str | None) -> list[str]:
    """``prompts`` as the run trained on its captions: ``data.trigger`` in front ("trigger, prompt", as
    `tsm.data` builds captions), unless a prompt already starts with it. An empty prompt stays empty: it is the
    unconditional sample (what caption dropout trained), not the trigger alone."""
    if not trigger:
        return list(prompts)
    starts = re.compile(rf"\s*{re.escape(trigger)}(?!\w)")
    return [p if not p or starts.match(p) else f"{trigger}, {p}" for p in prompts]


def _bar(steps: Sequence, n: int, desc: str, progress: bool) -> tqdm:
    """The sampling loop's progress bar on stderr: ``desc (N images, S steps)``, its total and ETA."""
    return tqdm(
        steps,
        desc=f"{desc} ({n} {'image' if n == 1 else 'images'}, {len(steps)} steps)",
        disable=not progress,
        leave=False,
    )


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


def _negative(c: Components, negative_prompt: str, n: int) -> Callable[[float, dict], dict]:
    """Guidance's unconditional embeddings at t, given the prompts' (``cond``): the encoded negative prompt,
    or zeros like ``cond`` where the family's pipeline zeros an empty one (SDXL)."""
    if c.family.zero_negative(c, negative_prompt):
        return lambda t, cond: {k: torch.zeros_like(v) for k, v in cond.items()}
    encode = PromptEncoder(c, [negative_prompt] * n)
    return lambda t, cond: encode(t)


def _size(c: Components, resolution: Resolution, num_frames: int) -> tuple[Resolution, tuple[int, ...]]:
    """``resolution`` (a square as its side) and one sample's latent shape. Families with their own
    `latent_shape` (2x2-packed Flux/Qwen tokens, digits) sample squares only and check their own sizes; the
    others need multiples of the VAE's factor times the denoiser's patch size, or the latent would round
    down and the image come out smaller than asked."""
    height, width = (resolution, resolution) if isinstance(resolution, int) else (int(v) for v in resolution)
    if height < 1 or width < 1:
        raise TsmError(f"cannot sample {height}x{width} (height x width) images; give a positive size")
    resolution = height if height == width else (height, width)
    if type(c.family).latent_shape is not Family.latent_shape:
        if height != width:
            raise TsmError(
                f"the {c.family.name} family samples square images only; give --resolution, or equal "
                "--width and --height"
            )
    else:
        patch = (
            getattr(c.denoiser, "config", {}).get("patch_size") or 1
        )  # PixArt's transformer: 2; UNets: none
        patch = int(patch[-1] if isinstance(patch, tuple | list) else patch)
        factor = 2 ** (len(c.vae.config.block_out_channels) - 1) * patch
        bad = [side for side in (height, width) if side % factor]
        if bad:
            near = max(factor, round(bad[0] / factor) * factor)
            raise TsmError(
                f"{c.family.name} samples sizes that are multiples of {factor} pixels, got {height}x{width} "
                f"(height x width); use e.g. {near} instead of {bad[0]}"
            )
    return resolution, c.family.latent_shape(c, resolution, num_frames)


def _denoise(c: Components, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """The denoiser in its own dtype (a bf16 base under mixed precision); the sampler's state stays float32."""
    dtype = c.dtype
    return c.family.denoise(c, x.to(dtype), t, cond).float()


@torch.no_grad()
def sample(
    c: Components,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 25,
    guidance_scale: float = 5.0,
    resolution: Resolution = 512,
    num_frames: int = 16,
    negative_prompt: str = "",
    progress: bool = True,
    desc: str = "sampling",
    guidance_scale_2: float | None = None,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] (clips (N, 3, F, H, W) for video), one per (prompt, seed) pair, at
    ``resolution``: a square side, or (height, width). ``progress``: a bar over the steps on stderr, with
    its ETA, labelled ``desc (N images, S steps)``. ``guidance_scale_2`` (Wan 2.2, as WanPipeline's): the
    guidance of the steps below the boundary, the low-noise transformer's (None: ``c.extra``'s
    ``"guidance_scale_2"`` if set, else ``guidance_scale``).

    Each sample's initial noise comes from its own seed, and so does the noise a stochastic scheduler (DDPM
    ancestral) adds at every step: one generator per sample, passed to ``scheduler.step`` as diffusers'
    pipelines pass theirs. A tile does not depend on the batch around it.
    """
    prompts, seeds = list(prompts), list(seeds)
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds; pass one seed per prompt")
    if steps < 1:
        raise TsmError(f"sampler steps must be at least 1, got {steps}")
    family, device = c.family, c.device
    for m in (*c.modules().values(), c.vae):
        m.eval()
    resolution, shape = _size(c, resolution, num_frames)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    noise = [torch.randn(shape, generator=g) for g in generators]
    scheduler = c.scheduler
    step_kwargs = (
        {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    )
    family.set_timesteps(c, steps, resolution, device)
    # flow-matching schedulers start from unit noise and need no input scaling
    latents = torch.stack(noise).to(device) * getattr(scheduler, "init_noise_sigma", 1.0)  # (N, C, [F,] h, w)
    if guidance_scale_2 is None:
        guidance_scale_2 = c.extra.get("guidance_scale_2", guidance_scale)
    boundary = c.extra.get("boundary_timestep", -1.0)  # Wan 2.2: t below it is transformer_2's
    cond = PromptEncoder(c, prompts)
    uncond = None
    if max(guidance_scale, guidance_scale_2) > 1.0:
        uncond = _negative(c, negative_prompt, len(prompts))
    for t in _bar(scheduler.timesteps, len(prompts), desc, progress):
        x = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        tt = t.to(device).expand(len(prompts))
        scale = guidance_scale if float(t) >= boundary else guidance_scale_2
        if scale > 1.0:  # one batch of [uncond; cond], as the diffusers pipelines do
            pos = cond(t)
            neg = uncond(t, pos)
            kw = {k: torch.cat([neg[k], v]) for k, v in pos.items()}
            kw = family.size_conditioning(c, kw, torch.cat([x, x]))  # the sampled size, crop (0, 0)
            pred_u, pred_c = _denoise(c, torch.cat([x, x]), torch.cat([tt, tt]), kw).chunk(2)
            pred = family.guide(pred_u, pred_c, scale)
        else:
            pred = _denoise(c, x, tt, family.size_conditioning(c, cond(t), x))
        latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
    return family.decode(c, latents).float().cpu()


# ---------------------------------------------------------------------------------------------------------
# explicit timestep lists
# ---------------------------------------------------------------------------------------------------------
def step_to(
    objective: object,
    pred: torch.Tensor,
    x: torch.Tensor,
    t: torch.Tensor,
    t_next: float | None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Move x_t to the next listed timestep along the model's prediction.

    From the prediction's (x0, eps): x_next = noisy(x0, eps, t_next) -- DDIM (eta = 0) for DDPM models, an
    exact Euler step in sigma for flow matching -- or, with ``noise``, re-noised with fresh noise as the
    DMD2 few-step generator does. ``t_next=None`` ends the path and returns x0.
    """
    x0, eps = objective.split(pred, x, t)
    if t_next is None:
        return x0
    tn = (
        torch.full_like(t, float(t_next), dtype=torch.float64)
        if objective.continuous
        else torch.full_like(t, int(t_next))
    )
    return objective.noisy(x0, eps if noise is None else noise, tn)


@torch.no_grad()
def sample_timesteps_list(
    c: Components,
    prompts: Sequence[str],
    seeds: Sequence[int],
    timesteps: Sequence[float],
    final: float | None = None,
    guidance_scale: float = 1.0,
    renoise: bool = False,
    resolution: Resolution = 512,
    num_frames: int = 16,
    negative_prompt: str = "",
    progress: bool = True,
    desc: str = "sampling",
) -> torch.Tensor:
    """Sample on an explicit list of timesteps (a 4-step generator's 999/749/499/249, Glance's 10 steps).

    The model is conditioned on ``timesteps[k]`` and the step integrates to ``timesteps[k + 1]``; the last
    step goes to ``final`` (None: straight to x0). ``renoise=True`` re-noises each x0 with fresh noise
    (DMD2); otherwise the path is deterministic (DDIM / Euler). ``progress`` and ``desc``: as `sample`'s.
    """
    prompts, seeds = list(prompts), list(seeds)
    family, device, objective = c.family, c.device, c.objective
    for m in (*c.modules().values(), c.vae):
        m.eval()
    _, shape = _size(c, resolution, num_frames)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    cond = PromptEncoder(c, prompts)
    uncond = _negative(c, negative_prompt, len(prompts)) if guidance_scale > 1.0 else None
    points = [*timesteps, final]
    for t_now, t_next in _bar(list(zip(points[:-1], points[1:], strict=True)), len(prompts), desc, progress):
        dtype = torch.float32 if objective.continuous else torch.long
        t = torch.full((len(prompts),), t_now, dtype=dtype, device=device)
        if uncond is not None:
            pos = cond(t_now)
            neg = uncond(t_now, pos)
            kw = {k: torch.cat([neg[k], v]) for k, v in pos.items()}
            kw = family.size_conditioning(c, kw, torch.cat([x, x]))
            pred_u, pred_c = _denoise(c, torch.cat([x, x]), torch.cat([t, t]), kw).chunk(2)
            pred = family.guide(pred_u, pred_c, guidance_scale)
        else:
            pred = _denoise(c, x, t, family.size_conditioning(c, cond(t_now), x))
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device) if renoise else None
        x = step_to(objective, pred, x, t, t_next, noise)
    return family.decode(c, x).float().cpu()


def glance_schedule(
    sigmas: Sequence[float],
    slow: Sequence[int] = (1, 3, 5, 7, 9),
    fast: Sequence[int] = (11, 21, 31, 41, 50),
    num_timesteps: int = 1000,
) -> dict[str, list[float] | float]:
    """Glance's phase-aware schedule (arXiv 2512.02899) on a reference sigma table.

    ``sigmas`` is the reference N-step schedule with its end value (N + 1 numbers, sigma_1 = 1 first, as
    FlowMatchEulerDiscreteScheduler.sigmas after ``set_timesteps(N)``); ``slow`` and ``fast`` are the
    1-indexed steps each phase conditions on (50 steps -> 10 calls by default). Returns the timesteps
    t = sigma * T of each phase, the phase cut (the slow expert owns t >= cut), and the final timestep:
    ``sample_timesteps_list(c, ..., slow + fast, final)`` then integrates each call to the *next listed*
    sigma, so the steps add up to the whole path from sigma_1 to the end.
    """
    steps = [*slow, *fast]
    n = len(sigmas) - 1
    if sorted(set(steps)) != steps or steps[0] < 1 or steps[-1] > n:
        raise ValueError(f"slow and fast steps must be increasing, distinct and within 1..{n}, got {steps}")
    t = [float(sigmas[k - 1]) * num_timesteps for k in steps]
    first_fast = fast[0] if fast else n + 1
    # the cut sits one reference step before the fast phase's first step: every slow t is above it
    cut = float(sigmas[first_fast - 2]) * num_timesteps if fast else 0.0
    return {
        "slow": t[: len(slow)],
        "fast": t[len(slow) :],
        "cut": cut,
        "final": float(sigmas[-1]) * num_timesteps,
    }
