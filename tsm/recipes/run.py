"""The one run loop: every method (`tsm.recipes.base.RECIPES`) trains through `train`.

    tsm train CONFIG [section.key=value ...] [--resume]
    torchrun --nproc_per_node N -m tsm.cli train CONFIG        (or: accelerate launch -m tsm.cli train CONFIG)

The loop owns what every method needs: the run directory and its config, atomic checkpoints
(``checkpoints/step_N/``, the last ``keep_last`` kept), ``--resume`` (bit-identical to a run that never
stopped), the NaN guard (names the step and the last good checkpoint), trackers (``Accelerator(log_with=)``),
the loss plot, validation grids, the final adapters and ``summary.json``. The recipe owns its update.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import math
import pkgutil
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import tsm.recipes
from tsm import io, rundir
from tsm.config import Config, save_config
from tsm.errors import TsmError
from tsm.inject import add_experts, set_stage
from tsm.models import Components, get_family
from tsm.recipes.base import RECIPES, Recipe, expert_modules, weight_dtype
from tsm.spec import ExpertSpec

CHECKPOINTS, STATE = rundir.CHECKPOINTS, rundir.STATE  # the run directory's layout: tsm/rundir.py
RECIPE_STATE = "recipe.pt"


@functools.cache
def _import_recipes() -> None:
    """Import every module of `tsm.recipes` once, so that each ``@register`` has run."""
    for module in pkgutil.iter_modules(tsm.recipes.__path__):
        importlib.import_module(f"tsm.recipes.{module.name}")


def recipe_class(method: str) -> type[Recipe]:
    """The recipe registered for ``train.method``; every module of `tsm.recipes` is imported to find it."""
    _import_recipes()
    if method not in RECIPES:
        raise TsmError(f"unknown train.method {method!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[method]


# ---------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------
def load_components(cfg: Config) -> Components:
    """The config's model, loaded with from_pretrained, its objective built from ``cfg.objective``."""
    from dataclasses import asdict

    family = get_family(cfg.model.family)
    return family.load(cfg.model.path, cfg.model.revision, cfg.model.prediction_type, asdict(cfg.objective))


def expert_specs(cfg: Config, c: Components) -> dict[str, ExpertSpec]:
    """The ExpertSpec of every module that gets experts: the denoiser (Wan 2.2: each transformer over its own
    range, or the one ``train.only_transformer`` names); the text encoders if text_targets."""
    family, e = c.family, cfg.experts
    recipe = recipe_class(cfg.train.method)
    base = ExpertSpec(
        scales=recipe.expert_scales(cfg, c),
        rank=e.rank,
        alpha=e.alpha,
        dropout=e.dropout,
        targets=e.targets or family.default_targets,
        router=e.router,
        shared_rank=e.shared_rank,
        routing=e.routing,
        modulation=e.modulation,
        modulation_bins=e.modulation_bins,
        rank_schedule=e.rank_schedule,
        min_rank=e.min_rank,
        num_timesteps=c.objective.num_timesteps,
        timestep_scale=family.timestep_scale,
    )
    split = getattr(family, "part_specs", None)  # a stand-in family without it has one denoiser
    specs = split(c, base) if split is not None else {family.denoiser_subfolder: base}
    only = cfg.train.only_transformer
    if len(specs) > 1 and cfg.train.method not in ("lora", "foster", "assemble"):
        raise TsmError(
            f"train.method={cfg.train.method} trains one denoiser; this {family.name} model has "
            f"{len(specs)} ({', '.join(specs)}): use lora, foster or assemble"
        )
    if only is not None:
        labels = {family.part_labels.get(n, n): n for n in specs}
        if len(specs) < 2:
            raise TsmError(
                f"train.only_transformer={only} picks one transformer of a Wan 2.2 folder; {cfg.model.path} "
                "has one denoiser: leave it unset"
            )
        specs = {labels[f"{only}_noise"]: specs[labels[f"{only}_noise"]]}
    text_targets = family.default_text_targets if e.text_targets is None else e.text_targets
    if recipe.tunes_text and text_targets:
        for sub in family.text_expert_subfolders:
            specs[sub] = replace(base, targets=list(text_targets))
    return specs


STORAGE_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


