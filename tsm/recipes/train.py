"""One training loop for the three methods: plain LoRA (n=1), fostering, assembling.

    tsm train configs/sd15_foster.yaml [section.key=value ...] [--resume]

Every random draw of a step (its samples, timesteps, expert scales, noise, caption dropout) comes from a
generator seeded by (seed, step) over the *global* batch, and each process takes its slice. So a run
resumed from a checkpoint, or split over several processes, takes the same steps as one uninterrupted
process. Gradients of the adapters are summed over processes by one all-reduce (they are small); the loss
is each expert's own mean over the global batch (`tsm.expert_loss_weights`' rule), so fostering all
experts together equals fostering them one by one.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tsm import io
from tsm.config import Config, save_config
from tsm.errors import TsmError
from tsm.families import Components, get_family
from tsm.grads import clip_grad_norm_per_expert
from tsm.inject import ATTR, adapter_params, add_experts, get_routing, set_stage, set_timesteps
from tsm.intervals import expert_index
from tsm.spec import ExpertSpec

CHECKPOINTS = "checkpoints"
STATE = "state.json"
FEW_STEP = ("distill", "glance")  # recipes with their own step (tsm.recipes.loop)


# ---------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------
def expert_specs(cfg: Config, c: Components) -> dict[str, ExpertSpec]:
    """The ExpertSpec of every module that gets experts (denoiser; text encoders if text_targets)."""
    family = c.family
    e = cfg.experts
    if cfg.train.method == "lora":
        scales: tuple = (1,)
    elif cfg.train.method == "glance":  # the slow/fast cut sits on the model's own reference schedule
        from tsm.recipes.glance import glance_timesteps_for

        cut = glance_timesteps_for(cfg, c)["cut"]
        scales = ([cut], 1) if cfg.glance.router else ([cut],)
    else:
        scales = tuple(tuple(s) if isinstance(s, list) else s for s in e.scales)
    base = ExpertSpec(
        scales=scales,
        rank=e.rank,
        alpha=e.alpha,
        dropout=e.dropout,
        targets=e.targets or family.default_targets,
        router=e.router,
        num_timesteps=c.objective.num_timesteps,
        timestep_scale=family.timestep_scale,
    )
    specs = {family.denoiser_subfolder: base}
    if cfg.train.method in FEW_STEP:  # the denoiser only (checked in tsm.config.validate)
        return specs
    text_targets = family.default_text_targets if e.text_targets is None else e.text_targets
    if text_targets:
        for sub in family.text_expert_subfolders:
            specs[sub] = replace(base, targets=list(text_targets))
    return specs


def build(cfg: Config, device: torch.device, weight_dtype: torch.dtype) -> Components:
    """Load the model with from_pretrained, cast the frozen base, add experts (float32), set the stage."""
    c = get_family(cfg.model.family).load(cfg.model.path, cfg.model.revision, cfg.model.prediction_type)
    c.to(device, weight_dtype)  # the VAE stays float32: it runs once per image (or is cached)
    modules = c.modules()
    torch.manual_seed(cfg.train.seed)  # expert A init: the same in every process and on resume
    for name, spec in expert_specs(cfg, c).items():
        add_experts(modules[name], spec)
    if cfg.train.method == "assemble":
        source = Path(cfg.train.experts_from)
        for name in expert_specs(cfg, c):
            path = source / f"{name}.safetensors" if source.is_dir() else source
            if not source.is_dir() and name != c.family.denoiser_subfolder:
                continue  # a single file holds the denoiser's experts only
            io.load(modules[name], path, experts_only=True)
        for name in expert_specs(cfg, c):
            set_stage(modules[name], "assemble")
    if cfg.train.gradient_checkpointing:
        c.denoiser.enable_gradient_checkpointing()
        for name in expert_specs(cfg, c):
            if name != c.family.denoiser_subfolder:
                modules[name].gradient_checkpointing_enable()
    return c


def expert_modules(c: Components) -> dict[str, torch.nn.Module]:
    return {k: m for k, m in c.modules().items() if getattr(m, ATTR, None) is not None}


def sample_run(
    cfg: Config,
    c: Components,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance_scale: float,
    resolution: int,
    progress: bool = True,
) -> torch.Tensor:
    """Sample a trained run the way its method samples: the scheduler with ``steps`` steps, or the distilled
    generator's timesteps (re-noised, no guidance), or Glance's 10 uneven steps."""
    from tsm.sampling import sample, sample_timesteps_list

    common = dict(resolution=resolution, num_frames=cfg.data.num_frames)
    if cfg.train.method == "distill":
        return sample_timesteps_list(c, prompts, seeds, cfg.distill.timesteps, None, renoise=True, **common)
    if cfg.train.method == "glance":
        from tsm.recipes.glance import glance_timesteps_for

        ts = glance_timesteps_for(cfg, c)
        listed = ts["slow"] + ts["fast"]
        return sample_timesteps_list(
            c, prompts, seeds, listed, ts["final"], guidance_scale=guidance_scale, **common
        )
    return sample(c, prompts, seeds, steps, guidance_scale, progress=progress, **common)


# ---------------------------------------------------------------------------------------------------------
# deterministic draws
# ---------------------------------------------------------------------------------------------------------
class Stream:
    """Sample indices for every (step, micro-step): epochs of seeded permutations, read in order."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self.perms: dict[int, torch.Tensor] = {}

    def take(self, start: int, count: int) -> torch.Tensor:
        out = []
        for p in range(start, start + count):
            epoch = p // self.n
            if epoch not in self.perms:
                self.perms = {
                    epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
                }
            out.append(self.perms[epoch][p % self.n])
        return torch.stack(out)


