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
        elif tc.experts_from:  # warm start: every expert begins as the given LoRA (a Wan 2.2 pair: per side)
            for line in import_warm_start(c, Path(tc.experts_from)):
                acc.print(line)
        # joint assembling: set_stage froze the experts; they train on (in their own param group, see
        # expert_groups), switched on before `prepare`: DDP registers the parameters that train when it wraps
        self.joint = tc.method == "assemble" and tc.assemble_experts_lr is not None
        if self.joint:
            for module in expert_modules(c).values():
                for p in expert_weights(module):
                    p.requires_grad_(True)
        # the denoisers (Wan 2.2: high- and low-noise transformer), in the order a step's batch is grouped by
        self.parts = list(c.family.denoiser_parts(c, torch.zeros(1)))
        self.trained_parts = [n for n in self.parts if n in expert_modules(c)]
        self.only = tc.only_transformer
        self.check_parts(acc.num_processes)
        # warm start: steps 0 .. warm_steps - 1 train expert WARM alone on every t (see `begin`)
        self.warm_steps = round(tc.warm_start_fraction * tc.steps) if tc.method == "foster" else 0
        self.warm_hooks: list[Any] = []
        self.per_expert = tc.batch_per_expert and tc.method == "foster" and tc.only_expert is None
        self.share_scaled = tc.share_scaled_lr and tc.method == "foster"
        if self.share_scaled and len(self.parts) > 1:
            raise TsmError(
                "train.share_scaled_lr is not available with Wan 2.2's two transformers yet; unset it"
            )
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
        if len(self.parts) > 1:
            self.check_both_sides()

    def check_parts(self, world: int) -> None:
        """What a two-denoiser run (Wan 2.2) cannot combine with, refused in one line before anything runs."""
        tc = self.cfg.train
        if len(self.parts) == 1:
            if tc.high_noise_fraction is not None:
                raise TsmError(
                    "train.high_noise_fraction splits samples between Wan 2.2's two transformers; this model has "
                    "one denoiser: leave it unset (objective.weighting shapes the timestep density)"
                )
            return
        for key, value in (
            ("only_expert", tc.only_expert),
            ("batch_per_expert", tc.batch_per_expert or None),
            ("warm_start_fraction", tc.warm_start_fraction or None),
        ):
            if value is not None:
                raise TsmError(
                    f"train.{key} is not available with Wan 2.2's two transformers yet; unset it (the experts "
                    "of each transformer share its samples; train.only_transformer trains one side)"
                )
        if self.only is not None and world > 1:
            raise TsmError(
                "train.only_transformer runs in one process (the other side's samples are left out of each "
                "micro-batch); run it without torchrun/accelerate, or train both sides in one run"
            )

    def check_both_sides(self) -> None:
        """A transformer with experts that no sample of the whole run reaches would train nothing: say which
        side got none before the first step (the draws are the run's own: seeded by step)."""
        c, tc = self.c, self.cfg.train
        seen: set[str] = set()
        for step in range(self.total_steps()):
            t = self.draw_t(step_generator(tc.seed, step))
            seen |= {n for n, rows in c.family.denoiser_parts(c, t).items() if bool(rows.any())}
            if seen >= set(self.trained_parts):
                return
        missing = [n for n in self.trained_parts if n not in seen]
        label = c.family.part_labels.get(missing[0], missing[0]).replace("_", "-")
        b = c.extra["boundary_timestep"]
        side = f"t >= {b:g}" if missing[0] == self.parts[0] else f"t < {b:g}"
        raise TsmError(
            f"no training sample of the {self.total_steps()} steps x {self.batch} samples falls at {side}, so "
            f"the {label} transformer ({missing[0]}) would train nothing; set train.high_noise_fraction "
            "(e.g. 0.5), more steps or a larger batch"
        )

    def draw_t(self, g: torch.Generator) -> torch.Tensor:
        """The global batch's timesteps (B,): the objective's density over [0, T), or with
        ``train.high_noise_fraction`` that share of them at t >= the boundary (the density inside each side).
        Two denoisers: ordered by the denoiser that takes them, high-noise first (`train.offload_inactive` then
        switches transformers at most once per step)."""
        c, frac = self.c, self.cfg.train.high_noise_fraction
        if frac is None:
            t = c.objective.sample_t(self.batch, g)
        else:
            n_high = min(max(round(frac * self.batch), 1), self.batch - 1)
            cut = (c.extra["boundary_timestep"],)  # one cut point: interval 1 is [boundary, T]
            t = torch.cat(
                [
                    c.objective.sample_t(n_high, g, expert=(cut, 1)),
                    c.objective.sample_t(self.batch - n_high, g, expert=(cut, 0)),
                ]
            )
        if len(self.parts) > 1:
            t = t[torch.argsort(self.part_of(t), stable=True)]
        return t

    def expert_groups(self) -> list[dict[str, Any]]:
        """Joint assembling: the experts' param groups at ``train.assemble_experts_lr`` (each module's weight
        decay, as make_optimizer's); none otherwise."""
        if not self.joint:
            return []
        o, groups = self.cfg.optim, []
        for name, module in expert_modules(self.c).items():
            text = name in self.c.text_encoders
            wd = o.text_weight_decay if text and o.text_weight_decay is not None else o.weight_decay
            lr = self.cfg.train.assemble_experts_lr
            groups.append({"params": expert_weights(module), "lr": lr, "weight_decay": wd})
        return groups

    # --- share-scaled steps ------------------------------------------------------------------------------
    def expert_snapshot(self, factors: dict[int, float]) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """(param, its value before the step, factor) of every A and B of an expert whose factor is not 1."""
        out = []
        for module in expert_modules(self.c).values():
            for _, layer in expert_layers(module):
                for e, key in enumerate(layer.keys):
                    c = factors.get(e, 1.0)
                    if c != 1.0:
                        out += [(p, p.detach().clone(), c) for p in (layer.lora_A[key], layer.lora_B[key])]
        return out

    @staticmethod
    @torch.no_grad()
    def scale_steps(before: list[tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """p = p0 + c (p - p0): the step (AdamW's, weight decay included) of an lr scaled by c; the optimizer's
        moments are those of the unscaled gradients."""
        for p, p0, c in before:
            p.sub_(p0).mul_(c).add_(p0)

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
        return n * sum(self.routing.spec.experts_per_scale) if self.per_expert else n

    @property
    def routing(self) -> Any:
        """The routing of the first denoiser with experts (every denoiser has the same number of scales)."""
        return get_routing(expert_modules(self.c)[self.trained_parts[0]])

    # --- draws -----------------------------------------------------------------------------------------
    def draws(self, step: int) -> tuple[dict[str, torch.Tensor], int]:
        """Per-sample timesteps, expert scales and loss weights of the global batch of one step, and a seed
        for the rest (noise, dropout): the same on every process."""
        cfg, c = self.cfg, self.c
        g = step_generator(cfg.train.seed, step)
        spec = self.routing.spec
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
            t = self.draw_t(g)
            scales = torch.arange(self.batch) % m  # sample b fosters scale b % m
        part = self.part_of(t)  # (B,): the denoiser of each sample
        if cfg.train.method == "assemble":
            # one mixture per denoiser: the plain mean of its samples, also when the experts train on (joint
            # assembling), since the routers are shared by every t; each expert is still clipped on its own
            ids = part
        else:  # each expert's own mean loss (see tsm.expert_loss_weights)
            ids = self.expert_ids(t, scales)
            if step < self.warm_steps:  # warm start: every sample trains expert WARM, one LoRA
                ids = torch.full_like(ids, WARM)
        valid = ids >= 0  # a denoiser without experts (train.only_transformer): its samples weigh 0
        counts = torch.bincount(ids[valid], minlength=max(int(ids.max()) + 1, 1)).float()
        weights = torch.where(valid, 1.0 / counts[ids.clamp(min=0)], 0.0)
        part_n = torch.bincount(part)[part].float()  # (B,): samples of each sample's denoiser
        seed = int(torch.randint(0, 2**62, (1,), generator=g))
        return {"t": t, "scales": scales, "weights": weights, "part": part, "part_n": part_n}, seed

    def part_of(self, t: torch.Tensor) -> torch.Tensor:
        """The index (in ``self.parts``) of the denoiser that takes each sample: (B,) long."""
        part = torch.zeros(t.shape, dtype=torch.long)
        for k, rows in enumerate(self.c.family.denoiser_parts(self.c, t).values()):
            part[rows] = k
        return part

    def expert_ids(self, t: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """The loss group of each sample: the global id of the expert it trains (its scale's interval, offset
        by the scale); with smooth routing one group for the finest scale (`Routing.loss_ids`). Two denoisers:
        the second's ids follow the first's, so each transformer's experts are means of its own samples; a
        denoiser without experts (``train.only_transformer``) gives its samples id -1."""
        ids = torch.full(t.shape, -1, dtype=torch.long)
        offset, modules = 0, expert_modules(self.c)
        for name, rows in self.c.family.denoiser_parts(self.c, t).items():
            if name in modules and bool(rows.any()):
                routing = get_routing(modules[name])
                ids[rows] = routing.loss_ids(t[rows], scales[rows]) + offset
            if name in modules:
                offset += sum(get_routing(modules[name]).spec.experts_per_scale)
        return ids

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
        groups = self.loss_groups()
        sums = torch.zeros(2, len(groups))  # per loss group (finest interval of each denoiser): sum, count
        for k in range(tc.grad_accum):
            lo = k * self.micro + acc.process_index * self.local  # this process's slice of the global batch
            sl = slice(lo, lo + self.local)
            mine = {key: v[sl] for key, v in draws.items()}
            seeds = [seed + b for b in range(lo, lo + self.local)]  # one generator per sample
            batch = next(self.batches)
            if self.only is not None:  # the other transformer's samples are left out (their draws kept)
                keep = mine["weights"] > 0
                if not bool(keep.any()):
                    continue
                batch, mine, seeds = (
                    _rows(batch, keep),
                    {key: v[keep] for key, v in mine.items()},
                    _rows(seeds, keep),
                )
            sync = k == tc.grad_accum - 1
            for m in expert_modules(c).values():  # a shared expert trains on its denoiser's plain mean
                get_routing(m).shared_grad_scale = 1.0 / (mine["part_n"] * mine["weights"])
            with acc.no_sync(self.model) if not sync else nullcontext():
                loss, per_sample = self.micro_step(batch, mine, seeds)
                acc.backward(loss)
            group = self.loss_group(mine["t"], mine["part"])
            sums[0].index_add_(0, group, per_sample.detach().float().cpu())
            sums[1].index_add_(0, group, torch.ones(len(group)))
        sums = acc.reduce(sums.to(acc.device), reduction="sum").cpu() if acc.num_processes > 1 else sums
        # the mean over every sample of the step that trained (train.only_transformer: a step may have none of
        # its side; then nothing trains, as in the joint run, and the loss is reported as 0)
        total = float(sums[0].sum() / sums[1].sum()) if sums[1].sum() else 0.0
        if torch.isfinite(torch.tensor(total)):
            if cfg.optim.max_grad_norm is not None:
                acc.unscale_gradients()  # fp16: clip the true gradients
                for module in expert_modules(c).values():
                    clip_grad_norm_per_expert(module, cfg.optim.max_grad_norm)
            if self.share_scaled:
                factors = share_factors(
                    self.expert_ids(draws["t"], draws["scales"]), draws["scales"], self.routing.spec
                )
                before = self.expert_snapshot(factors)
            self.opt.step()
            if self.share_scaled:
                self.scale_steps(before)
            self.sched.step()
            if self.ema is not None:
                self.ema.step(self.ema_params())
        out = {"loss": total, "lr": self.sched.get_last_lr()[0]}
        by_part: dict[str, list[float]] = {}
        for name, (s, n) in zip(groups, sums.T.tolist(), strict=True):
            if n:
                out[name] = s / n  # which expert is under-trained
            part = name.rsplit("_interval_", 1)[0]
            if part != "loss/interval" and part not in groups:
                by_part.setdefault(part, [0.0, 0.0])
                by_part[part][0] += s
                by_part[part][1] += n
        for part, (s, n) in by_part.items():  # each transformer's own mean loss
            if n:
                out[part] = s / n
        return out

    def loss_groups(self) -> list[str]:
        """The logged loss curves, one per finest interval: ``loss/interval_i``; two denoisers
        ``loss/high_noise`` (one interval) or ``loss/high_noise_interval_i``, and likewise for low_noise."""
        modules, names = expert_modules(self.c), []
        for name in self.parts:
            routing = get_routing(modules[name]) if name in modules else None
            n = routing.spec.experts_per_scale[0] if routing is not None else 1
            if len(self.parts) == 1:
                names += [f"loss/interval_{i}" for i in range(n)]
            else:
                label = f"loss/{self.c.family.part_labels.get(name, name)}"
                names += [label] if n == 1 else [f"{label}_interval_{i}" for i in range(n)]
        return names

    def loss_group(self, t: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """The index in `loss_groups` of each sample: its denoiser's finest interval of its t. (B,) long."""
        modules, group, offset = expert_modules(self.c), torch.zeros(t.shape, dtype=torch.long), 0
        for k, name in enumerate(self.parts):
            rows = part == k
            if name not in modules:
                group[rows] = offset
                offset += 1
                continue
            spec = get_routing(modules[name]).spec
            if bool(rows.any()):
                group[rows] = expert_index(t[rows], spec.scales[0], spec.num_timesteps) + offset
            offset += spec.experts_per_scale[0]
        return group

    def micro_step(self, batch: dict, draws: dict, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward one micro-batch. Returns its share of the global loss (the per-expert weighted sum times
        the number of processes, since DDP averages gradients) and its per-sample losses (to log)."""
        c, acc = self.c, self.acc
        gens = [torch.Generator().manual_seed(s) for s in seeds]  # a sample's noise ignores its batch
        with torch.no_grad():
            latents = encode_latents(c, batch, self.cache, gens).to(acc.device)
        t = draws["t"].to(acc.device)
        for name, module in expert_modules(c).items():
            get_routing(module).foster_scales = draws["scales"].to(acc.device)  # Wan 2.2: cut per transformer
            if name in c.text_encoders:  # text encoders follow the sample's t
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
def share_factors(ids: torch.Tensor, scales: torch.Tensor, spec: Any) -> dict[int, float]:
    """``train.share_scaled_lr``: the factor on each expert's step, by global expert id.

    An expert's loss is its own mean (`tsm.expert_loss_weights`), so its gradient does not grow with its
    samples, and Adam's step would not follow a rescaled gradient anyway: the step itself is scaled. Expert e
    of scale s gets c_e = n_e / (N_s / K_s): its samples over its even share of the N_s samples that fostered
    scale s this step, K_s the experts of that scale (one scale: K x its share of the batch). Over a uniform t
    the factors average 1; an expert that drew no sample has no gradient and does not move."""
    counts = torch.bincount(ids, minlength=sum(spec.experts_per_scale)).double()  # (K,)
    offsets = [sum(spec.experts_per_scale[:s]) for s in range(len(spec.scales))]
    factors = {}
    for s, k in enumerate(spec.experts_per_scale):
        n_s = int((scales == s).sum())
        for i in range(k):
            e = offsets[s] + i
            if counts[e] > 0:
                factors[e] = float(counts[e] * k / n_s)
    return factors


def _rows(items: Any, keep: torch.Tensor) -> Any:
    """The rows ``keep`` (B,) bool of a loader batch (a dict of tensors and lists) or of a list."""
    if isinstance(items, dict):
        return {k: _rows(v, keep) for k, v in items.items()}
    if isinstance(items, torch.Tensor) and items.dim() > 0 and items.shape[0] == keep.numel():
        return items[keep.to(items.device)]
    if isinstance(items, list | tuple) and len(items) == keep.numel():
        return [v for v, k in zip(items, keep.tolist(), strict=True) if k]
    return items


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
    modules = expert_modules(c)
    denoisers = [n for n in modules if n not in c.text_encoders]
    if not source.is_dir() and len(denoisers) > 1:
        raise TsmError(
            f"train.experts_from={source} is one file; {', '.join(denoisers)} each have experts: pass the "
            "fostered run's folder"
        )
    for name, module in modules.items():
        if not source.is_dir() and name != c.family.denoiser_subfolder:
            continue  # a single file holds the denoiser's experts only
        file = source / f"{name}.safetensors" if source.is_dir() else source
        io.load(module, file, experts_only=True, component=name)
        set_stage(module, "assemble")


def import_warm_start(c: Any, source: Path) -> list[str]:
    """Start every expert of a lora/foster run from an existing LoRA (`tsm.io.import_lora`): one file for one
    denoiser, or for Wan 2.2 a folder (or either file) of the pair ``*_high_noise.safetensors`` /
    ``*_low_noise.safetensors`` (ai-toolkit's names; ai-toolkit's, musubi-tuner's and ComfyUI's Wan keys are
    converted), each into its own transformer. Returns one line per file, to print."""
    modules = expert_modules(c)
    labels = {p: label for p, label in c.family.part_labels.items() if p in modules}
    if not labels:
        if not source.is_file():
            raise TsmError(f"train.experts_from={source} must be a LoRA .safetensors file for this model")
        name = c.family.denoiser_subfolder
        got = io.import_lora(modules[name], source)
        return [f"experts start from {source.name}: {len(got['loaded'])} layers"]
    folder = source if source.is_dir() else source.parent
    lines = []
    for part, label in labels.items():
        found = sorted(folder.glob(f"*_{label}.safetensors"))
        if source.is_file() and source not in found:
            found = [f for f in found if f.name.removesuffix(f"_{label}.safetensors") == _stem(source)]
        if len(found) != 1:
            raise TsmError(
                f"train.experts_from={source}: found {len(found)} *_{label}.safetensors file(s) for {part} in "
                f"{folder}; put exactly one {label} LoRA there (ai-toolkit's <name>_high_noise / _low_noise)"
            )
        got = io.import_lora(modules[part], found[0], prefix="transformer", component=part)
        lines.append(f"{part} ({label}) experts start from {found[0].name}: {len(got['loaded'])} layers")
    return lines


def _stem(path: Path) -> str:
    """``name`` of ``name_high_noise.safetensors`` / ``name_low_noise.safetensors``."""
    return path.name.removesuffix(".safetensors").removesuffix("_high_noise").removesuffix("_low_noise")


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
        text = name in c.text_encoders
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