def build(cfg: Config, device: torch.device, dtype: torch.dtype) -> Components:
    """Load the model, cast the frozen base, add experts (float32, seeded: the same in every process).

    ``model.storage_dtype``: the denoisers' frozen weights stored in float8, each layer cast to ``dtype`` for
    its forward (diffusers' ``enable_layerwise_casting``), before the experts wrap their layers: the experts
    stay float32. ``train.offload_inactive``: a Wan 2.2 transformer's base weights are on the device only
    while it runs (`tsm.models.wan.WanComponents`)."""
    c = load_components(cfg)
    denoisers = [m for n, m in c.modules().items() if n not in c.text_encoders]
    if cfg.train.offload_inactive:
        if len(denoisers) < 2:
            raise TsmError(
                "train.offload_inactive keeps one of Wan 2.2's two transformers on the device; this model has "
                "one denoiser: set it to false (model.storage_dtype=float8_e4m3fn saves memory on any family)"
            )
        c.extra["offload"] = device
    c.to(device, dtype)  # the VAE stays float32: it runs once per image (or is cached)
    if cfg.model.storage_dtype is not None:
        if not all(hasattr(m, "enable_layerwise_casting") for m in denoisers):
            raise TsmError(
                f"model.storage_dtype casts diffusers models layer by layer; the {c.family.name} family's "
                "denoiser is not one: leave it unset"
            )
        for m in denoisers:
            m.enable_layerwise_casting(
                storage_dtype=STORAGE_DTYPES[cfg.model.storage_dtype], compute_dtype=dtype
            )
        c.extra["compute_dtype"] = dtype
    modules = c.modules()
    torch.manual_seed(cfg.train.seed)  # expert A init: the same in every process and on resume
    specs = expert_specs(cfg, c)
    parts = list(c.family.denoiser_parts(c, torch.zeros(1)))
    for name, spec in specs.items():
        if name in parts[1:]:  # Wan 2.2's transformer_2: its own seed, the same with or without the other's
            torch.manual_seed(cfg.train.seed + parts.index(name))
        add_experts(modules[name], spec)
    if "offload" in c.extra:
        c.to(device, dtype)  # the new experts of a parked transformer go to the device
    if cfg.train.gradient_checkpointing:
        for name, m in modules.items():
            if name in c.text_encoders:
                if name in specs:
                    m.gradient_checkpointing_enable()
            else:
                m.enable_gradient_checkpointing()
    return c


def load_run(path: str | Path, device: str | torch.device = "cpu") -> tuple[Config, Components]:
    """The model of a run directory (or of one of its checkpoints), experts loaded, in the stage it trained."""
    from tsm.config import load_config

    path = Path(path)
    run = path.parent.parent if path.parent.name == CHECKPOINTS else path
    if not (run / "config.yaml").is_file():
        raise TsmError(f"{path} is not a tsm run directory (no config.yaml); pass the run's output_dir")
    cfg = load_config(run / "config.yaml")
    c = load_components(cfg)
    c.to(device)
    modules = c.modules()
    for name, spec in expert_specs(cfg, c).items():
        add_experts(modules[name], spec)
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise TsmError(f"{file} is missing: the run has not finished; pass one of its checkpoints/step_N")
        stage = io.load(modules[name], file, component=name).get("tsm_stage", "foster")
        set_stage(modules[name], stage)
    return cfg, c


def sample_run(
    cfg: Config,
    c: Components,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance_scale: float,
    resolution: int | tuple[int, int],
    progress: bool = True,
    desc: str = "sampling",
) -> torch.Tensor:
    """Sample a trained run the way its method samples (the recipe's ``sample``); ``progress``: a bar over
    the steps on stderr, labelled ``desc (N images, S steps)``. The prompts are used as given (see
    `tsm.sampling.with_trigger` for the run's ``data.trigger``)."""
    recipe = recipe_class(cfg.train.method)
    return recipe.sample(cfg, c, prompts, seeds, steps, guidance_scale, resolution, progress, desc)


def guidance_of(cfg: Config, c: Components) -> float:
    """``train.guidance_scale``, or the family's default guidance (its pipeline's; digits: validated)."""
    return c.family.default_guidance if cfg.train.guidance_scale is None else cfg.train.guidance_scale


