"""The loop of the step-by-step recipes (`method: distill`, `method: glance`): progress bar, logs, atomic
checkpoints, `--resume`, the loss plot, the final adapters and a sample grid.

A recipe owns its model and optimizers and takes one step at a time; every random draw of step ``i``
comes from a generator seeded by (seed, i), so a resumed run takes the same steps as an uninterrupted one.
Steps ``0 .. train.steps - 1`` foster the experts; with a context expert, ``train.assemble_steps`` more
steps train only the routers (`Recipe.begin` switches the stage, also when a run resumes there).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from tsm import io
from tsm.config import Config, save_config
from tsm.errors import TsmError

RECIPE_STATE = "recipe.pt"


class Recipe(Protocol):
    def modules(self) -> dict[str, nn.Module]:
        """The modules whose experts are saved, by file name (the denoiser's subfolder first)."""

    def begin(self, step: int) -> None:
        """Put the recipe in the stage of ``step`` (called before every step)."""

    def step(self, step: int) -> dict[str, float]:
        """One update; returns its losses (``loss`` is the one plotted)."""

    def state_dict(self) -> dict[str, Any]:
        """Optimizers and any other state beyond the modules' experts."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def device() -> torch.device:
    """Where the recipes run: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def weight_dtype(cfg: Config) -> torch.dtype:
    """The frozen base weights' dtype and the forward passes' autocast dtype (adapters stay float32; fp16 is
    refused by tsm.config.validate)."""
    return torch.bfloat16 if cfg.train.mixed_precision == "bf16" else torch.float32


def autocast(c: Any, dtype: torch.dtype | None) -> Any:
    """Mixed precision on the denoiser's device (``dtype`` None or float32: off)."""
    where = next(c.denoiser.parameters()).device
    return torch.autocast(where.type, dtype=dtype, enabled=dtype not in (None, torch.float32))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of every random draw of one step."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def setup(cfg: Config) -> tuple[Any, Any, Any]:
    """The dataset, the model (experts added, on the device, in the run's dtype) and the latent cache."""
    from tsm.data import LatentCache, load_dataset
    from tsm.families import get_family
    from tsm.recipes.train import build

    dataset = load_dataset(cfg.data, video=get_family(cfg.model.family).video)
    c = build(cfg, device(), weight_dtype(cfg))
    cache_dir = Path(cfg.data.cache_dir or Path(cfg.train.output_dir) / "cache")
    cache = LatentCache(cache_dir, c.model_id) if cfg.data.cache else None
    return dataset, c, cache


def _save(recipe: Recipe, directory: Path) -> None:
    for name, module in recipe.modules().items():
        io.save(module, directory / f"{name}.safetensors")
    torch.save(recipe.state_dict(), directory / RECIPE_STATE)


def _load(recipe: Recipe, ckpt: Path) -> None:
    for name, module in recipe.modules().items():
        io.load(module, ckpt / f"{name}.safetensors")
    recipe.load_state_dict(torch.load(ckpt / RECIPE_STATE, weights_only=True))  # never unpickle


def run_recipe(cfg: Config, c: Any, recipe: Recipe, resume: bool) -> dict[str, Any]:
    """Run ``train.steps + train.assemble_steps`` steps of ``recipe`` (on model ``c``) into
    ``train.output_dir``; returns the summary."""
    from tsm.recipes.train import STATE, latest_checkpoint, plot_loss, validation_grid, write_checkpoint

    tc = cfg.train
    total = tc.steps + tc.assemble_steps
    grid: Callable[[Path], Path] = lambda path: validation_grid(cfg, c, path)  # noqa: E731
    run = Path(tc.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    start, history = 0, []
    if resume:
        ckpt = latest_checkpoint(run)
        if ckpt is not None:
            state = json.loads((ckpt / STATE).read_text())
            start, history = state["step"], [tuple(h) for h in state["history"]]
            recipe.begin(start - 1)  # the stage (and optimizer) the checkpoint was written in, then load it
            _load(recipe, ckpt)
            print(f"resumed from {ckpt} at step {start}")
        else:
            print(f"no checkpoint in {run / 'checkpoints'}; starting from step 0")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run / "logs"))
    bar = tqdm(range(start, total), initial=start, total=total, desc=tc.method)
    t0, last_good = time.perf_counter(), latest_checkpoint(run)
    for step in bar:
        recipe.begin(step)
        losses = recipe.step(step)
        loss = losses["loss"]
        if not math.isfinite(loss):
            keep = (
                f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
            )
            raise TsmError(
                f"loss became {loss} at step {step + 1}; stopped, {keep} (resume with --resume after lowering optim.lr)"
            )
        history.append((step + 1, loss))
        bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items() if isinstance(v, float)})
        if (step + 1) % tc.log_every == 0:
            for k, v in losses.items():
                writer.add_scalar(f"train/{k}", v, step + 1)
        if tc.validate_every and (step + 1) % tc.validate_every == 0 and step + 1 < total:
            grid(run / "samples" / f"step_{step + 1:07d}.png")
        if (step + 1) % tc.checkpoint_every == 0 or step + 1 == total:
            last_good = write_checkpoint(
                run, step + 1, lambda d: _save(recipe, d), {"history": history}, tc.keep_last
            )
            plot_loss(history, run / "loss.png")
    bar.close()
    seconds = time.perf_counter() - t0
    writer.close()
    den = next(iter(recipe.modules()))
    io.save(recipe.modules()[den], run / f"{den}.safetensors")  # what `tsm sample` / `tsm export` read
    summary: dict[str, Any] = {
        "steps": total,
        "start": start,
        "seconds": seconds,
        "it_per_s": (total - start) / seconds if seconds > 0 else math.nan,
        "final_loss": history[-1][1] if history else math.nan,
    }
    if history:
        plot_loss(history, run / "loss.png")
    summary["grid"] = str(grid(run / "samples" / "final.png"))
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
