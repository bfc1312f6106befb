"""Plain LoRA (n=1), fostering and assembling: the diffusion loss with per-sample expert routing.

    tsm train sd15_foster [section.key=value ...] [--resume]

Every random draw of a step (its samples, timesteps, expert scales, noise) comes from generators seeded by
(seed, step) over the *global* batch, and each process takes its slice. The denoiser and text encoders are
handed to `accelerator.prepare` (DDP with ``find_unused_parameters``): an expert that no sample of the global
batch was routed to keeps ``grad None`` on every process, so AdamW leaves it and its state alone, and the
loss is each expert's own mean over the global batch (`tsm.expert_loss_weights`' rule), so fostering all
experts together equals fostering them one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tsm import io
from tsm.errors import TsmError
from tsm.grads import clip_grad_norm_per_expert
from tsm.inject import adapter_params, expert_layers, get_routing, set_stage, set_timesteps
from tsm.intervals import expert_index
from tsm.recipes.base import (
    DiffusionLoss,
    Recipe,
    encode_latents,
    expert_modules,
    register,
    step_generator,
)
from tsm.routing import Route


@register("lora", "foster", "assemble")
class LoraFosterRecipe(Recipe):
    """``lora``: one expert over all t. ``foster``: every expert of ``experts.scales`` in one run (or one
    with ``train.only_expert``). ``assemble``: the fostered experts frozen, only the routers train."""

    @classmethod
    def expert_scales(cls, cfg: Any, c: Any) -> tuple:
        return (1,) if cfg.train.method == "lora" else super().expert_scales(cfg, c)

    def __init__(self, cfg: Any, c: Any, dataset: Any, cache: Any, acc: Any) -> None:
        super().__init__(cfg, c, dataset, cache, acc)
        tc = cfg.train
        if tc.method == "assemble":
            load_fostered(c, Path(tc.experts_from))
        # joint assembling: set_stage froze the experts; they train on (in their own param group, see
        # expert_groups), switched on before `prepare`: DDP registers the parameters that train when it wraps
        self.joint = tc.method == "assemble" and tc.assemble_experts_lr is not None
        if self.joint:
            for module in expert_modules(c).values():
                for p in expert_weights(module):
                    p.requires_grad_(True)
        # warm start: steps 0 .. warm_steps - 1 train expert WARM alone on every t (see `begin`)
        self.warm_steps = round(tc.warm_start_fraction * tc.steps) if tc.method == "foster" else 0
        self.warm_hooks: list[Any] = []
        self.per_expert = tc.batch_per_expert and tc.method == "foster" and tc.only_expert is None
        self.batch = self.global_batch()
        world = acc.num_processes
        if self.batch % (tc.grad_accum * world):
            raise TsmError(
                f"the global batch ({self.batch}) must be divisible by train.grad_accum x processes = "
                f"{tc.grad_accum * world}"
            )
        self.micro = self.batch // tc.grad_accum
        self.local = self.micro // world
        self.model = acc.prepare(DiffusionLoss(c, cache))  # DDP when there are several processes
        self.opt, self.sched = make_optimizer(cfg, c, acc, extra_groups=self.expert_groups())
        self.ema = make_ema(cfg, c)
        from tsm.data import step_loader

        self.loader = step_loader(
            dataset, cfg, self.batch, self.micro, self.local, acc.process_index, self.total_steps()
        )
        self.batches: Any = None

    def expert_groups(self) -> list[dict[str, Any]]:
        """Joint assembling: the experts' param groups at ``train.assemble_experts_lr`` (each module's weight
        decay, as make_optimizer's); none otherwise."""
        if not self.joint:
            return []
        o, groups = self.cfg.optim, []
        for name, module in expert_modules(self.c).items():
            text = name != self.c.family.denoiser_subfolder
            wd = o.text_weight_decay if text and o.text_weight_decay is not None else o.weight_decay
            lr = self.cfg.train.assemble_experts_lr
            groups.append({"params": expert_weights(module), "lr": lr, "weight_decay": wd})
        return groups

    # --- warm start --------------------------------------------------------------------------------------
    def begin(self, step: int) -> None:
        """Warm start: route every sample to expert WARM before ``warm_steps``; at it, copy that LoRA into
        every expert. A resumed run re-enters the phase of its step (begin(start - 1), then the checkpoint is
        loaded): inside the warm phase the hooks go back on, after it nothing is copied again."""
        warm = step < self.warm_steps
        if warm and not self.warm_hooks:
            for module in expert_modules(self.c).values():  # after the timestep hook: it routes by t first
                self.warm_hooks.append(module.register_forward_pre_hook(_route_to_warm))
        elif not warm and self.warm_hooks:
            self.specialise()

    def specialise(self) -> None:
        """The end of the warm phase: every expert of every scale starts from the warm LoRA.

        The warm expert's optimizer state is dropped (the other routed experts had none): its moments are
        those of the full-range gradient, whose scale differs from each interval's (the loss at high t is far
        larger than at low t), and dropping them treats every expert alike, so each expert's run from here
        equals fostering it alone from the warm LoRA (a shared expert keeps its state: its task is the
        same). The LR schedule continues (it counts the run's steps). The EMA of each expert continues from
        the warm LoRA's average, as if it had been that expert all along.
        """
        for hook in self.warm_hooks:
            hook.remove()
        self.warm_hooks = []
        shadow = {}
        if self.ema is not None:
            shadow = {id(p): s for p, s in zip(self.ema_params(), self.ema.shadow_params, strict=True)}
        with torch.no_grad():
            for module in expert_modules(self.c).values():
                for _, layer in expert_layers(module):
                    layer.unmerge()  # a merged base weight would keep the old expert
                    for bank in (layer.lora_A, layer.lora_B):
                        source = bank[layer.keys[WARM]]
                        for key in layer.keys:
                            bank[key].copy_(source)
                            if shadow:
                                shadow[id(bank[key])].copy_(shadow[id(source)])
                        self.opt.state.pop(source, None)

    def global_batch(self) -> int:
        """Samples per step over all processes: ``batch_size``, or per expert with ``batch_per_expert``."""
        n = self.cfg.train.batch_size
        return n * sum(get_routing(self.c.denoiser).spec.experts_per_scale) if self.per_expert else n

    # --- draws -----------------------------------------------------------------------------------------
    def draws(self, step: int) -> tuple[dict[str, torch.Tensor], int]:
        """Per-sample timesteps, expert scales and loss weights of the global batch of one step, and a seed
        for the rest (noise, dropout): the same on every process."""
        cfg, c = self.cfg, self.c
        g = step_generator(cfg.train.seed, step)
        spec = get_routing(c.denoiser).spec
        m = len(spec.scales)
        only = cfg.train.only_expert
        if cfg.train.method == "foster" and only is not None:
            scale, index = only
            if not 0 <= scale < m or not 0 <= index < spec.experts_per_scale[scale]:
                raise TsmError(f"train.only_expert={only} is not an expert of scales {list(spec.scales)}")
            t = c.objective.sample_t(self.batch, g, expert=(spec.scales[scale], index))
            scales = torch.full((self.batch,), scale)
        elif self.per_expert:  # a block of batch_size samples per expert, t inside its interval
            n = cfg.train.batch_size
            blocks = [
                (s, c.objective.sample_t(n, g, expert=(spec.scales[s], i)))
                for s in range(m)
                for i in range(spec.experts_per_scale[s])
            ]
            t = torch.cat([tb for _, tb in blocks])
            scales = torch.cat([torch.full((n,), s) for s, _ in blocks])
        else:
            t = c.objective.sample_t(self.batch, g)
            scales = torch.arange(self.batch) % m  # sample b fosters scale b % m
        if cfg.train.method == "assemble":
            # one mixture: the plain mean, also when the experts train on (joint assembling), since the
            # routers are shared by every t; each expert is still clipped on its own (max_grad_norm)
            weights = torch.full((self.batch,), 1.0 / self.batch)
        else:  # each expert's own mean loss (see tsm.expert_loss_weights)
            ids = self.expert_ids(t, scales)
            if step < self.warm_steps:  # warm start: every sample trains expert WARM, one LoRA
                ids = torch.full_like(ids, WARM)
            weights = 1.0 / torch.bincount(ids)[ids].float()
        seed = int(torch.randint(0, 2**62, (1,), generator=g))
        return {"t": t, "scales": scales, "weights": weights}, seed

    def expert_ids(self, t: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """The loss group of each sample: the global id of the expert it trains (its scale's interval, offset
        by the scale); with smooth routing one group for the finest scale (`Routing.loss_ids`)."""
        return get_routing(self.c.denoiser).loss_ids(t, scales)

    # --- one step --------------------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        cfg, c, acc = self.cfg, self.c, self.acc
        tc = cfg.train
        if self.batches is None:  # the first step of this process (0, or the step resumed at)
            self.batches = iter(self.loader(step))
            for m in expert_modules(c).values():
                m.train()
        draws, seed = self.draws(step)
        torch.manual_seed(seed + acc.process_index)  # dropout inside the model: reproducible on resume
        self.opt.zero_grad(set_to_none=True)
        sums = torch.zeros(2, self.num_intervals())  # per finest interval: loss sum, count (global)
        for k in range(tc.grad_accum):
            lo = k * self.micro + acc.process_index * self.local  # this process's slice of the global batch
            sl = slice(lo, lo + self.local)
            mine = {key: v[sl] for key, v in draws.items()}
            seeds = [seed + b for b in range(lo, lo + self.local)]  # one generator per sample
            sync = k == tc.grad_accum - 1
            for m in expert_modules(c).values():  # a shared expert trains on the global batch's plain mean
                get_routing(m).shared_grad_scale = 1.0 / (self.batch * mine["weights"])
            with acc.no_sync(self.model) if not sync else nullcontext():
                loss, per_sample = self.micro_step(next(self.batches), mine, seeds)
                acc.backward(loss)
            interval = expert_index(
                mine["t"], get_routing(c.denoiser).spec.scales[0], c.objective.num_timesteps
            )
            sums[0].index_add_(0, interval, per_sample.detach().float().cpu())
            sums[1].index_add_(0, interval, torch.ones(len(interval)))
        sums = acc.reduce(sums.to(acc.device), reduction="sum").cpu() if acc.num_processes > 1 else sums
        total = float(sums[0].sum() / self.batch)
        if torch.isfinite(torch.tensor(total)):
            if cfg.optim.max_grad_norm is not None:
                acc.unscale_gradients()  # fp16: clip the true gradients
                for module in expert_modules(c).values():
                    clip_grad_norm_per_expert(module, cfg.optim.max_grad_norm)
            self.opt.step()
            self.sched.step()
            if self.ema is not None:
                self.ema.step(self.ema_params())
        out = {"loss": total, "lr": self.sched.get_last_lr()[0]}
        for i, (s, n) in enumerate(sums.T.tolist()):
            if n:
                out[f"loss/interval_{i}"] = s / n  # which expert is under-trained
        return out

    def num_intervals(self) -> int:
        return get_routing(self.c.denoiser).spec.experts_per_scale[0]

    def micro_step(self, batch: dict, draws: dict, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward one micro-batch. Returns its share of the global loss (the per-expert weighted sum times
        the number of processes, since DDP averages gradients) and its per-sample losses (to log)."""
        c, acc = self.c, self.acc
        gens = [torch.Generator().manual_seed(s) for s in seeds]  # a sample's noise ignores its batch
        with torch.no_grad():
            latents = encode_latents(c, batch, self.cache, gens).to(acc.device)
        t = draws["t"].to(acc.device)
        for name, module in expert_modules(c).items():
            get_routing(module).foster_scales = draws["scales"].to(acc.device)
            if name != c.family.denoiser_subfolder:  # text encoders follow the sample's t
                set_timesteps(module, t)
        noise = c.objective.draw_noise(tuple(latents.shape[1:]), gens).to(acc.device)
        with acc.autocast():
            sizes = batch.get("original_sizes"), batch.get("crop_top_lefts")  # SDXL's size conditioning
            per_sample = self.model(latents, noise, t, batch["captions"], *sizes)
        weighted = (draws["weights"].to(acc.device) * per_sample).sum() * acc.num_processes
        return weighted, per_sample

    # --- EMA and state -----------------------------------------------------------------------------------
    def ema_params(self) -> list[nn.Parameter]:
        return [p for m in expert_modules(self.c).values() for p in adapter_params(m)]

    def finish(self) -> None:
        """With EMA on, the run's final adapters are the averaged ones (as diffusers' scripts save them)."""
        if self.ema is not None:
            self.ema.copy_to(self.ema_params())

    def state_dict(self) -> dict[str, Any]:
        state = {"opt": self.opt.state_dict(), "sched": self.sched.state_dict()}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


# ---------------------------------------------------------------------------------------------------------
WARM = 0  # global id of the expert trained as the warm-start LoRA (s0_i0; any expert would do)


def expert_weights(module: nn.Module) -> list[nn.Parameter]:
    """Every expert's A and B in ``module``, the shared expert's too (the routers left out)."""
    return [p for _, layer in expert_layers(module) for p in layer.expert_params()]


def _route_to_warm(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of the warm phase, run after the timestep hook (or set_timesteps) routed the forward
    by t: every sample goes through expert WARM instead, one LoRA over all t (the single-expert path, no
    smooth blend); a shared expert keeps its part (its gradient factor is 1: every sample weighs 1 / B)."""
    routing = get_routing(module)
    state = routing.state
    if state is not None:
        ids = torch.full((len(state.main.ids),), WARM)  # (B,)
        main = Route.from_ids(ids, state.t_index.device)
        routing.state = replace(state, main=main, context=[], blend=None, loss_ids=ids)


def load_fostered(c: Any, source: Path) -> None:
    """Load the experts of a fostered run (its dir, or the denoiser's experts file), frozen: stage assemble."""
    for name, module in expert_modules(c).items():
        if not source.is_dir() and name != c.family.denoiser_subfolder:
            continue  # a single file holds the denoiser's experts only
        io.load(module, source / f"{name}.safetensors" if source.is_dir() else source, experts_only=True)
        set_stage(module, "assemble")


def make_optimizer(
    cfg: Any, c: Any, acc: Any, extra_groups: Sequence[dict[str, Any]] = ()
) -> tuple[torch.optim.Optimizer, Any]:
    """``optim.name``'s optimizer over the adapters (text encoders with their own lr / weight decay) and
    diffusers' LR schedule. ``extra_groups``: more param groups, after the adapters' (which leave their
    parameters out)."""
    from diffusers.optimization import get_scheduler

    from tsm.optimizers import build_optimizer

    taken = {id(p) for group in extra_groups for p in group["params"]}
    groups = []
    for name, module in expert_modules(c).items():
        params = [p for p in adapter_params(module) if id(p) not in taken]
        if not params:
            continue
        text = name != c.family.denoiser_subfolder
        o = cfg.optim
        lr = o.text_lr if text and o.text_lr is not None else o.lr
        wd = o.text_weight_decay if text and o.text_weight_decay is not None else o.weight_decay
        groups.append({"params": params, "lr": lr, "weight_decay": wd})
    groups.extend(extra_groups)
    # fused AdamW: one kernel for the many small per-expert tensors (adapters are float32)
    fused = acc.device.type in ("cpu", "cuda")
    opt = build_optimizer(cfg.optim, groups, fused=fused)
    opt = acc.prepare(opt)
    sched = get_scheduler(
        cfg.optim.lr_scheduler,
        opt,
        num_warmup_steps=cfg.optim.warmup_steps,
        num_training_steps=cfg.train.steps,
        num_cycles=cfg.optim.lr_num_cycles,
        power=cfg.optim.lr_power,
    )
    return opt, sched


def make_ema(cfg: Any, c: Any) -> Any:
    """diffusers' EMAModel over the adapters, or None (``optim.ema_decay`` unset)."""
    if cfg.optim.ema_decay is None:
        return None
    from diffusers.training_utils import EMAModel

    params = [p for m in expert_modules(c).values() for p in adapter_params(m)]
    return EMAModel(params, decay=cfg.optim.ema_decay)
