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

Optional GAN phase (DMD2 section 4.3): a small head on the fake score's bottleneck features (the UNet's
mid block, or a DiT's last block) tells noisy real latents from noisy generator outputs; the head trains
with the fake score, and the generator gets a non-saturating GAN loss through the (frozen) fake score.

Two stages, as for the other tasks: with a context scale (``scales=(4, 1)``) the experts are fostered with
the generator loss, then `Distiller.assemble` freezes them and only the routers train.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

import tsm
from tsm.config import OptimConfig
from tsm.models import Components
from tsm.optimizers import build_optimizer
from tsm.recipes.base import (
    Recipe,
    SingleProcess,
    all_reduce_grads,
    autocast,
    encode_latents,
    local_slice,
    register,
    step_generator,
    weight_dtype,
)
from tsm.sampling import sample_timesteps_list, step_to

STEPS = (999, 749, 499, 249)


def distill_spec(
    rank: int, targets: list[str], alpha: float | None = None, num_steps: int = 4, context: bool = False
) -> Any:
    """One core expert per generator step (uniform scale = number of steps), plus a full-range context expert."""
    return tsm.ExpertSpec(
        scales=(num_steps, 1) if context else (num_steps,), rank=rank, alpha=alpha, targets=targets
    )


def _timesteps(c: Components, t: float, n: int) -> torch.Tensor:
    """(n,) copies of t in the objective's dtype (integer for DDPM models, float for flow matching), on the
    denoiser's device."""
    dtype = torch.float32 if c.objective.continuous else torch.long
    return torch.full((n,), t, dtype=dtype, device=next(c.denoiser.parameters()).device)


