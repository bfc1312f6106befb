"""Glance phase-aware acceleration (arXiv 2512.02899) with timestep experts.

The reference N-step schedule (50) is sampled unevenly: a "slow" phase (steps 1, 3, 5, 7, 9: the early,
semantic phase, 2x fewer calls) and a "fast" phase (steps 11, 21, 31, 41, 50: details, 8x fewer), 10
calls in all. Each phase has its own LoRA expert, a two-expert spec cut between the phases, trained on a
handful of image-caption pairs (one in the paper) with the model's own objective, its timesteps drawn only
from the phase's listed timesteps. `tsm.sampling.sample_timesteps_list` then integrates each call to the
next listed timestep, so the 10 steps tile the whole path.

New here: *assembling on top* -- the slow/fast experts as the core, a full-range LoRA as a gated context
expert (``ExpertSpec(scales=([cut], 1))``), and only the router trained on the listed timesteps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

import tsm
from tsm.families import Components
from tsm.sampling import glance_schedule

SLOW = (1, 3, 5, 7, 9)
FAST = (11, 21, 31, 41, 50)


def glance_timesteps(
    c: Components,
    reference_steps: int = 50,
    slow: Sequence[int] = SLOW,
    fast: Sequence[int] = FAST,
    resolution: int = 512,
) -> dict[str, Any]:
    """The phases' listed timesteps on the model's own reference schedule, the cut, and the final timestep.

    Flow-matching models use the scheduler's sigma table (t = sigma * T); DDPM models its integer timesteps
    (the last step then goes straight to x0: final None).
    """
    sched = c.scheduler
    c.family.set_timesteps(c, reference_steps, resolution)  # resolution: for shifts that depend on it
    if c.objective.continuous:
        return glance_schedule(sched.sigmas.tolist(), slow, fast, c.objective.num_timesteps)
    ts = [float(t) for t in sched.timesteps.tolist()]  # t_1 > t_2 > ... > t_N
    # the same bookkeeping as glance_schedule, on timesteps instead of sigmas (final: x0)
    out = glance_schedule(
        [t / c.objective.num_timesteps for t in ts] + [0.0], slow, fast, c.objective.num_timesteps
    )
    out["final"] = None
    return {k: ([int(round(x)) for x in v] if isinstance(v, list) else v) for k, v in out.items()}


def glance_spec(
    cut: float, rank: int, targets: list[str], alpha: float | None = None, context: bool = False
) -> Any:
    """Slow/fast phase experts (expert 1 owns t >= cut: the slow phase); with ``context`` a full-range LoRA too."""
    scales = ([cut], 1) if context else ([cut],)
    return tsm.ExpertSpec(
        scales=scales, rank=rank, alpha=alpha if alpha is not None else 4 * rank, targets=targets
    )


def train_glance(
    c: Components,
    pixels: torch.Tensor,
    prompts: list[str],
    timesteps: dict[str, Any],
    steps: int = 60,
    lr: float = 5e-4,
    warmup: int = 10,
    batch: int = 1,
    stage: str = "foster",
    seed: int = 0,
    report: Callable[[int], None] | None = None,
) -> list[float]:
    """Train the phase experts (or, in stage "assemble", the routers) on the given image-caption pairs.

    Every step draws ``batch`` pairs for each phase and a timestep from that phase's list, so each phase's
    expert sees only its own timesteps (fostering them together equals fostering them apart). With a context
    expert (scales ([cut], 1)) the full-range LoRA is fostered on uniform timesteps in the same run. The
    learning rate is constant after ``warmup`` linear warm-up steps, as in the paper. Returns the losses.
    """
    unet = c.denoiser
    modules = [unet, *[m for m in c.text_encoders.values() if getattr(m, tsm.inject.ATTR, None) is not None]]
    for m in modules:
        tsm.set_stage(m, stage)
        m.train()
    params = [p for m in modules for p in tsm.adapter_params(m)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    g = torch.Generator().manual_seed(seed)
    spec = tsm.get_routing(unet).spec
    has_context = len(spec.scales) > 1
    dtype = torch.float32 if c.objective.continuous else torch.long
    losses = []
    for _ in range(steps):
        t_parts, scale_parts = [], []
        for phase in ("slow", "fast"):
            listed = torch.tensor(timesteps[phase], dtype=dtype)
            t_parts.append(listed[torch.randint(len(listed), (batch,), generator=g)])
            scale_parts.append(torch.zeros(batch, dtype=torch.long))
        if has_context and stage == "foster":  # the full-range LoRA: any timestep
            t_parts.append(c.objective.sample_t(batch, g))
            scale_parts.append(torch.ones(batch, dtype=torch.long))
        t, scales = torch.cat(t_parts).to(dtype), torch.cat(scale_parts)
        pick = torch.randint(len(prompts), (len(t),), generator=g)
        x0, caps = pixels[pick], [prompts[i] for i in pick.tolist()]
        noise = torch.randn(x0.shape, generator=g)
        for m in modules:
            tsm.get_routing(m).foster_scales = scales
        for m in modules[1:]:
            tsm.set_timesteps(m, t)
        cond = c.family.encode_prompt(c, caps)
        pred = c.family.denoise(c, c.objective.noisy(x0, noise, t), t, cond)
        per_sample = c.objective.loss(pred, x0, noise, t)
        loss = per_sample.sum() / batch if stage == "foster" else per_sample.mean()  # each expert's own mean
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for m in modules:
            tsm.clip_grad_norm_per_expert(m, 1.0)
        opt.step()
        sched.step()
        losses.append(float(per_sample.detach().mean()))
        if report is not None:
            report(len(t))
    return losses
