"""What every training method shares: the `Recipe` interface, its registry, and the draws and helpers the
methods have in common. The loop that drives a recipe is `tsm.recipes.run`.

A method is one file in ``tsm/recipes/`` with one class decorated ``@register("name", ...)``; recipes never
import each other. Every random draw of step ``i`` comes from `step_generator` (seed, i) over the *global*
batch and each process takes its slice, so a resumed or multi-process run takes the same steps as one
uninterrupted process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tsm.errors import TsmError
from tsm.inject import ATTR
from tsm.models import Components

if TYPE_CHECKING:
    from tsm.config import Config

RECIPES: dict[str, type[Recipe]] = {}


def register(*methods: str) -> Any:
    """Class decorator: ``train.method: <name>`` runs this recipe (one class may serve several methods)."""

    def wrap(cls: type[Recipe]) -> type[Recipe]:
        for method in methods:
            if method in RECIPES and RECIPES[method] is not cls:
                raise TypeError(f"two recipes claim train.method={method!r}")
            RECIPES[method] = cls
        return cls

    return wrap


class Recipe:
    """One training method, driven step by step by `tsm.recipes.run.train`.

    The loop owns the run directory, checkpoints, resume, the NaN guard, logging, grids and the summary; a
    recipe owns its optimizers and its update. ``step`` returns floats (``loss`` is the one checked for NaN
    and plotted; ``loss/<name>`` entries are logged as curves too), already reduced over processes.
    """

    tunes_text = True  # whether text encoders may get experts (checked in tsm.config.validate otherwise)

    def __init__(self, cfg: Config, c: Components, dataset: Any, cache: Any, acc: Any) -> None:
        self.cfg, self.c, self.dataset, self.cache, self.acc = cfg, c, dataset, cache, acc

    # --- what the loop asks of a method ---------------------------------------------------------------
    @classmethod
    def expert_scales(cls, cfg: Config, c: Components) -> tuple:
        """The denoiser's ExpertSpec scales for this method (default: ``experts.scales``)."""
        return tuple(tuple(s) if isinstance(s, list) else s for s in cfg.experts.scales)

    def total_steps(self) -> int:
        return self.cfg.train.steps

    def modules(self) -> dict[str, nn.Module]:
        """The modules whose experts are checkpointed, by file name (the denoiser's subfolder first)."""
        return expert_modules(self.c)

    def begin(self, step: int) -> None:
        """Put the recipe in the stage of ``step`` (called before every step, and once on resume)."""

    def step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def finish(self) -> None:
        """Called once after the last step, before the final adapters are saved."""

    def state_dict(self) -> dict[str, Any]:
        """Optimizers, schedules and any other state beyond the modules' experts."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    @classmethod
    def sample(
        cls,
        cfg: Config,
        c: Components,
        prompts: Sequence[str],
        seeds: Sequence[int],
        steps: int,
        guidance_scale: float,
        resolution: int,
        progress: bool = True,
        desc: str = "sampling",
    ) -> torch.Tensor:
        """Sample a trained run the way this method samples (default: the scheduler with ``steps`` steps);
        ``progress``: a bar over the steps on stderr, labelled ``desc (N images, S steps)``."""
        from tsm.sampling import sample

        return sample(
            c, prompts, seeds, steps, guidance_scale, resolution=resolution, num_frames=cfg.data.num_frames,
            progress=progress, desc=desc,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------------------
def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of every random draw of one step (the same on every process and on resume)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def weight_dtype(cfg: Config) -> torch.dtype:
    """The frozen base weights' dtype (adapters stay float32)."""
    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.mixed_precision]


def autocast(c: Components, dtype: torch.dtype | None) -> Any:
    """Mixed precision on the denoiser's device (``dtype`` None or float32: off)."""
    where = c.device
    return torch.autocast(where.type, dtype=dtype, enabled=dtype not in (None, torch.float32))


def expert_modules(c: Components) -> dict[str, nn.Module]:
    """The denoiser and text encoders that carry experts, by subfolder name."""
    return {k: m for k, m in c.modules().items() if getattr(m, ATTR, None) is not None}


class SingleProcess:
    """What the recipes use of an `accelerate.Accelerator`, for one process without one (the Python API)."""

    num_processes, process_index, is_main_process = 1, 0, True

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    def prepare(self, module: Any) -> Any:
        return module

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor


def prepare_for_stage(acc: Any, module: nn.Module, previous: nn.Module | None = None) -> nn.Module:
    """``acc.prepare(module)`` (DDP with several processes) for the stage that starts now. DDP registers the
    parameters that train when it wraps, so a stage switch (experts -> routers) wraps again; the previous
    wrapper is released first, or its gradient hooks would keep firing."""
    if previous is not None and previous is not module:
        models = getattr(acc, "_models", [])
        if previous in models:
            models.remove(previous)
        del previous
        import gc

        gc.collect()  # the old DDP reducer (and its hooks) goes now, not at some later collection
    return acc.prepare(module)


def all_reduce_grads(acc: Any, params: list[nn.Parameter]) -> None:
    """Sum gradients over processes, for updates DDP cannot wrap (distillation: one module runs several
    forwards per backward, and the GAN loss reaches the generator through the fake score). A parameter
    keeps ``grad None`` only if no process gave it a gradient (an expert no sample was routed to)."""
    if acc.num_processes == 1:
        return
    has = acc.reduce(torch.tensor([float(p.grad is not None) for p in params], device=acc.device), "sum")
    live = [p for p, h in zip(params, has.tolist(), strict=True) if h]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = acc.reduce(torch.cat([p.grad.reshape(-1) for p in live]), "sum")
    offset = 0
    for p in live:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def local_slice(acc: Any, batch: int) -> slice:
    """This process's contiguous share of a global batch."""
    world = acc.num_processes
    if batch % world:
        raise TsmError(f"train.batch_size={batch} must be divisible by the {world} processes")
    per = batch // world
    return slice(acc.process_index * per, (acc.process_index + 1) * per)


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


class DiffusionLoss(nn.Module):
    """The denoiser and the text encoders with experts as one module whose forward is a micro-batch's
    per-sample diffusion loss (B,): what `accelerator.prepare` wraps, so that DDP sees every adapter of
    both (and one forward call spans them, as DDP needs to find the unused experts)."""

    def __init__(self, c: Components, cache: Any = None) -> None:
        super().__init__()
        self.c, self.cache = c, cache
        self.denoiser = c.denoiser  # registered: DDP finds the adapters through these attributes
        # the text encoders with experts, and any other denoiser with experts (Wan 2.2's transformer_2)
        self.text_encoders = nn.ModuleDict(
            {k: m for k, m in expert_modules(c).items() if k in c.text_encoders}
        )
        self.other_denoisers = nn.ModuleDict(
            {k: m for k, m in expert_modules(c).items() if k not in c.text_encoders and m is not c.denoiser}
        )

    def forward(
        self,
        x0: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        captions: list[str],
        original_sizes: Any = None,
        crop_top_lefts: Any = None,
    ) -> torch.Tensor:
        """``original_sizes`` [(h, w)] and ``crop_top_lefts`` [(top, left)]: the batch's, for families that
        condition on them (SDXL); None: the target size and (0, 0)."""
        c = self.c
        # per image, not per caption: added after the text cache
        cond = c.family.size_conditioning(c, self.encode(captions), x0, original_sizes, crop_top_lefts)
        noisy = c.objective.noisy(x0, noise, t)
        pred = c.family.denoise(c, noisy.to(c.dtype), t, cond)
        return c.objective.loss(pred, x0, noise, t)  # (B,)

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The conditioning of the captions. Frozen text encoders (no experts) give each caption one
        embedding for the whole run, so it is cached on disk with the latents (``data.cache``) and the
        encoders run only for captions not seen before (T5-XXL's forward is not small)."""
        from tsm.data import text_cache_tag

        c = self.c
        if self.cache is None or len(self.text_encoders):
            return c.family.encode_prompt(c, captions)
        model_id = f"{c.model_id}:{c.family.name}:{c.dtype}"
        keys = [text_cache_tag(caption, None, model_id) for caption in captions]
        found = {k: self.cache.get(k, "text") for k in dict.fromkeys(keys)}  # each caption once
        missing = [k for k, e in found.items() if e is None]
        if missing:
            first = {k: captions[keys.index(k)] for k in missing}
            with torch.no_grad():
                cond = c.family.encode_prompt(c, list(first.values()))
            for row, k in enumerate(missing):
                # clone: a row view would keep (and write) the whole batch's storage
                found[k] = self.cache.put(k, "text", {n: v[row].cpu().clone() for n, v in cond.items()})
        entries = [found[k] for k in keys]
        device = c.device
        return {k: torch.stack([e[k] for e in entries]).to(device) for k in entries[0]}