def step_draws(cfg: Config, c: Components, step: int) -> tuple[dict[str, torch.Tensor], int]:
    """Per-sample timesteps, expert scales, loss weights and caption drops of the global batch of one step,
    and a seed for the rest (noise, dropout): the same on every process."""
    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
    batch = cfg.train.batch_size
    spec = get_routing(c.denoiser).spec
    m = len(spec.scales)
    only = cfg.train.only_expert
    if cfg.train.method == "foster" and only is not None:
        scale, index = only
        if not 0 <= scale < m or not 0 <= index < spec.experts_per_scale[scale]:
            raise TsmError(f"train.only_expert={only} is not an expert of scales {list(spec.scales)}")
        t = c.objective.sample_t(batch, g, expert=(spec.scales[scale], index))
        scales = torch.full((batch,), scale)
    else:
        t = c.objective.sample_t(batch, g)
        scales = torch.arange(batch) % m  # sample b fosters scale b % m
    if cfg.train.method == "assemble":
        weights = torch.full((batch,), 1.0 / batch)  # one mixture: the plain mean
    else:  # each expert's own mean loss (see tsm.expert_loss_weights)
        offsets = torch.tensor(get_routing(c.denoiser).offsets)  # global id of each scale's first expert
        ids = torch.stack([expert_index(t, s, spec.num_timesteps) for s in spec.scales]).gather(
            0, scales[None]
        )[0]
        ids = ids + offsets[scales]
        weights = 1.0 / torch.bincount(ids)[ids].float()
    drop = torch.rand(batch, generator=g) < cfg.data.caption_dropout
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    return {"t": t, "scales": scales, "weights": weights, "drop": drop}, seed


# ---------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------
def save_adapters(c: Components, directory: Path) -> None:
    for name, module in expert_modules(c).items():
        io.save(module, directory / f"{name}.safetensors")


