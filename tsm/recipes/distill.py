"""Few-step distillation with one expert per generator step (TSM section 4.3; DMD2-style).

The generator is the teacher plus timestep experts. With ``steps = (999, 749, 499, 249)`` and the uniform
scale n = 4, every generator step falls in its own interval, so every step has its own core expert;
``scales=(4, 1)`` adds a full-range context expert for the assembling stage.

One generator update (Yin et al. 2024, DMD2):
1. *Backward simulation*: draw a step k and run the generator's own first k steps without gradients, from
   pure noise, to get the input of step k (each step predicts x0 and re-noises it to the next timestep).
2. Step k predicts x0 with gradients.
3. *Distribution matching*: noise x0 to a random t; the real score is the frozen teacher -- the *same*
   module with its experts off (`tsm.experts_off`), no second copy of the weights -- with classifier-free
   guidance; the fake score is the teacher plus its own LoRA. The generator's loss pushes x0 along
   (fake - real), normalised as in DMD.
The fake score is trained with the ordinary diffusion loss on the generator's (detached) outputs,
``fake_updates`` times per generator update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

import tsm
from tsm.families import Components
from tsm.sampling import step_to

STEPS = (999, 749, 499, 249)


def distill_spec(
    rank: int, targets: list[str], alpha: float | None = None, num_steps: int = 4, context: bool = False
) -> Any:
    """One core expert per generator step (uniform scale = number of steps), plus a full-range context expert."""
    return tsm.ExpertSpec(
        scales=(num_steps, 1) if context else (num_steps,), rank=rank, alpha=alpha, targets=targets
    )


def generator_input(
    c: Components, step: int, noise: torch.Tensor, cond: dict, steps: Sequence[int], gen: torch.Generator
) -> torch.Tensor:
    """Backward simulation: the input of generator step ``step``, made by the generator's own first steps."""
    x = noise
    with torch.no_grad():
        for k in range(step):
            t = torch.full((len(x),), steps[k], dtype=torch.long)
            pred = c.family.denoise(c, x, t, cond)
            renoise = torch.randn(x.shape, generator=gen)
            x = step_to(c.objective, pred, x, t, steps[k + 1], renoise)
    return x


class Distiller:
    """DMD-style distillation of ``c`` (whose denoiser already has the generator's experts)."""

    def __init__(
        self,
        c: Components,
        steps: Sequence[int] = STEPS,
        fake_rank: int = 8,
        fake_targets: list[str] | None = None,
        lr: float = 1e-4,
        fake_lr: float = 1e-4,
        guidance: float = 3.0,
        fake_updates: int = 5,
        t_range: tuple[int, int] = (20, 980),
    ) -> None:
        self.c, self.steps, self.guidance, self.fake_updates, self.t_range = (
            c,
            list(steps),
            guidance,
            fake_updates,
            t_range,
        )
        unet = c.denoiser
        # the fake score starts as the teacher: a copy of the base weights with its own plain LoRA
        self.fake = tsm.inject.base_copy(unet)
        targets = fake_targets or tsm.get_routing(unet).spec.targets
        tsm.add_experts(self.fake, tsm.ExpertSpec(scales=(1,), rank=fake_rank, targets=targets))
        self.fake_c = replace(c, denoiser=self.fake)
        self.opt = torch.optim.AdamW(tsm.adapter_params(unet), lr=lr, weight_decay=0.0)
        self.fake_opt = torch.optim.AdamW(tsm.adapter_params(self.fake), lr=fake_lr, weight_decay=0.0)

    def real_score(self, x: torch.Tensor, t: torch.Tensor, cond: dict, uncond: dict) -> torch.Tensor:
        """x0 of the frozen teacher with guidance: the generator's module with its experts off."""
        c = self.c
        with torch.no_grad(), tsm.experts_off(c.denoiser):
            both = {k: torch.cat([uncond[k], v]) for k, v in cond.items()}
            pu, pc = c.family.denoise(c, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
            return c.objective.split(pu + self.guidance * (pc - pu), x, t)[0]

    def step(
        self, prompts: list[str], gen: torch.Generator, report: Callable[[int], None] | None = None
    ) -> dict[str, float]:
        """One generator update and ``fake_updates`` fake-score updates; returns the losses."""
        c, obj, unet = self.c, self.c.objective, self.c.denoiser
        n = len(prompts)
        with torch.no_grad():
            cond = c.family.encode_prompt(c, prompts)
            uncond = c.family.encode_prompt(c, [""] * n)
        shape = c.family.latent_shape(c, 0, 0)
        noise = torch.randn((n, *shape), generator=gen)
        k = int(torch.randint(len(self.steps), (1,), generator=gen))
        x_k = generator_input(c, k, noise, cond, self.steps, gen)
        unet.train()
        t_k = torch.full((n,), self.steps[k], dtype=torch.long)
        x0 = obj.split(c.family.denoise(c, x_k, t_k, cond), x_k, t_k)[0]  # the generator's output, with grad

        # distribution matching gradient at a random noise level
        t = torch.randint(*self.t_range, (n,), generator=gen)
        xt = obj.noisy(x0.detach(), torch.randn(x0.shape, generator=gen), t)
        real = self.real_score(xt, t, cond, uncond)
        with torch.no_grad():
            self.fake.eval()
            fake = obj.split(c.family.denoise(self.fake_c, xt, t, cond), xt, t)[0]
        weight = (x0.detach() - real).abs().mean(dim=tuple(range(1, x0.dim())), keepdim=True).clamp_min(1e-4)
        grad = (fake - real) / weight
        target = (x0 - grad).detach()
        gen_loss = 0.5 * (x0 - target).square().flatten(1).mean(1).mean()
        self.opt.zero_grad(set_to_none=True)
        gen_loss.backward()
        tsm.clip_grad_norm_per_expert(unet, 1.0)
        self.opt.step()

        # the fake score follows the generator's distribution (diffusion loss on its outputs)
        self.fake.train()
        fake_losses = []
        for _ in range(self.fake_updates):
            t_f = obj.sample_t(n, gen)
            eps = torch.randn(x0.shape, generator=gen)
            pred = c.family.denoise(self.fake_c, obj.noisy(x0.detach(), eps, t_f), t_f, cond)
            loss = obj.loss(pred, x0.detach(), eps, t_f).mean()
            self.fake_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.fake_opt.step()
            fake_losses.append(loss.item())
        if report is not None:
            report(n)
        return {"generator": gen_loss.item(), "fake": sum(fake_losses) / len(fake_losses), "step": k}
