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
from tsm.config import OptimConfig
from tsm.models import Components
from tsm.optimizers import build_optimizer
from tsm.recipes.base import (
    DiffusionLoss,
    Recipe,
    SingleProcess,
    autocast,
    encode_latents,
    local_slice,
    prepare_for_stage,
    register,
    step_generator,
    weight_dtype,
)
from tsm.sampling import glance_schedule, sample_timesteps_list

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


def glance_timesteps_for(cfg: Any, c: Components) -> dict[str, Any]:
    """`glance_timesteps` with a run config's reference steps, phases and resolution."""
    g = cfg.glance
    return glance_timesteps(c, g.reference_steps, g.slow, g.fast, resolution=cfg.data.resolution)


def glance_spec(
    cut: float, rank: int, targets: list[str], alpha: float | None = None, context: bool = False
) -> Any:
    """Slow/fast phase experts (expert 1 owns t >= cut: the slow phase); with ``context`` a full-range LoRA too."""
    scales = ([cut], 1) if context else ([cut],)
    return tsm.ExpertSpec(
        scales=scales, rank=rank, alpha=alpha if alpha is not None else 4 * rank, targets=targets
    )


class GlanceTrainer:
    """Train the phase experts (or, in stage "assemble", the routers) on a few image-caption pairs.

    Every step draws ``batch`` pairs for each phase and a timestep from that phase's list, so each phase's
    expert sees only its own timesteps (fostering them together equals fostering them apart). With a context
    expert (scales ([cut], 1)) the full-range LoRA is fostered on the model's own timestep density in the
    same run. The learning rate is constant after ``warmup`` linear warm-up steps, as in the paper; step
    ``i`` draws from a generator seeded by (seed, i).
    """

    def __init__(
        self,
        c: Components,
        latents: torch.Tensor,
        prompts: list[str],
        timesteps: dict[str, Any],
        lr: float = 5e-4,
        warmup: int = 10,
        batch: int = 1,
        stage: str = "foster",
        seed: int = 0,
        max_grad_norm: float | None = 1.0,
        dtype: torch.dtype | None = None,
        acc: Any = None,
        optim: OptimConfig | None = None,
    ) -> None:
        self.optim = optim or OptimConfig()  # optim.name and its settings (None: AdamW, default betas / eps)
        self.device = next(c.denoiser.parameters()).device
        self.acc = acc or SingleProcess(self.device)  # an Accelerator spreads each step over its processes
        self.model: Any = None
        self.dtype = dtype  # mixed precision of the forward pass (None: float32)
        self.c, self.latents, self.prompts, self.timesteps = c, latents.float(), list(prompts), timesteps
        self.lr, self.warmup, self.batch, self.seed, self.max_grad_norm = (
            lr,
            warmup,
            batch,
            seed,
            max_grad_norm,
        )
        self.modules = [
            c.denoiser,
            *[m for m in c.text_encoders.values() if getattr(m, tsm.inject.ATTR, None) is not None],
        ]
        self.set_stage(stage)

    def set_stage(self, stage: str) -> None:
        """Switch stage: a fresh optimizer (and warm-up) for what trains in it."""
        self.stage = stage
        for m in self.modules:
            tsm.set_stage(m, stage)
            m.train()
        self.model = prepare_for_stage(self.acc, DiffusionLoss(self.c), self.model)
        params = [p for m in self.modules for p in tsm.adapter_params(m)]
        self.opt = build_optimizer(self.optim, [{"params": params, "lr": self.lr, "weight_decay": 0.0}])
        warm = max(1, self.warmup)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warm))

    def step(self, step: int) -> float:
        """One update; returns the mean loss."""
        c, batch, g = self.c, self.batch, step_generator(self.seed, step)
        has_context = len(tsm.get_routing(c.denoiser).spec.scales) > 1
        dtype = torch.float32 if c.objective.continuous else torch.long
        t_parts, scale_parts = [], []
        for phase in ("slow", "fast"):
            listed = torch.tensor(self.timesteps[phase], dtype=dtype)
            t_parts.append(listed[torch.randint(len(listed), (batch,), generator=g)])
            scale_parts.append(torch.zeros(batch, dtype=torch.long))
        if has_context and self.stage == "foster":  # the full-range LoRA: any timestep
            t_parts.append(c.objective.sample_t(batch, g))
            scale_parts.append(torch.ones(batch, dtype=torch.long))
        t, scales = torch.cat(t_parts).to(dtype), torch.cat(scale_parts)
        pick = torch.randint(len(self.prompts), (len(t),), generator=g)
        x0, caps = self.latents[pick], [self.prompts[i] for i in pick.tolist()]
        noise = torch.randn(x0.shape, generator=g)  # CPU draws of the global batch: the same anywhere
        acc, n = self.acc, len(t)
        mine = local_slice(acc, n)  # this process's share
        t, x0, noise, scales = (v[mine].to(self.device) for v in (t, x0, noise, scales))
        for m in self.modules:
            tsm.get_routing(m).foster_scales = scales
        for m in self.modules[1:]:
            tsm.set_timesteps(m, t)
        with autocast(c, self.dtype):
            per_sample = self.model(x0, noise, t, caps[mine])  # (local B,)
        # fostering: each expert's own mean (every expert gets `batch` samples); assembling: the plain mean.
        # Times the processes: DDP averages the gradients of the processes' partial sums
        loss = per_sample.sum() / (batch if self.stage == "foster" else n) * acc.num_processes
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.max_grad_norm is not None:
            for m in self.modules:
                tsm.clip_grad_norm_per_expert(m, self.max_grad_norm)
        self.opt.step()
        self.sched.step()
        return float(acc.reduce(per_sample.detach().sum(), reduction="sum")) / n

    def state_dict(self) -> dict[str, Any]:
        return {"opt": self.opt.state_dict(), "sched": self.sched.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])