# ---------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------
def write_checkpoint(run: Path, step: int, save: Callable[[Path], None], state: dict, keep: int) -> Path:
    """checkpoints/step_N/ written as step_N.tmp/ then renamed: a killed run never leaves half a checkpoint.

    ``save(folder)`` writes the adapters and optimizer state; ``state`` (JSON) records the step and history.
    """
    root = run / CHECKPOINTS
    final, tmp = root / f"step_{step:07d}", root / f"step_{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # a full disk, a quota, a lost mount: one line naming the last complete checkpoint, and no .tmp left
    with rundir.writing(f"checkpoint {final.name}", run, partial=tmp):
        tmp.mkdir(parents=True)
        save(tmp)
        (tmp / STATE).write_text(json.dumps({**state, "step": step}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run: Path) -> Path | None:
    done = rundir.complete_checkpoints(run)
    return done[-1] if done else None


def _save(recipe: Recipe, directory: Path) -> None:
    for name, module in recipe.modules().items():
        io.save(module, directory / f"{name}.safetensors", component=name)
    buffer = BytesIO()  # serialised first: a failed write is then an OSError, not torch's zip-writer error
    torch.save(recipe.state_dict(), buffer)
    (directory / RECIPE_STATE).write_bytes(buffer.getbuffer())


def _load(recipe: Recipe, ckpt: Path) -> None:
    for name, module in recipe.modules().items():
        file = ckpt / f"{name}.safetensors"
        try:
            io.load(module, file, component=name)
        except TsmError:
            rundir.check_safetensors(file)  # unreadable: "damaged, resume from the one before"
            raise  # readable, but other experts than the model's
    state = rundir.read_checkpoint_file(ckpt / RECIPE_STATE, lambda p: torch.load(p, weights_only=True))
    recipe.load_state_dict(state)  # never unpickle


# ---------------------------------------------------------------------------------------------------------
# plots and grids
# ---------------------------------------------------------------------------------------------------------
def plot_loss(
    history: list[tuple[int, float]], path: Path, curves: dict[str, list[tuple[int, float]]] | None = None
) -> None:
    """The loss and its running mean; with ``curves`` (``loss/<name>`` -> points, e.g. the loss of each
    finest interval), a second panel with one smoothed line each: where an expert is under-trained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values: Sequence[float]) -> list[float]:
        k = max(1, len(values) // 20)
        return [
            sum(values[max(0, i - k + 1) : i + 1]) / len(values[max(0, i - k + 1) : i + 1])
            for i in range(len(values))
        ]

    curves = {k: v for k, v in (curves or {}).items() if v}
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(11 if curves else 6, 3.5), squeeze=False)
    ax = axes[0][0]
    steps, losses = zip(*history, strict=True)
    ax.plot(steps, losses, lw=0.8, alpha=0.4, label="loss")
    ax.plot(steps, smooth(losses), lw=1.5, label=f"mean of last {max(1, len(losses) // 20)}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    if curves:
        ax = axes[0][1]
        for name, points in sorted(curves.items(), key=lambda kv: (len(kv[0]), kv[0])):  # _2 before _10
            x, y = zip(*points, strict=True)
            ax.plot(x, smooth(y), lw=1.2, label=name.removeprefix("loss/"))
        ax.set_xlabel("step")
        ax.set_ylabel("loss (running mean)")
        by_interval = all(k.startswith("loss/interval_") for k in curves)  # else Wan 2.2's per transformer
        title = (
            "by interval of the finest scale (t low -> high)"
            if by_interval
            else "by transformer (and interval)"
        )
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def validation_grid(cfg: Config, c: Components, path: Path, progress: bool = True) -> Path | None:
    """The validation prompts x seeds as one PNG (None when ``train.validation_prompts`` is empty), the
    prompts with ``data.trigger`` in front as the captions had it. ``progress``: a bar on stderr, "validation
    grid (N images, S steps)" with its ETA (the caller draws grids on the main process only)."""
    from tsm.images import make_grid, to_pil
    from tsm.sampling import with_trigger

    tc = cfg.train
    if not tc.validation_prompts or not tc.validation_seeds:
        return None
    modes = {k: m.training for k, m in c.modules().items()}
    prompts = [p for p in with_trigger(tc.validation_prompts, cfg.data.trigger) for _ in tc.validation_seeds]
    seeds = [s for _ in tc.validation_prompts for s in tc.validation_seeds]
    images = sample_run(
        cfg, c, prompts, seeds, tc.validation_steps, guidance_of(cfg, c), cfg.data.resolution,
        progress=progress, desc="validation grid",
    )  # fmt: skip
    for k, m in c.modules().items():
        m.train(modes[k])
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid([to_pil(x) for x in images], columns=len(tc.validation_seeds)).save(path)
    return path


# ---------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------
def make_accelerator(cfg: Config, run: Path) -> Any:
    """Accelerate does the distribution (DDP; an expert unused in the global batch keeps grad None) and
    the tracking."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    # accelerate keeps one global state: a later run in the same process (the benchmark's rows, a notebook)
    # may use another precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    log_with = None if cfg.train.log_with == "none" else cfg.train.log_with
    if log_with is not None and importlib.util.find_spec(log_with) is None:
        raise TsmError(
            f"train.log_with={log_with} needs the {log_with} package: pip install {log_with}, or log_with=none"
        )
    return Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        cpu=not torch.cuda.is_available(),
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(run), logging_dir=str(run / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def _flat_config(cfg: Config) -> dict[str, Any]:
    """The config as flat scalars (what trackers accept as hyperparameters)."""
    flat = {}
    for section, values in cfg.to_dict().items():
        for k, v in values.items():
            flat[f"{section}.{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
    return flat


def _flag(value: bool, acc: Any) -> torch.Tensor:
    return torch.tensor([float(value)], device=acc.device)  # (1,): summed over processes


def train(cfg: Config, resume: bool = False, dataset: Any = None, progress: bool = True) -> dict[str, Any]:
    """Run one training job with the recipe of ``train.method``; returns a summary (final loss, steps, it/s).

    ``dataset``: any map-style dataset of ``{"pixels", "caption", "key"}`` items instead of ``data.path``
    (the digits benchmark passes its in-memory tasks).

    The run directory (`tsm.rundir`): one run at a time (``run.lock``, main process), ``--resume`` refuses
    a config that trains another run, a fresh run refuses a folder holding checkpoints unless
    ``train.overwrite``; SIGTERM finishes the step, writes a checkpoint and raises `tsm.rundir.Stopped`.
    """
    run = Path(cfg.train.output_dir)
    acc = make_accelerator(cfg, run)
    with rundir.run_guard(run, acc.is_main_process, acc.print) as stop:
        return _train(cfg, acc, resume, dataset, progress, stop)


def _train(
    cfg: Config, acc: Any, resume: bool, dataset: Any, progress: bool, stop: rundir.StopOnSignal
) -> dict[str, Any]:
    """`train` inside its locked run directory."""
    from tsm.data import LatentCache, load_dataset

    tc = cfg.train
    run = Path(tc.output_dir)
    world = acc.num_processes
    recipe_cls = recipe_class(tc.method)
    point = rundir.start_point(run, cfg, resume)  # read-only: every process refuses alike
    acc.wait_for_everyone()  # every process has read config.yaml before the main process rewrites it
    if point.finished is not None:
        acc.print(f"{run} finished at step {point.step}; nothing to train (raise train.steps to go on)")
        return point.finished
    if acc.is_main_process:
        if not resume and tc.overwrite and (gone := rundir.clear_run(run)):
            acc.print(f"train.overwrite=true: deleted the previous run's {', '.join(gone)} in {run}")
        if left := rundir.clean_partial(run):
            acc.print(f"removed {len(left)} half-written file(s) of a run that stopped: {left[0].name} ...")
        if point.applied:
            acc.print(f"resuming with changed {'; '.join(point.applied)}")
        if point.checkpoint is None:  # a resumed run's config.yaml is rewritten once its checkpoint loaded
            save_config(cfg, run / "config.yaml")
    acc.wait_for_everyone()  # the folder is cleaned before any process reads it
    if dataset is None:
        dataset = load_dataset(cfg.data, video=get_family(cfg.model.family).video, seed=tc.seed)
    c = build(cfg, acc.device, weight_dtype(cfg))
    cache = LatentCache(Path(cfg.data.cache_dir or run / "cache"), c.model_id) if cfg.data.cache else None
    recipe = recipe_cls(cfg, c, dataset, cache, acc)
    total = recipe.total_steps()

    start, history, curves = 0, [], {}
    if resume:
        ckpt = point.checkpoint
        if ckpt is not None:
            state = point.state
            start, history = state["step"], [tuple(h) for h in state["history"]]
            curves = {k: [tuple(p) for p in v] for k, v in state.get("curves", {}).items()}
            if start > total:  # a method whose total is not train.steps alone (start_point checked that)
                raise TsmError(f"{ckpt} is past the run's {total} steps; raise train.steps to resume it")
            recipe.begin(start - 1)  # the stage (and optimizer) the checkpoint was written in, then load it
            _load(recipe, ckpt)
            if acc.is_main_process:  # the keys --resume may change, now that the checkpoint has loaded
                save_config(cfg, run / "config.yaml")
            if progress:
                acc.print(f"resumed from {ckpt} at step {start}")
        else:
            acc.print(f"no checkpoint in {run / CHECKPOINTS}; starting from step 0")
    if acc.is_main_process and tc.log_with != "none":
        acc.init_trackers("tsm", config=_flat_config(cfg))
    bar = tqdm(
        range(start, total),
        initial=start,
        total=total,
        desc=tc.method,
        disable=not (progress and acc.is_main_process),
    )
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
        for k, v in losses.items():
            if k.startswith("loss/"):
                curves.setdefault(k, []).append((step + 1, v))
        bar.set_postfix(loss=f"{loss:.4f}")
        if tc.log_with != "none" and (step + 1) % tc.log_every == 0:
            acc.log({f"train/{k}": v for k, v in losses.items()}, step=step + 1)
        if (
            acc.is_main_process
            and tc.validate_every
            and (step + 1) % tc.validate_every == 0
            and step + 1 < total
        ):
            validation_grid(cfg, c, run / "samples" / f"step_{step + 1:07d}.png", progress)
        # SIGTERM (a cluster about to kill the job): this step is done; checkpoint it and stop
        stopping = stop.requested if world == 1 else bool(acc.reduce(_flag(stop.requested, acc), "sum"))
        if (step + 1) % tc.checkpoint_every == 0 or step + 1 == total or stopping:
            if acc.is_main_process:
                state = {"history": history, "curves": curves}
                last_good = write_checkpoint(run, step + 1, lambda d: _save(recipe, d), state, tc.keep_last)
                with rundir.writing("loss.png", run):
                    plot_loss(history, run / "loss.png", curves)
            acc.wait_for_everyone()
        if stopping:
            bar.close()
            acc.end_training()  # the trackers flushed
            ckpt = run / CHECKPOINTS / f"step_{step + 1:07d}"
            raise rundir.Stopped(stop.signum, step + 1, ckpt, acc.is_main_process)
    bar.close()
    seconds = time.perf_counter() - t0
    recipe.finish()
    summary: dict[str, Any] = {"steps": total, "start": start, "seconds": seconds, "processes": world}
    if world > 1:  # every process must end with the same adapters
        params = [p for m in expert_modules(c).values() for p in m.parameters() if p.requires_grad]
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        gathered = acc.gather(flat[None])  # (world, N)
        summary["max_rank_difference"] = float((gathered - gathered[0]).abs().max())
    summary["it_per_s"] = (total - start) / seconds if seconds > 0 else math.nan
    summary["final_loss"] = history[-1][1] if history else math.nan
    if acc.is_main_process:
        with rundir.writing("the run's final files", run):  # the last checkpoint holds the run: --resume
            for name, module in recipe.modules().items():
                if name in c.modules():  # what `tsm sample` / `tsm export` read (not e.g. a fake score)
                    io.save(module, run / f"{name}.safetensors", component=name)
            if history:
                plot_loss(history, run / "loss.png", curves)
            grid = validation_grid(cfg, c, run / "samples" / "final.png", progress)
            summary["grid"] = str(grid) if grid else None
            (run / "summary.json").write_text(json.dumps(summary, indent=2))
    acc.wait_for_everyone()
    acc.end_training()  # closes the trackers (and, with several processes, the process group)
    return summary