def generator_input(
    c: Components,
    step: int,
    noise: torch.Tensor,
    cond: dict,
    steps: Sequence[int],
    gen: torch.Generator,
    dtype: torch.dtype | None = None,
    draw: Callable[[Sequence[int], torch.Generator], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Backward simulation: the input of generator step ``step``, made by the generator's own first steps.

    ``draw(shape, gen)`` makes the re-noising draws (default: ``randn`` on the CPU, moved to x's device); a
    multi-process run draws the global batch's and keeps its own rows.
    """
    x = noise
    draw = draw or (lambda shape, g: torch.randn(tuple(shape), generator=g).to(x.device))
    with torch.no_grad():
        for k in range(step):
            t = _timesteps(c, steps[k], len(x))
            with autocast(c, dtype):
                pred = c.family.denoise(c, x, t, cond).float()
            x = step_to(c.objective, pred, x, t, steps[k + 1], draw(x.shape, gen))
    return x


# ---------------------------------------------------------------------------------------------------------
# the GAN head
# ---------------------------------------------------------------------------------------------------------
def feature_module(denoiser: nn.Module) -> nn.Module:
    """The fake score's bottleneck: a UNet's mid block, else a transformer's last block."""
    if getattr(denoiser, "mid_block", None) is not None:
        return denoiser.mid_block
    last = None
    for name in ("transformer_blocks", "single_transformer_blocks", "blocks"):
        blocks = getattr(denoiser, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            last = blocks[-1]
    if last is None:
        raise tsm.TsmError(
            f"no mid_block or transformer blocks in {type(denoiser).__name__} for the GAN head"
        )
    return last


class GanHead(nn.Module):
    """Real-vs-generated logit from features (B, C, *spatial) or tokens (B, L, C): a per-token MLP, averaged."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(channels), nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, 1)
        )

    @staticmethod
    def tokens(features: torch.Tensor) -> torch.Tensor:
        if features.dim() == 3:  # (B, L, C)
            return features
        return features.flatten(2).transpose(1, 2)  # (B, C, *S) -> (B, L, C)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(self.tokens(features).float()).mean(dim=(1, 2))  # (B,)


class _Capture:
    """Forward hook keeping the last output of a module: a tensor, or the last tensor of a tuple (MM-DiT
    blocks return (text, image) tokens)."""

    def __init__(self) -> None:
        self.out: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, out: object) -> None:
        if isinstance(out, tuple):
            out = [o for o in out if isinstance(o, torch.Tensor)][-1]
        self.out = out


# ---------------------------------------------------------------------------------------------------------
# the distiller
# ---------------------------------------------------------------------------------------------------------
class Distiller:
    """DMD-style distillation of ``c`` (whose denoiser already has the generator's experts)."""

    def __init__(
        self,
        c: Components,
        steps: Sequence[float] = STEPS,
        fake_rank: int = 8,
        fake_targets: list[str] | None = None,
        lr: float = 1e-4,
        fake_lr: float = 1e-4,
        guidance: float = 3.0,
        fake_updates: int = 5,
        t_range: tuple[int, int] = (20, 980),
        gan_weight: float = 0.0,
        gan_disc_weight: float = 1.0,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
        resolution: int = 512,
        num_frames: int = 16,
        dtype: torch.dtype | None = None,
        acc: Any = None,
        optim: OptimConfig | None = None,
    ) -> None:
        self.optim = optim or OptimConfig()  # optim.name and its settings (None: AdamW, default betas / eps)
        self.resolution, self.num_frames = resolution, num_frames  # of generated samples (pixels, frames)
        # with an Accelerator each process takes its rows of every global draw and the gradients are summed
        self.acc = acc or SingleProcess(next(c.denoiser.parameters()).device)
        self.n, self.rows = 0, slice(None)  # the step's global batch and this process's rows (set by `step`)
        self.dtype = dtype  # mixed precision of the forward passes (None: float32)
        self.device = next(c.denoiser.parameters()).device
        self.c, self.steps, self.guidance, self.fake_updates = c, list(steps), guidance, fake_updates
        self.t_range, self.gan_weight, self.gan_disc_weight = t_range, gan_weight, gan_disc_weight
        self.lr, self.weight_decay, self.max_grad_norm = lr, weight_decay, max_grad_norm
        unet = c.denoiser
        # the fake score starts as the teacher: a copy of the base weights with its own plain LoRA
        self.fake = tsm.inject.base_copy(unet)
        routing = tsm.get_routing(unet)
        spec = routing.spec
        targets = fake_targets or spec.targets
        fake_spec = tsm.ExpertSpec(
            scales=(1,),
            rank=fake_rank,
            targets=targets,
            num_timesteps=spec.num_timesteps,
            timestep_scale=spec.timestep_scale,
        )
        tsm.add_experts(self.fake, fake_spec)
        self.fake_c = replace(c, denoiser=self.fake)
        self.capture = _Capture()
        feature_module(self.fake).register_forward_hook(self.capture)
        self.head = self._make_head()
        self.opt = self._generator_optimizer()
        self.fake_opt = build_optimizer(
            self.optim, [{"params": self.fake_params(), "lr": fake_lr, "weight_decay": 0.0}]
        )

    def fake_params(self) -> list[nn.Parameter]:
        """What the fake-score updates train: its LoRA and the GAN head."""
        return [*tsm.adapter_params(self.fake), *self.head.parameters()]

    def _make_head(self) -> GanHead:
        """Size the head from one forward of the fake score on a dummy batch."""
        c = self.fake_c
        with torch.no_grad():
            x = torch.zeros(
                (1, *c.family.latent_shape(c, self.resolution, self.num_frames)), device=self.device
            )
            self._denoise(c, x, _timesteps(c, self.steps[0], 1), self._encode(c, [""]))
        return GanHead(GanHead.tokens(self.capture.out).shape[-1]).to(self.device)

    def _generator_optimizer(self) -> torch.optim.Optimizer:
        params = tsm.adapter_params(self.c.denoiser)
        return build_optimizer(
            self.optim, [{"params": params, "lr": self.lr, "weight_decay": self.weight_decay}]
        )

    def assemble(self, lr: float | None = None) -> None:
        """Second stage: freeze the fostered experts; from now on only the routers learn."""
        tsm.set_stage(self.c.denoiser, "assemble")
        self.lr = lr if lr is not None else self.lr
        self.opt = self._generator_optimizer()

    def _denoise(self, c: Components, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        with autocast(c, self.dtype):
            return c.family.denoise(c, x, t, cond).float()

    def _encode(self, c: Components, prompts: list[str]) -> dict:
        with autocast(c, self.dtype):
            return c.family.encode_prompt(c, prompts)

    def _randn(self, shape: Sequence[int], gen: torch.Generator) -> torch.Tensor:
        """This process's rows of a draw for the global batch (CPU draws: the same on any device)."""
        shape = (self.n, *shape[1:])  # the global batch
        return torch.randn(shape, generator=gen)[self.rows].to(self.device)

    def real_score(self, x: torch.Tensor, t: torch.Tensor, cond: dict, uncond: dict) -> torch.Tensor:
        """x0 of the frozen teacher with guidance: the generator's module with its experts off."""
        c = self.c
        with torch.no_grad(), tsm.experts_off(c.denoiser):
            both = {k: torch.cat([uncond[k], v]) for k, v in cond.items()}
            pu, pc = self._denoise(c, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
            return c.objective.split(c.family.guide(pu, pc, self.guidance), x, t)[0]

    def _noise_level(self, n: int, gen: torch.Generator) -> torch.Tensor:
        t = torch.randint(*self.t_range, (self.n,), generator=gen)[self.rows]
        return (t.float() if self.c.objective.continuous else t).to(self.device)

    def _logit(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The GAN head on the fake score's features of noisy x at t."""
        self._denoise(self.fake_c, x, t, cond)
        return self.head(self.capture.out)

    def step(
        self,
        prompts: list[str],
        gen: torch.Generator,
        report: Callable[[int], None] | None = None,
        real: torch.Tensor | None = None,
        gan: bool = False,
    ) -> dict[str, float]:
        """One generator update and ``fake_updates`` fake-score updates; returns the losses.

        ``gan=True`` adds the GAN losses of the second phase; ``real`` is then a batch of real latents whose
        captions are ``prompts``.
        """
        c, obj, unet, acc = self.c, self.c.objective, self.c.denoiser, self.acc
        gan = gan and self.gan_weight > 0
        if gan and (real is None or len(real) != len(prompts)):
            raise ValueError("the GAN phase needs the real latents of the prompts' images (real=...)")
        self.n, self.rows = len(prompts), local_slice(acc, len(prompts))  # global batch, this process's rows
        prompts = prompts[self.rows]
        real = real[self.rows] if real is not None else None
        n = len(
            prompts
        )  # local rows; every mean below is a share of the global batch's (summed over processes)
        share = n / self.n
        with torch.no_grad():
            cond = self._encode(c, prompts)
            uncond = self._encode(c, [""] * n)
        shape = c.family.latent_shape(c, self.resolution, self.num_frames)
        noise = self._randn((n, *shape), gen)
        k = int(torch.randint(len(self.steps), (1,), generator=gen))
        unet.train()  # the simulation routes each sample as the update does (and never merges weights)
        x_k = generator_input(c, k, noise, cond, self.steps, gen, self.dtype, draw=self._randn)
        t_k = _timesteps(c, self.steps[k], n)
        x0 = obj.split(self._denoise(c, x_k, t_k, cond), x_k, t_k)[0]  # the generator's output, with grad

        # distribution matching gradient at a random noise level
        t = self._noise_level(n, gen)
        xt = obj.noisy(x0.detach(), self._randn(x0.shape, gen), t)
        real_x0 = self.real_score(xt, t, cond, uncond)
        self.fake.eval()
        with torch.no_grad():
            fake_x0 = obj.split(self._denoise(self.fake_c, xt, t, cond), xt, t)[0]
        weight = (x0.detach() - real_x0).abs().mean(dim=tuple(range(1, x0.dim())), keepdim=True)
        grad = (fake_x0 - real_x0) / weight.clamp_min(1e-4)
        target = (x0 - grad).detach()
        dm_loss = 0.5 * (x0 - target).square().flatten(1).mean(1).mean() * share
        gen_loss = dm_loss
        out: dict[str, float] = {"step": k, "dm": dm_loss.item()}
        if gan:  # non-saturating GAN loss through the fake score (its weights get no update from it)
            t_g = self._noise_level(n, gen)
            logit = self._logit(obj.noisy(x0, self._randn(x0.shape, gen), t_g), t_g, cond)
            gan_loss = nn.functional.softplus(-logit).mean() * share
            gen_loss = gen_loss + self.gan_weight * gan_loss
            out["gan_generator"] = gan_loss.item()
        self.opt.zero_grad(set_to_none=True)
        gen_loss.backward()
        all_reduce_grads(acc, tsm.adapter_params(unet))
        if self.max_grad_norm is not None:
            tsm.clip_grad_norm_per_expert(unet, self.max_grad_norm)
        self.opt.step()
        out["generator"] = gen_loss.item()

        # the fake score follows the generator's distribution (diffusion loss on its outputs)
        self.fake.train()
        fake_losses, disc_losses = [], []
        for _ in range(self.fake_updates):
            t_f = obj.sample_t(self.n, gen)[self.rows].to(self.device)
            eps = self._randn(x0.shape, gen)
            pred = self._denoise(self.fake_c, obj.noisy(x0.detach(), eps, t_f), t_f, cond)
            loss = obj.loss(pred, x0.detach(), eps, t_f).mean() * share
            fake_losses.append(loss.item())
            if gan:  # the head: generated (features of the pass above) vs noisy real latents
                fake_logit = self.head(self.capture.out)
                t_r = self._noise_level(n, gen)
                real_noisy = obj.noisy(real.to(self.device), self._randn(real.shape, gen), t_r)
                real_logit = self._logit(real_noisy, t_r, cond)
                disc = (
                    nn.functional.softplus(fake_logit).mean() + nn.functional.softplus(-real_logit).mean()
                ) * share
                loss = loss + self.gan_disc_weight * disc
                disc_losses.append(disc.item())
            self.fake_opt.zero_grad(set_to_none=True)
            loss.backward()
            all_reduce_grads(acc, self.fake_params())
            self.fake_opt.step()
        out["fake"] = sum(fake_losses) / len(fake_losses)
        if disc_losses:
            out["gan_head"] = sum(disc_losses) / len(disc_losses)
        if report is not None:
            report(n)
        if acc.num_processes > 1:  # every loss above is this process's share of the global mean
            keys = [k for k in out if k != "step"]
            total = acc.reduce(torch.tensor([out[k] for k in keys], device=self.device), "sum")
            out.update(zip(keys, total.tolist(), strict=True))
        return out

    # --- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Optimizers and the GAN head (the fake score's LoRA is saved with `tsm.save(d.fake, ...)`)."""
        return {
            "opt": self.opt.state_dict(),
            "fake_opt": self.fake_opt.state_dict(),
            "head": self.head.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["opt"])
        self.fake_opt.load_state_dict(state["fake_opt"])


# ---------------------------------------------------------------------------------------------------------
# `tsm train` with method: distill
# ---------------------------------------------------------------------------------------------------------
@register("distill")
class DistillRecipe(Recipe):
    """The CLI's distillation run: prompts (and, in the GAN phase, real latents) from ``data.path``; steps
    ``0 .. train.steps - 1`` foster the per-step experts, ``train.assemble_steps`` more train the routers."""

    tunes_text = False

    def __init__(self, cfg: Any, c: Components, dataset: Any, cache: Any, acc: Any) -> None:
        super().__init__(cfg, c, dataset, cache, acc)
        if not c.objective.continuous and max(cfg.distill.timesteps) >= c.objective.num_timesteps:
            raise tsm.TsmError(
                f"distill.timesteps must be below the model's {c.objective.num_timesteps} training timesteps"
            )
        d = cfg.distill
        self.distiller = Distiller(
            c,
            steps=d.timesteps,
            fake_rank=d.fake_rank,
            lr=cfg.optim.lr,
            fake_lr=d.fake_lr if d.fake_lr is not None else cfg.optim.lr,
            guidance=d.guidance_scale,
            fake_updates=d.fake_updates,
            t_range=(d.t_min, d.t_max),
            gan_weight=d.gan_weight,
            gan_disc_weight=d.gan_disc_weight,
            weight_decay=cfg.optim.weight_decay,
            max_grad_norm=cfg.optim.max_grad_norm,
            resolution=cfg.data.resolution,
            num_frames=cfg.data.num_frames,
            dtype=weight_dtype(cfg),
            acc=acc,
            optim=cfg.optim,
        )

    def total_steps(self) -> int:
        return self.cfg.train.steps + self.cfg.train.assemble_steps

    def modules(self) -> dict[str, nn.Module]:
        return {self.c.family.denoiser_subfolder: self.c.denoiser, "fake_score": self.distiller.fake}

    def begin(self, step: int) -> None:
        if step >= self.cfg.train.steps and tsm.get_routing(self.c.denoiser).stage != "assemble":
            self.distiller.assemble()

    def step(self, step: int) -> dict[str, float]:
        from tsm.data import collate, dataset_item

        cfg = self.cfg
        g = step_generator(cfg.train.seed, step)
        idx = torch.randint(len(self.dataset), (cfg.train.batch_size,), generator=g)
        # the step as the epoch: each draw of an item gets its own caption dropout (done by the dataset)
        batch = collate([dataset_item(self.dataset, int(i), step) for i in idx])
        gan = cfg.distill.gan_weight > 0 and step >= cfg.distill.gan_start
        real = None
        if gan:
            with torch.no_grad():
                gens = [
                    torch.Generator().manual_seed(int(s))
                    for s in torch.randint(2**62, (len(idx),), generator=g)
                ]
                real = encode_latents(self.c, batch, self.cache, gens)
        out = self.distiller.step(list(batch["captions"]), g, real=real, gan=gan)
        out["loss"] = out["generator"]
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.distiller.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.distiller.load_state_dict(state)

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
        """The generator's own timesteps, re-noised between steps, no guidance (``steps`` is ignored)."""
        return sample_timesteps_list(
            c, prompts, seeds, cfg.distill.timesteps, None, renoise=True, resolution=resolution,
            num_frames=cfg.data.num_frames, progress=progress, desc=desc,
        )  # fmt: skip