def train_glance(
    c: Components,
    latents: torch.Tensor,
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
    """``steps`` updates of a `GlanceTrainer` (the phase experts, or in stage "assemble" the routers)."""
    trainer = GlanceTrainer(c, latents, prompts, timesteps, lr, warmup, batch, stage, seed)
    losses = []
    for i in range(steps):
        losses.append(trainer.step(i))
        if report is not None:
            report(2 * batch)
    return losses


# ---------------------------------------------------------------------------------------------------------
# `tsm train` with method: glance
# ---------------------------------------------------------------------------------------------------------
@register("glance")
class GlanceRecipe(Recipe):
    """The CLI's Glance run: the first ``glance.max_pairs`` image-caption pairs of ``data.path``; steps
    ``0 .. train.steps - 1`` foster the phase experts, ``train.assemble_steps`` more train the router."""

    tunes_text = False

    @classmethod
    def expert_scales(cls, cfg: Any, c: Components) -> tuple:
        cut = glance_timesteps_for(cfg, c)["cut"]  # the slow/fast cut sits on the model's reference schedule
        return ([cut], 1) if cfg.glance.router else ([cut],)

    def __init__(self, cfg: Any, c: Components, dataset: Any, cache: Any, acc: Any) -> None:
        from tsm.data import collate

        super().__init__(cfg, c, dataset, cache, acc)
        batch = collate([dataset[i] for i in range(min(cfg.glance.max_pairs, len(dataset)))])
        with torch.no_grad():  # the posterior mean of each pair: the pairs are fixed, so is their latent
            latents = encode_latents(c, batch, cache, None)
        self.trainer = GlanceTrainer(
            c,
            latents,
            list(batch["captions"]),
            glance_timesteps_for(cfg, c),
            lr=cfg.optim.lr,
            warmup=cfg.optim.warmup_steps,
            batch=cfg.train.batch_size,
            seed=cfg.train.seed,
            max_grad_norm=cfg.optim.max_grad_norm,
            dtype=weight_dtype(cfg),
            acc=acc,
            optim=cfg.optim,
        )

    def total_steps(self) -> int:
        return self.cfg.train.steps + self.cfg.train.assemble_steps

    def modules(self) -> dict[str, torch.nn.Module]:
        return {self.c.family.denoiser_subfolder: self.c.denoiser}

    def begin(self, step: int) -> None:
        if step >= self.cfg.train.steps and self.trainer.stage != "assemble":
            self.trainer.set_stage("assemble")

    def step(self, step: int) -> dict[str, float]:
        return {"loss": self.trainer.step(step)}

    def state_dict(self) -> dict[str, Any]:
        return self.trainer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.load_state_dict(state)

    @classmethod
    def sample(
        cls,
        cfg: Any,
        c: Components,
        prompts: Sequence[str],
        seeds: Sequence[int],
        steps: int,
        guidance_scale: float,
        resolution: int,
        progress: bool = True,
        desc: str = "sampling",
    ) -> torch.Tensor:
        """Glance's 10 uneven steps (``steps`` is ignored: the phases list them)."""
        ts = glance_timesteps_for(cfg, c)
        return sample_timesteps_list(
            c, prompts, seeds, ts["slow"] + ts["fast"], ts["final"], guidance_scale=guidance_scale,
            resolution=resolution, num_frames=cfg.data.num_frames, progress=progress, desc=desc,
        )  # fmt: skip