def write_checkpoint(run: Path, step: int, save: Callable[[Path], None], state: dict, keep: int) -> Path:
    """checkpoints/step_N/ written as step_N.tmp/ then renamed: a killed run never leaves half a checkpoint.

    ``save(folder)`` writes the adapters and optimizer state; ``state`` (JSON) records the step and history.
    """
    root = run / CHECKPOINTS
    final, tmp = root / f"step_{step:07d}", root / f"step_{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save(tmp)
    (tmp / STATE).write_text(json.dumps({**state, "step": step}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_training_state(c: Components, opt: torch.optim.Optimizer, directory: Path) -> None:
    save_adapters(c, directory)
    torch.save(opt.state_dict(), directory / "optimizer.pt")


def latest_checkpoint(run: Path) -> Path | None:
    done = sorted(
        p for p in (run / CHECKPOINTS).glob("step_*") if (p / STATE).is_file() and p.suffix != ".tmp"
    )
    return done[-1] if done else None


def load_checkpoint(ckpt: Path, c: Components, opt: torch.optim.Optimizer) -> dict:
    for name, module in expert_modules(c).items():
        io.load(module, ckpt / f"{name}.safetensors")
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))  # never unpickle
    return json.loads((ckpt / STATE).read_text())


# ---------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------
def plot_loss(history: list[tuple[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = zip(*history, strict=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.8, alpha=0.4, label="loss")
    k = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
        for i in range(len(losses))
    ]
    ax.plot(steps, smooth, lw=1.5, label=f"mean of last {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def validation_grid(cfg: Config, c: Components, path: Path) -> Path:
    from tsm.images import make_grid, to_pil

    modes = {k: m.training for k, m in c.modules().items()}
    prompts = [p for p in cfg.train.validation_prompts for _ in cfg.train.validation_seeds]
    seeds = [s for _ in cfg.train.validation_prompts for s in cfg.train.validation_seeds]
    images = sample_run(
        cfg,
        c,
        prompts,
        seeds,
        cfg.train.validation_steps,
        cfg.train.guidance_scale,
        cfg.data.resolution,
        progress=False,
    )
    for k, m in c.modules().items():
        m.train(modes[k])
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid([to_pil(x) for x in images], columns=len(cfg.train.validation_seeds)).save(path)
    return path


# ---------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------
def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Run one training job; returns a summary (final loss, steps, it/s, files)."""
    from accelerate import Accelerator

    from tsm.data import LatentCache, load_dataset

    tc = cfg.train
    if tc.method == "distill":
        from tsm.recipes.distill import run

        return run(cfg, resume)
    if tc.method == "glance":
        from tsm.recipes.glance import run

        return run(cfg, resume)
    acc = Accelerator(mixed_precision=tc.mixed_precision, cpu=not torch.cuda.is_available())
    world, rank = acc.num_processes, acc.process_index
    micro = tc.batch_size // tc.grad_accum
    if tc.batch_size % (tc.grad_accum * world):
        raise TsmError(
            f"train.batch_size={tc.batch_size} must be divisible by grad_accum x processes = {tc.grad_accum * world}"
        )
    local = micro // world
    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[tc.mixed_precision]
    run = Path(tc.output_dir)
    if acc.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.yaml")

    dataset = load_dataset(cfg.data, video=get_family(cfg.model.family).video)
    c = build(cfg, acc.device, weight_dtype)
    cache = LatentCache(Path(cfg.data.cache_dir or run / "cache"), c.model_id) if cfg.data.cache else None
    modules = expert_modules(c)
    den_name = c.family.denoiser_subfolder
    groups = []
    for name, module in modules.items():
        params = adapter_params(module)
        if not params:
            continue
        text = name != den_name
        lr = cfg.optim.text_lr if text and cfg.optim.text_lr is not None else cfg.optim.lr
        wd = (
            cfg.optim.text_weight_decay
            if text and cfg.optim.text_weight_decay is not None
            else cfg.optim.weight_decay
        )
        groups.append({"params": params, "lr": lr, "weight_decay": wd})
    all_params = [p for g in groups for p in g["params"]]
    # fused AdamW: one kernel for the many small per-expert tensors (adapters are float32)
    fused = acc.device.type in ("cpu", "cuda")
    opt = acc.prepare(torch.optim.AdamW(groups, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=fused))
    warm = cfg.optim.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)

    start, history = 0, []
    if resume:
        ckpt = latest_checkpoint(run)
        if ckpt is not None:
            state = load_checkpoint(ckpt, c, opt)
            start, history = state["step"], [tuple(h) for h in state["history"]]
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0, last_epoch=start - 1
            )
            acc.print(f"resumed from {ckpt} at step {start}")
        else:
            acc.print(f"no checkpoint in {run / CHECKPOINTS}; starting from step 0")

    writer = None
    if acc.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run / "logs"))
    stream = Stream(len(dataset), tc.seed)
    for m in modules.values():
        m.train()
    bar = tqdm(
        range(start, tc.steps),
        initial=start,
        total=tc.steps,
        desc=f"{tc.method}",
        disable=not acc.is_main_process,
    )
    t0, last_good = time.perf_counter(), latest_checkpoint(run)
    for step in bar:
        draws, seed = step_draws(cfg, c, step)
        torch.manual_seed(seed + rank)  # dropout inside the model: reproducible on resume
        opt.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=acc.device)  # plain mean over the global batch, for the logs
        for k in range(tc.grad_accum):
            lo = k * micro + rank * local  # this process's slice of the global batch
            sl = slice(lo, lo + local)
            idx = stream.take(step * tc.batch_size + lo, local)
            mine = {key: v[sl] for key, v in draws.items()}
            seeds = [seed + b for b in range(lo, lo + local)]  # one generator per sample of the global batch
            loss, plain = micro_step(cfg, c, dataset, cache, idx, mine, seeds, acc)
            acc.backward(loss)
            step_loss += plain / tc.batch_size
        reduce_grads(all_params, acc)
        total = acc.reduce(step_loss, reduction="sum") if world > 1 else step_loss
        if not torch.isfinite(total):
            keep = (
                f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
            )
            raise TsmError(
                f"loss became {float(total)} at step {step + 1}; stopped, {keep} (resume with --resume after lowering optim.lr)"
            )
        if cfg.optim.max_grad_norm is not None:
            acc.unscale_gradients()  # fp16: clip the true gradients
            for module in modules.values():
                clip_grad_norm_per_expert(module, cfg.optim.max_grad_norm)
        opt.step()
        sched.step()
        history.append((step + 1, float(total)))
        bar.set_postfix(loss=f"{float(total):.4f}")
        if writer is not None and (step + 1) % tc.log_every == 0:
            writer.add_scalar("train/loss", float(total), step + 1)
            writer.add_scalar("train/lr", sched.get_last_lr()[0], step + 1)
        if (
            acc.is_main_process
            and tc.validate_every
            and (step + 1) % tc.validate_every == 0
            and step + 1 < tc.steps
        ):
            validation_grid(cfg, c, run / "samples" / f"step_{step + 1:07d}.png")
        if (step + 1) % tc.checkpoint_every == 0 or step + 1 == tc.steps:
            if acc.is_main_process:
                last_good = write_checkpoint(
                    run,
                    step + 1,
                    lambda d: save_training_state(c, opt, d),
                    {"history": history},
                    tc.keep_last,
                )
                plot_loss(history, run / "loss.png")
            acc.wait_for_everyone()
    bar.close()
    seconds = time.perf_counter() - t0
    summary: dict[str, Any] = {"steps": tc.steps, "start": start, "seconds": seconds, "processes": world}
    if world > 1:  # every process must end with the same adapters
        flat = torch.cat([p.detach().reshape(-1) for p in all_params])
        gathered = acc.gather(flat[None])  # (world, N)
        summary["max_rank_difference"] = float((gathered - gathered[0]).abs().max())
    summary["it_per_s"] = (tc.steps - start) / seconds if seconds > 0 else math.nan
    summary["final_loss"] = history[-1][1] if history else math.nan
    if acc.is_main_process:
        save_adapters(c, run)
        if history:
            plot_loss(history, run / "loss.png")
        summary["grid"] = str(validation_grid(cfg, c, run / "samples" / "final.png"))
        (run / "summary.json").write_text(json.dumps(summary, indent=2))
        if writer is not None:
            writer.close()
    acc.wait_for_everyone()
    return summary


def micro_step(
    cfg: Config,
    c: Components,
    dataset: Any,
    cache: Any,
    idx: torch.Tensor,
    draws: dict,
    seeds: list[int],
    acc: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward one micro-batch. Returns its share of the global loss (the per-expert weighted sum, to
    backpropagate) and the plain sum of its per-sample losses (to log)."""
    from tsm.data import collate

    family, device = c.family, acc.device
    batch = collate([dataset[int(i)] for i in idx])
    gens = [torch.Generator().manual_seed(s) for s in seeds]  # a sample's noise does not depend on its batch
    with torch.no_grad():
        latents = encode_latents(c, batch, cache, gens).to(device)
    t = draws["t"].to(device)
    captions = ["" if d else cap for d, cap in zip(draws["drop"].tolist(), batch["captions"], strict=True)]
    for module in expert_modules(c).values():
        get_routing(module).foster_scales = draws["scales"].to(device)
    for name, module in expert_modules(c).items():
        if name != family.denoiser_subfolder:  # text encoders follow the sample's t
            set_timesteps(module, t)
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(device)
    with acc.autocast():
        cond = family.encode_prompt(c, captions)
        noisy = c.objective.noisy(latents, noise, t)
        pred = family.denoise(c, noisy.to(c.denoiser.dtype), t, cond)
        per_sample = c.objective.loss(pred, latents, noise, t)
    return (draws["weights"].to(device) * per_sample).sum(), per_sample.detach().sum()


def encode_latents(
    c: Components, batch: dict, cache: Any, gens: list[torch.Generator] | None
) -> torch.Tensor:
    """Scaled VAE latents, drawn from the posterior whose mean and std are cached per image (``gens=None``:
    the posterior mean)."""
    from tsm.data import cached_latent_dist

    device = getattr(c.vae, "device", "cpu")  # (the digits model has no VAE: an nn.Identity)
    encode = lambda pixels: c.family.latent_dist(c, pixels.to(device))  # noqa: E731
    mean, std = cached_latent_dist(encode, batch["pixels"], batch["keys"], cache)
    if gens is None:
        return c.family.scale_latents(c, mean)
    z = mean + std * torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens])
    return c.family.scale_latents(c, z)


def reduce_grads(params: list[torch.nn.Parameter], acc: Any) -> None:
    """Sum adapter gradients over processes. An expert keeps grad None only if no process routed a sample to it."""
    if acc.num_processes == 1:
        return
    import torch.distributed as dist

    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=acc.device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist(), strict=True) if h]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in live])
    dist.all_reduce(flat)
    offset = 0
    for p in live:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


# ---------------------------------------------------------------------------------------------------------
# reading a run back
# ---------------------------------------------------------------------------------------------------------
def load_run(path: str | Path, device: str | torch.device = "cpu") -> tuple[Config, Components]:
    """The model of a run directory (or of one of its checkpoints), experts loaded, in the stage it trained."""
    from tsm.config import load_config

    path = Path(path)
    run = path.parent.parent if path.parent.name == CHECKPOINTS else path
    if not (run / "config.yaml").is_file():
        raise TsmError(f"{path} is not a tsm run directory (no config.yaml); pass the run's output_dir")
    cfg = load_config(run / "config.yaml")
    c = get_family(cfg.model.family).load(cfg.model.path, cfg.model.revision, cfg.model.prediction_type)
    c.to(device)
    modules = c.modules()
    for name, spec in expert_specs(cfg, c).items():
        add_experts(modules[name], spec)
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise TsmError(f"{file} is missing: the run has not finished; pass one of its checkpoints/step_N")
        stage = io.load(modules[name], file).get("tsm_stage", "foster")
        set_stage(modules[name], stage)
    return cfg, c
