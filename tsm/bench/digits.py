"""`tsm bench digits`: the paper's comparisons on real data (scikit-learn's 8x8 digits) on a CPU.

Tasks (TSM Tables 4, 6, 7, 9 in miniature):
    domain    domain adaptation as attribute binding (like T2I-CompBench): the base model only knows
              "digit 3" in random colours; the target prompts "red 3 on blue" must be followed. Trained on
              240 (digit, fg, bg) combos, scored on 60 held-out combos never seen together.
    post      post-pretraining on a broader set than the base's: its source data ("digit 3", random
              colours) and attribute-binding samples, half each; scored on both kinds of prompt at once,
              so a method must learn the new captions without losing the old ones.
    appearance  an appearance shift: the source's prompts, target images with bold strokes.

Rows: base; plain LoRA r=4; for each n (quick: n=4; ``--full``: n=2, 4, 8) LoRA r=4 at n x steps (equal
compute), LoRA r=4n at n x steps (equal compute and parameters), TSM 1-stage n, TSM 2-stage n+1 and the LoRA
of its parameters and samples (r=4(n+1) at (n+2) x); the variants beyond the paper at LoRA r=4n's parameters
and samples (shared + residual experts, smooth routing, warm start, joint assembling); in ``--full`` also
core 8 + context (1, 2, 4), symmetric, router z-only and t-only, and a quality-vs-compute curve (LoRA r=32
at 8x and TSM n=8 at half, one and two budgets: curve.png). Budgets follow the paper's n x step bookkeeping:
every expert gets ``steps`` steps at batch ``batch`` (fostering all experts of a run together with a
stratified batch: each expert's B samples drawn inside its interval), so a TSM n=8 run costs 8x a LoRA run;
the table states each row's budget in samples seen and its trainable parameters. Every TSM row gets paired
verdicts (win / tie / loss at 2 standard errors) against the LoRA rows `comparisons` names.

Metrics (from the PNGs written, read back): FID in the feature space of a small CNN trained on the real
training split (lower is better), digit accuracy by that CNN, colour accuracy by exact colour
measurement (higher is better), and the ink coverage error of the appearance task. Mean and std over seeds
(3 by default, in both modes).

The run resumes: finished rows are kept in results.json and skipped.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tsm.bench.digits_common import ATTN, load_net, quiet_loading_bars, read_eval_png, verdict
from tsm.bench.digits_data import eval_set, train_batch
from tsm.errors import TsmError
from tsm.io import write_text_atomic

TASKS = ("domain", "post", "appearance")
# the metric each task's verdicts are read on, and whether higher is better
MAIN_METRIC = {"domain": ("fid", False), "post": ("fid", False), "appearance": ("ink_err", False)}
# binding, judged too where a task asks for it: fg+bg colour accuracy on held-out combos (chance: 1/30, one of the
# 30 ordered pairs of 6 colours with fg != bg)
BINDING_METRIC = {"domain": ("color_acc", True)}
BINDING_CHANCE = 1 / 30
QUICK_NS, FULL_NS = (4,), (2, 4, 8)  # the expert counts n of each mode's rows
TEXT_TARGETS = ["q_proj", "v_proj"]


@dataclass
class Budget:
    steps: int = 60  # optimizer steps per expert (paper's bookkeeping)
    batch: int = 16  # samples per expert per step
    lr: float = 1e-3  # AdamW, experts and routers
    assemble_steps: int = 60  # router steps of the 2-stage rows, at batch `batch`
    eval_per_prompt: int = 4  # seeds per evaluation prompt (60 held-out prompts or 60 digit x colour: 240)
    sample_steps: int | None = None  # sampling steps (None: the validated sampler, sampler.json)
    guidance: float | None = None  # classifier-free guidance (None: likewise)

    def sampler(self) -> tuple[int, float]:
        """(steps, guidance) of the evaluation: the validated ones unless set (the scheduler: always the
        validated one, `DigitsFamily.default_scheduler`)."""
        from tsm.models.digits import DigitsFamily

        family = DigitsFamily()
        steps = family.default_steps if self.sample_steps is None else self.sample_steps
        return steps, family.default_guidance if self.guidance is None else self.guidance


@dataclass
class Row:
    """One method of one task at one seed."""

    task: str
    name: str  # shown in the table
    method: str  # base | lora | foster | assemble
    scales: tuple = (1,)
    rank: int = 4
    step_factor: int = 1  # lora (or a mixed-batch foster row) for n x steps
    mixed: bool = False  # foster with one batch of `batch` a step split over the experts by t, for n x steps
    router: str = "asymmetric"
    seed: int = 0
    budget_scale: float = 1.0  # the quality-vs-compute curve: this times every stage's steps
    # the variants beyond the paper (ExpertsConfig / TrainConfig keys; the defaults are faithful TSM)
    shared_rank: int = 0  # experts.shared_rank: a full-range LoRA of this rank beside the interval experts
    routing: str = "hard"  # experts.routing: hard | smooth (hat-function blend of neighbouring experts)
    warm_start: float = 0.0  # train.warm_start_fraction: one LoRA first, copied into every expert
    assemble_experts_lr: float | None = None  # train.assemble_experts_lr: experts keep training in stage 2
    modulation: str = "none"  # experts.modulation: table: one LoRA with B diag(1 + g(t)) A (lora rows)
    rank_schedule: str = "none"  # experts.rank_schedule: tlora: fewer active ranks at high noise (lora rows)
    # train.share_scaled_lr: each expert's step times its share of a mixed batch
    share_scaled_lr: bool = False

    @property
    def key(self) -> str:
        return f"{self.task}/{self.name}/seed{self.seed}"

    def variant_overrides(self) -> dict[str, Any]:
        """The config keys of the row's variant (none for faithful TSM and LoRA rows)."""
        keys = {
            "experts.shared_rank": (self.shared_rank, 0),
            "experts.routing": (self.routing, "hard"),
            "train.warm_start_fraction": (self.warm_start, 0.0),
            "train.assemble_experts_lr": (self.assemble_experts_lr, None),
            "experts.modulation": (self.modulation, "none"),
            "experts.rank_schedule": (self.rank_schedule, "none"),
            "train.share_scaled_lr": (self.share_scaled_lr, False),
        }
        return {k: v for k, (v, default) in keys.items() if v != default}


def rows_for(task: str, full: bool, seed: int) -> list[Row]:
    """Base, LoRA r=4 at 1x, and for each n: LoRA r=4 at n x steps (equal compute), LoRA r=4n at n x steps
    (equal compute and parameters), TSM 1-stage n, TSM 2-stage n+1 and the LoRA of its held parameters and
    samples (r=4(n+1) at (n+2) x: n+1 experts fostered, then as many router steps as one expert's)."""
    r = [Row(task, "base", "base"), Row(task, "LoRA r=4", "lora", rank=4)]
    for n in FULL_NS if full else QUICK_NS:
        r += [
            Row(task, f"LoRA r=4, {n}x steps", "lora", rank=4, step_factor=n),
            Row(task, f"LoRA r={4 * n}, {n}x steps", "lora", rank=4 * n, step_factor=n),
            Row(task, f"TSM 1-stage n={n}", "foster", scales=(n,)),
            Row(task, f"TSM 2-stage {n}+1", "assemble", scales=(n, 1)),
            Row(task, f"LoRA r={4 * (n + 1)}, {n + 2}x steps", "lora", rank=4 * (n + 1), step_factor=n + 2),
        ]
        r += variant_rows(task, n, full)
    if full:
        r += [
            Row(task, "TSM 2-stage 8+(1,2,4)", "assemble", scales=(8, 4, 2, 1)),
            Row(task, "TSM 2-stage 8+1 symmetric", "assemble", scales=(8, 1), router="symmetric"),
            Row(task, "TSM 2-stage 8+1 router z-only", "assemble", scales=(8, 1), router="z_only"),
            Row(task, "TSM 2-stage 8+1 router t-only", "assemble", scales=(8, 1), router="t_only"),
        ]
        for scale in CURVE_SCALES:  # the quality-vs-compute curve (the 1x points are the rows above)
            r += [
                Row(
                    task,
                    f"LoRA r=32, 8x steps @{scale:g}x",
                    "lora",
                    rank=32,
                    step_factor=8,
                    budget_scale=scale,
                ),
                Row(task, f"TSM 1-stage n=8 @{scale:g}x", "foster", scales=(8,), budget_scale=scale),
            ]
        r += form_rows(task, FORMS_N)
    return [replace(x, seed=seed) for x in r]


FORMS_N = 4  # the forms that vary one LoRA with t are run at n = 4 only (--full)
LONG_NS = (4,)  # --long: the expert counts (--long-n 4 8 adds n = 8)
LONG_TASKS = ("domain", "appearance", "post")  # --long runs task by task: binding first, post last
LONG_BUDGETS = (1.0, 4.0, 16.0)  # --long: every stage's steps times these (1x: quick mode's 60 per expert)


def budget_suffix(scale: float) -> str:
    """A row name's budget tag: "" at 1x (the quick rows' own names), " @4x" otherwise."""
    return "" if scale == 1 else f" @{scale:g}x"


def split_budget(name: str) -> tuple[str, str]:
    """(row name at 1x, budget suffix) of a row name: "TSM 1-stage n=4 @16x" -> ("TSM 1-stage n=4", " @16x")."""
    if " @" in name:
        head, tail = name.rsplit(" @", 1)
        return head, f" @{tail}"
    return name, ""


def long_rows(
    task: str, ns: tuple[int, ...] = LONG_NS, budgets: tuple[float, ...] = LONG_BUDGETS
) -> list[Row]:
    """``--long``: at each n and budget, the equal LoRA (r=4n at n x steps) and every form that competes with it
    for the same samples and parameters: faithful TSM 1-stage n (the paper's bookkeeping), TSM n on mixed
    batches, shared + residual experts on mixed batches, the same with each expert's step scaled by its share
    of the batch, the modulated bottleneck and T-LoRA's rank schedule. Plus the base, once."""
    rows = [Row(task, "base", "base")]
    for n in ns:
        mixed = dict(step_factor=n, mixed=True)
        lora = dict(rank=4 * n, step_factor=n)
        shared = dict(scales=(n,), rank=2, shared_rank=2 * n)
        for scale in budgets:
            at = budget_suffix(scale)
            forms = [
                Row(task, f"LoRA r={4 * n}, {n}x steps{at}", "lora", **lora),
                Row(task, f"TSM 1-stage n={n}{at}", "foster", scales=(n,)),
                Row(task, f"TSM 1-stage n={n}, {n}x steps{at}", "foster", scales=(n,), **mixed),
                Row(task, f"TSM shared r={2 * n} + n={n} r=2, {n}x steps{at}", "foster", **shared, **mixed),
                Row(
                    task,
                    f"TSM shared r={2 * n} + n={n} r=2 share-scaled lr, {n}x steps{at}",
                    "foster",
                    **shared,
                    **mixed,
                    share_scaled_lr=True,
                ),
                Row(task, f"LoRA r={4 * n} modulated, {n}x steps{at}", "lora", **lora, modulation="table"),
                Row(task, f"T-LoRA r={4 * n}, {n}x steps{at}", "lora", **lora, rank_schedule="tlora"),
            ]
            rows += [replace(r, budget_scale=scale) for r in forms]
    return rows


def form_rows(task: str, n: int) -> list[Row]:
    """One LoRA r=4n at n x steps that still varies with t, every parameter updated every step (--full only):
    the modulated bottleneck B diag(1 + g(t)) A (the LoRA's parameters plus a 20 x r table per layer) and
    T-LoRA's rank schedule (the LoRA's parameters), each judged against the plain LoRA r=4n at n x steps."""
    lora = dict(rank=4 * n, step_factor=n)
    return [
        Row(task, f"LoRA r={4 * n} modulated, {n}x steps", "lora", **lora, modulation="table"),
        Row(task, f"T-LoRA r={4 * n}, {n}x steps", "lora", **lora, rank_schedule="tlora"),
    ]


CURVE_SCALES = (0.5, 2.0)  # with the 1x rows: the curve's three budgets


def variant_rows(task: str, n: int, full: bool) -> list[Row]:
    """The variants beyond the paper at the held parameters and samples of LoRA r=4n at n x steps (and, for
    joint assembling, of LoRA r=4(n+1) at (n+2) x, as its faithful 2-stage row): shared rank 2n + n residual
    experts of rank 2 (2n + 2n = 4n); smooth routing; warm start (a quarter of the steps as one LoRA); joint
    assembling (experts keep training at a tenth of the lr while the routers learn); and *mixed-batch* rows
    that train n x steps on one batch a step split over the experts by t (the LoRA's own optimizer steps and
    batch) instead of the paper's `steps` steps with a batch per expert. Quick mode: the shared rows only."""
    shared = dict(scales=(n,), rank=2, shared_rank=2 * n)
    rows = [
        Row(task, f"TSM shared r={2 * n} + n={n} r=2", "foster", **shared),
        Row(
            task,
            f"TSM shared r={2 * n} + n={n} r=2, {n}x steps",
            "foster",
            **shared,
            step_factor=n,
            mixed=True,
        ),
    ]
    if full:
        rows += [
            Row(task, f"TSM 1-stage n={n}, {n}x steps", "foster", scales=(n,), step_factor=n, mixed=True),
            Row(task, f"TSM 1-stage n={n} smooth", "foster", scales=(n,), routing="smooth"),
            Row(task, f"TSM 1-stage n={n} warm start", "foster", scales=(n,), warm_start=0.25),
            Row(task, f"TSM 2-stage {n}+1 joint", "assemble", scales=(n, 1), assemble_experts_lr=JOINT_LR),
        ]
    return rows


JOINT_LR = 1e-4  # joint assembling: the experts' lr in stage 2 (the routers': Budget.lr)


def comparisons(name: str) -> dict[str, str]:
    """The LoRA rows a TSM row is judged against: same rank at equal compute (for a 2-stage row the same-rank
    LoRA at the 1-stage's compute: no r=4 row at (n+2) x is run), and equal parameters at equal compute; a
    variant also against the faithful TSM row it changes."""
    name, at = split_budget(name)
    if at:  # a row at another budget: judged against the same rows at that budget
        return {what: f"{other}{at}" for what, other in comparisons(name).items()}
    if " modulated, " in name or name.startswith("T-LoRA r="):  # a form of one LoRA: against that LoRA
        return {"same LoRA, equal compute": name.removeprefix("T-").replace(" modulated", "")}
    n = int(name.split("n=")[1].split()[0].rstrip(",")) if "n=" in name else 0
    if " share-scaled lr, " in name:  # against the same mixed-batch row with every expert's step unscaled
        return {
            "equal params and compute": f"LoRA r={4 * n}, {n}x steps",
            "against its unscaled twin": name.replace(" share-scaled lr", ""),
        }
    if name.endswith("x steps") and name.startswith("TSM"):  # a mixed-batch row against its 1x-steps twin
        return {
            "equal params and compute": f"LoRA r={4 * n}, {n}x steps",
            "against its paper-bookkeeping twin": name.rsplit(",", 1)[0],
        }
    if name.startswith("TSM shared r="):
        return {
            "equal params and compute": f"LoRA r={4 * n}, {n}x steps",
            "against faithful TSM": f"TSM 1-stage n={n}",
        }
    if name.startswith("TSM 1-stage n="):
        same = {
            "same rank, equal compute": f"LoRA r=4, {n}x steps",
            "equal params and compute": f"LoRA r={4 * n}, {n}x steps",
        }
        if name != f"TSM 1-stage n={n}":  # a variant (smooth, warm start)
            same = {"equal params and compute": same["equal params and compute"]}
            same["against faithful TSM"] = f"TSM 1-stage n={n}"
        return same
    if name.startswith("TSM 2-stage ") and (name.endswith("+1") or name.endswith("+1 joint")):
        n = int(name.split()[2].split("+")[0])
        if name.endswith("joint"):
            return {
                "equal params and compute": f"LoRA r={4 * (n + 1)}, {n + 2}x steps",
                "against faithful TSM": f"TSM 2-stage {n}+1",
            }
        return {
            "same rank, n x compute": f"LoRA r=4, {n}x steps",
            "equal params and compute": f"LoRA r={4 * (n + 1)}, {n + 2}x steps",
        }
    return {}


def row_units(row: Row, budget: Budget) -> int:
    """Samples the row trains on (the compute budget, as in the paper's n x step bookkeeping)."""
    if row.method == "base":
        return 0
    experts = sum(s for s in row.scales)  # uniform scales: n experts each
    steps, assemble_steps = row_steps(row, budget)
    per_step = row.step_factor if row.method == "lora" or row.mixed else experts
    units = steps * budget.batch * per_step
    if row.method == "assemble":
        units += assemble_steps * budget.batch
    return units


def row_steps(row: Row, budget: Budget) -> tuple[int, int]:
    """(steps per expert, router steps) of a row: the budget's, times the row's curve scale."""
    return (
        max(1, round(budget.steps * row.budget_scale)),
        max(1, round(budget.assemble_steps * row.budget_scale)),
    )


# ---------------------------------------------------------------------------------------------------------
# training one row
# ---------------------------------------------------------------------------------------------------------
class DigitsTask(torch.utils.data.Dataset):
    """A task's training samples, drawn once: ``size`` (image, prompt) items from a generator seeded by
    ``seed``; with ``size`` = the samples a row trains on, every training sample is a fresh draw, as the
    task's distribution is infinite (random colours of random digits)."""

    def __init__(self, task: str, size: int, seed: int) -> None:
        self.task = task
        self.pixels, self.prompts = train_batch(task, size, torch.Generator().manual_seed(10_000 + seed))
        self.keys = [f"digits:{task}:{seed}:{i}" for i in range(size)]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pixels": self.pixels[index], "caption": self.prompts[index], "key": self.keys[index]}


def row_config(row: Row, budget: Budget, base: Path, out: Path, **train: Any) -> Any:
    """The `tsm train` config of one row's training run (method lora / foster / assemble)."""
    from tsm.config import load_config

    method = "foster" if row.method == "assemble" and "experts_from" not in train else row.method
    per_expert, assemble_steps = row_steps(row, budget)
    factor = row.step_factor if method == "lora" or row.mixed else 1
    steps = {"lora": per_expert * factor, "foster": per_expert * factor}.get(method, assemble_steps)
    variant = row.variant_overrides()
    if method == "foster":  # stage-2 keys apply to the assembling run only
        variant.pop("train.assemble_experts_lr", None)
    elif method == "lora":  # the forms of one LoRA (modulation, rank schedule)
        variant = {k: v for k, v in variant.items() if k in ("experts.modulation", "experts.rank_schedule")}
    else:
        variant = {k: v for k, v in variant.items() if k == "train.assemble_experts_lr"}
    overrides = {
        "model.family": "digits",
        "model.path": str(base),
        "experts.scales": list(row.scales),
        "experts.rank": row.rank,
        "experts.alpha": row.rank,
        "experts.targets": ATTN,
        "experts.text_targets": TEXT_TARGETS,
        "experts.router": row.router,
        "data.cache": False,
        "optim.lr": budget.lr,
        "optim.weight_decay": 0.0,
        "optim.max_grad_norm": 1.0,
        "train.method": method,
        "train.steps": steps,
        "train.batch_size": budget.batch,
        # the paper's bookkeeping: every expert gets `batch` a step (a mixed row: the batch is split by t)
        "train.batch_per_expert": method == "foster" and not row.mixed,
        "train.seed": row.seed,
        "train.output_dir": str(out),
        "train.overwrite": True,  # a row killed mid-run is retrained from scratch (finished rows are skipped)
        "train.checkpoint_every": steps,
        "train.keep_last": 1,
        "train.log_with": "none",
        "train.validation_prompts": [],
        **variant,
        **{f"train.{k}": v for k, v in train.items()},
    }
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def train_row(row: Row, budget: Budget, base: Path, work: Path, report: Any = lambda n: None) -> Any:
    """The row's model (Components), trained through `tsm train`'s own loop and recipes; the fostered
    experts of 2-stage rows are one run in ``work``, reused by every router variant."""
    from tsm.models.digits import DigitsFamily
    from tsm.recipes.run import load_run, train

    if row.method == "base":
        return DigitsFamily().load(str(base))
    slug = eval_png(Path(""), row).stem
    run = work / slug
    # the benchmark holds its results folder (run's RunLock), so a row's own lock can only be left by a killed
    # earlier benchmark: the row is retrained from scratch anyway. RunLock itself sees a reused pid by its start
    # time where /proc gives one; this also clears locks where it does not (other systems, older locks)
    (run / "run.lock").unlink(missing_ok=True)
    if row.method == "assemble":
        curve = f"_x{row.budget_scale:g}" if row.budget_scale != 1 else ""
        fostered = work / f"fostered_{row.task}_{'-'.join(map(str, row.scales))}{curve}_seed{row.seed}"
        # shared by the router variants (and joint assembling) of the same scales
        foster_row = replace(row, method="foster", router="asymmetric", assemble_experts_lr=None)
        work.mkdir(parents=True, exist_ok=True)
        with open(work / f"{fostered.name}.lock", "w") as lock:  # parallel rows share it: one fosters
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (fostered / "summary.json").is_file():
                (fostered / "run.lock").unlink(missing_ok=True)  # left by a killed benchmark, as below
                cfg = row_config(foster_row, budget, base, fostered)
                dataset = DigitsTask(row.task, row_units(foster_row, budget), row.seed)
                train(cfg, dataset=dataset, progress=False)
        report(row_units(foster_row, budget))
        cfg = row_config(row, budget, base, run, experts_from=str(fostered))
        size = row_steps(row, budget)[1] * budget.batch
    else:
        cfg = row_config(row, budget, base, run)
        size = row_units(row, budget)
    train(cfg, dataset=DigitsTask(row.task, size, row.seed), progress=False)
    report(size)
    return load_run(run)[1]


def trainable_params(row: Row, c: Any) -> tuple[int, int]:
    """(parameters trained in the last stage, expert parameters held) of a row's model."""
    import tsm

    if row.method == "base":
        return 0, 0
    mods = [c.denoiser, c.text_encoders["text_encoder"]]
    trained = sum(p.numel() for m in mods for p in tsm.adapter_params(m))
    held = sum(  # every adapter weight of the expert layers (interval experts, a shared LoRA), no router
        p.numel()
        for m in mods
        for _, layer in tsm.expert_layers(m)
        for name, p in layer.named_parameters()
        if not name.startswith(("base_layer.", "router."))
    )
    if row.assemble_experts_lr is not None:  # joint assembling: the experts trained with the routers
        trained += held
    return trained, held


# ---------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------
def evaluate(c: Any, row: Row, budget: Budget, out: Path, net: Any) -> dict[str, float]:
    """Sample the held-out prompts, write them as one PNG, read it back and score it."""
    from tsm.bench.metrics import color_accuracy, digit_accuracy, fid, ink
    from tsm.images import make_grid, to_pil
    from tsm.sampling import sample

    prompts, seeds, reference, combos = eval_set(row.task, budget.eval_per_prompt)
    images = sample(c, prompts, seeds, *budget.sampler(), progress=False)
    path = eval_png(out, row)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid([to_pil(x) for x in images], columns=32, pad=0).save(path)
    images = read_eval_png(path, len(prompts))  # metrics from the file, as a reader would compute them
    metrics = {
        "fid": fid(net, images, reference),
        "digit_acc": digit_accuracy(net, images, [d for d, _, _ in combos]),
    }
    named = [i for i, (_, fg, _) in enumerate(combos) if fg]  # the prompts that name colours
    if named:
        acc = color_accuracy(images[named], [combos[i][1] for i in named], [combos[i][2] for i in named])
        metrics.update(fg_acc=acc["fg"], bg_acc=acc["bg"], color_acc=acc["both"])
    if row.task == "appearance":  # how bold: the strokes' coverage, against the bold references'
        coverage = float(ink(images).mean())
        metrics.update(ink=coverage, ink_err=abs(coverage - float(ink(reference).mean())))
    return metrics


def eval_png(out: Path, row: Row) -> Path:
    slug = (
        row.name.lower()
        .replace(" ", "_")
        .replace("=", "")
        .replace(",", "")
        .replace("+", "p")
        .replace("(", "")
        .replace(")", "")
    )
    return out / "eval_images" / f"{row.task}__{slug}__seed{row.seed}.png"


def run_row(
    row: Row,
    budget: Budget,
    base: Path,
    out: Path,
    net_path: Path,
    net_steps: int | None = None,
    report: Any = None,
) -> dict:
    report = report or (lambda n: None)
    t0 = time.perf_counter()
    c = train_row(row, budget, base, out / "work", report)
    seconds_train = time.perf_counter() - t0
    trained, held = trainable_params(row, c)
    metrics = evaluate(c, row, budget, out, load_net(net_path, net_steps))
    return {
        **asdict(row),
        "scales": list(row.scales),
        "samples_trained": row_units(row, budget),
        "trained_params": trained,
        "expert_params": held,
        "train_seconds": round(seconds_train, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        **metrics,
    }


def _worker(args: tuple) -> dict:
    row, budget, base, out, net_path, net_steps, queue = args
    torch.set_num_threads(1)
    quiet_loading_bars()
    return run_row(row, budget, base, out, net_path, net_steps, report=queue.put)


# ---------------------------------------------------------------------------------------------------------
# the whole run
# ---------------------------------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    out: str = "results/digits"
    full: bool = False
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    budget: Budget = field(default_factory=Budget)
    workers: int = 2  # rows trained in parallel processes (one thread each); 0: in this process
    base: str | None = None  # base model folder (default: the shipped one; retrained if missing)
    only: list[str] | None = None  # run only the rows with these names
    net_steps: int | None = None  # training steps of the metric CNN (None: its default)
    # the long budgets: `long_rows` at `long_ns` x `budgets` instead of the quick/full rows
    long: bool = False
    long_ns: list[int] = field(default_factory=lambda: list(LONG_NS))
    budgets: list[float] = field(default_factory=lambda: list(LONG_BUDGETS))

    def rows(self) -> list[Row]:
        """Every row of the run, in table order (tasks, then seeds)."""
        rows = []
        for task in self.tasks:
            for seed in self.seeds:
                if self.long:
                    made = long_rows(task, tuple(self.long_ns), tuple(self.budgets))
                else:
                    made = rows_for(task, self.full, seed)
                rows += [replace(r, seed=seed) for r in made]
        return rows if not self.only else [r for r in rows if r.name in self.only]


def run(cfg: BenchConfig, progress: bool = True) -> dict:
    """Run (or resume) the benchmark; write results.json, results.md, grids and the bar plot. One benchmark at a
    time holds its results folder (``OUT/run.lock``); a second one is refused in one line."""
    from tsm.rundir import RunLock

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, kind="tsm bench digits", elsewhere="give it another --out"):
        return _run(cfg, out, progress)


def _run(cfg: BenchConfig, out: Path, progress: bool) -> dict:
    from tqdm.auto import tqdm

    from tsm.bench.digits_model import BASE_DIR, base_available, pretrain_base

    quiet_loading_bars()
    base = Path(cfg.base) if cfg.base else BASE_DIR
    if not base_available(base):
        print(f"no base model in {base}: pretraining it (python -m tsm.bench.digits_model --out {base})")
        pretrain_base(base, progress=progress)
    net_path = out / "digit_net.safetensors"
    load_net(net_path, cfg.net_steps)  # trained once, before the workers
    results_path = out / "results.json"
    done: dict[str, dict] = json.loads(results_path.read_text())["rows"] if results_path.is_file() else {}
    rows = cfg.rows()
    todo = [r for r in rows if r.key not in done]
    if done:
        print(f"resuming: {len(rows) - len(todo)} of {len(rows)} rows already in {results_path}")
    # longest first: better packing over the workers; --long: one task after another, so that an interrupted
    # run leaves whole tasks (every budget and seed) to read
    order = {task: i for i, task in enumerate(cfg.tasks)} if cfg.long else {}
    todo.sort(key=lambda r: (order.get(r.task, 0), -row_units(r, cfg.budget)))
    total = sum(row_units(r, cfg.budget) for r in todo) + len(todo)  # +1 per row for its evaluation
    bar = tqdm(
        total=total,
        desc="digits benchmark (samples trained)",
        disable=not progress,
        unit="sample",
        unit_scale=True,
    )
    t0 = time.perf_counter()

    def finish(result: dict) -> None:
        done[f"{result['task']}/{result['name']}/seed{result['seed']}"] = result
        write_text_atomic(results_path, json.dumps({"config": _config_dict(cfg), "rows": done}, indent=2))
        bar.update(1)

    if cfg.workers <= 0:
        for r in todo:
            finish(run_row(r, cfg.budget, base, out, net_path, cfg.net_steps, report=bar.update))
    else:
        _parallel(cfg, todo, base, out, net_path, bar, finish)
    bar.close()
    wall = time.perf_counter() - t0
    summary = write_reports(out, cfg, done, rows, wall)
    return summary


def _parallel(
    cfg: BenchConfig, todo: list[Row], base: Path, out: Path, net_path: Path, bar: Any, finish: Any
) -> None:
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        q = manager.Queue()
        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx) as pool:
            pending = {
                pool.submit(_worker, (r, cfg.budget, base, out, net_path, cfg.net_steps, q)) for r in todo
            }
            while pending:
                finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                while True:
                    try:
                        bar.update(q.get_nowait())
                    except queue_mod.Empty:
                        break
                for f in finished:
                    finish(f.result())


def _config_dict(cfg: BenchConfig) -> dict:
    return asdict(cfg)


# ---------------------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------------------
METRICS = [
    ("fid", "FID ↓"),
    ("digit_acc", "digit acc ↑"),
    ("fg_acc", "fg acc ↑"),
    ("bg_acc", "bg acc ↑"),
    ("color_acc", "fg+bg acc ↑ (chance 0.033)"),
    ("ink", "ink (ref 0.44)"),
    ("ink_err", "ink error ↓"),
]


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def judgements(task: str) -> list[tuple[str, str, bool]]:
    """(entry key, metric, higher is better) of each verdict a task's rows get: the main metric's, and binding's
    where the task judges binding."""
    return [("verdicts", *MAIN_METRIC[task])] + (
        [("binding_verdicts", *BINDING_METRIC[task])] if task in BINDING_METRIC else []
    )


def aggregate(done: dict[str, dict], rows: list[Row]) -> dict[str, dict[str, dict]]:
    """task -> row name -> {metric: (mean, std), budget columns, seeds}."""
    table: dict[str, dict[str, dict]] = {}
    for r in rows:
        res = done.get(r.key)
        if res is None:
            continue
        entry = table.setdefault(r.task, {}).setdefault(r.name, {"runs": []})
        entry["runs"].append(res)
    for task in table.values():
        for entry in task.values():
            runs = entry["runs"]
            for m, _ in METRICS:
                if m in runs[0]:
                    entry[m] = _mean_std([x[m] for x in runs])
            for k in ("samples_trained", "trained_params", "expert_params", "seconds"):
                entry[k] = runs[0][k] if k != "seconds" else sum(x[k] for x in runs) / len(runs)
            entry["seeds"] = len(runs)
    for task, entries in table.items():
        for name, entry in entries.items():
            for key, metric, higher in judgements(task):
                entry[key] = {}
                for what, other in comparisons(name).items():
                    if other not in entries:
                        continue
                    mine = {r["seed"]: r[metric] for r in entry["runs"]}
                    theirs = {r["seed"]: r[metric] for r in entries[other]["runs"]}
                    seeds = sorted(mine.keys() & theirs.keys())
                    v = verdict([mine[s] for s in seeds], [theirs[s] for s in seeds], higher)
                    entry[key][what] = {"against": other, "metric": metric, **v}
    return table


def markdown(table: dict[str, dict[str, dict]], cfg: BenchConfig, wall: float) -> str:
    b = cfg.budget
    seeds = len(cfg.seeds)
    sample_steps, guidance = b.sampler()
    lines = [
        "# Digits benchmark",
        "",
        f"Mode: {'long' if cfg.long else 'full' if cfg.full else 'quick'}; {seeds} seed{'s' if seeds > 1 else ''}"
        + (" (quick mode: one seed, so no error bars)" if seeds == 1 else " (mean ± std)")
        + f"; {b.steps} steps per expert at batch {b.batch}, lr {b.lr:g}; assembling {b.assemble_steps} router steps;"
        f" {sample_steps} {_scheduler_name()} steps, guidance {guidance:g}; wall time {wall / 60:.1f} min for the rows run now.",
        "",
        *_sampler_note(b),
        "Budget columns: *samples* = training samples seen (the paper's n x steps bookkeeping: each of n experts"
        " gets the same steps and batch as one LoRA); *trained* = parameters trained in the last stage;"
        " *held* = expert parameters in the model (LoRA r=32 holds as many as 8 experts of r=4).",
    ]
    for task, entries in table.items():
        title = {
            "domain": "Domain adaptation (held-out attribute-binding prompts)",
            "post": "Post-pretraining (a broader set: source and colour-named prompts, half each)",
            "appearance": "Appearance shift (source prompts, bold strokes)",
        }[task]
        metrics = [(m, label) for m, label in METRICS if any(m in e for e in entries.values())]
        lines += ["", f"## {title}", ""]
        lines.append(
            "| method | samples | trained | held | "
            + " | ".join(label for _, label in metrics)
            + " | s/seed |"
        )
        lines.append("|---|---:|---:|---:|" + "---:|" * len(metrics) + "---:|")
        for name, e in entries.items():
            cells = []
            for m, _ in metrics:
                mean, std = e[m]
                fmt = "{:.1f}" if m == "fid" else "{:.3f}"
                cells.append(fmt.format(mean) + (f" ± {fmt.format(std)}" if e["seeds"] > 1 else ""))
            lines.append(
                f"| {name} | {e['samples_trained']:,} | {e['trained_params']:,} | {e['expert_params']:,} | "
                + " | ".join(cells)
                + f" | {e['seconds']:.0f} |"
            )
        for key, metric, higher in judgements(task):
            judged = [(name, what, v) for name, e in entries.items() for what, v in e.get(key, {}).items()]
            if not judged:
                continue
            lines += [
                "",
                f"Verdicts on {metric} ({'higher' if higher else 'lower'} is better), paired by seed: *win* / *loss*"
                " when the mean gain is beyond 2 standard errors of the paired difference, else *tie*.",
                "",
                "| TSM row | against | as | verdict | mean gain ± SE |",
                "|---|---|---|---|---:|",
            ]
            for name, what, v in judged:
                gain = f"{v['mean_gain']:+.3f} ± {v['se']:.3f}" if "mean_gain" in v else v.get("reason", "")
                lines.append(f"| {name} | {v['against']} | {what} | **{v['verdict']}** | {gain} |")
        if cfg.long:
            lines += budget_matrix(task, entries, cfg.budgets)
    if cfg.long:
        lines += default_form_lines(table, cfg.budgets)
    return "\n".join(lines) + "\n"


EQUAL_LORA = "equal params and compute"


def budget_matrix(task: str, entries: dict[str, dict], budgets: list[float]) -> list[str]:
    """``--long``: one line per form, one column per budget: its verdict against the equal LoRA (LoRA r=4n at
    n x steps, the same samples and parameters) on the main metric, and for a task that judges binding, the
    fg+bg accuracy of every row at every budget."""
    forms = [n for n in entries if not split_budget(n)[1] and n != "base"]
    head = "| row | " + " | ".join(f"{b:g}x" for b in budgets) + " |"
    rule = "|---|" + "---|" * len(budgets)
    metric, higher = MAIN_METRIC[task]
    lines = [
        "",
        f"Against the equal LoRA at each budget ({metric}, {'higher' if higher else 'lower'} is better; the gain"
        " is mean ± SE of the paired difference, > 0 favours the row):",
        "",
        head,
        rule,
    ]
    for form in forms:
        cells = []
        for b in budgets:
            v = equal_lora_verdict(entries, form, b)
            if v is None:
                cells.append("—")
            else:
                cells.append(f"**{v['verdict']}** {v['mean_gain']:+.3g} ± {v['se']:.2g}")
        if any(c != "—" for c in cells):
            lines.append(f"| {form} | " + " | ".join(cells) + " |")
    if task in BINDING_METRIC:
        metric, _ = BINDING_METRIC[task]
        lines += [
            "",
            f"fg+bg accuracy on held-out combos (chance {BINDING_CHANCE:.3f}), mean ± std:",
            "",
            head,
            rule,
        ]
        for form in ["base", *forms]:
            cells = []
            for b in budgets:
                e = entries.get(form if form == "base" else form + budget_suffix(b))
                cells.append(
                    "—" if e is None or metric not in e else f"{e[metric][0]:.3f} ± {e[metric][1]:.3f}"
                )
            lines.append(f"| {form} | " + " | ".join(cells) + " |")
    return lines


def equal_lora_verdict(entries: dict[str, dict], form: str, budget: float) -> dict | None:
    """The verdict of a form at a budget against the LoRA of its parameters and samples (None if not run)."""
    verdicts = entries.get(form + budget_suffix(budget), {}).get("verdicts", {})
    v = verdicts.get(EQUAL_LORA) or verdicts.get("same LoRA, equal compute")
    return v if v is not None and "mean_gain" in v else None


def wins_needed(tasks: int) -> int:
    """Wins at the largest budget a default form needs: two thirds of the tasks run (2 of 3)."""
    return math.ceil(2 * tasks / 3)


def default_forms(table: dict[str, dict[str, dict]], budgets: list[float]) -> dict[str, dict]:
    """``--long``: per form, whether it qualifies as the form to train by default: against the equal LoRA it
    never loses on any task at any budget, and wins on at least 2 of 3 tasks (two thirds of the tasks run) at
    the largest budget; judged only when every task and budget has a verdict."""
    tasks = list(table)
    forms = sorted({n for e in table.values() for n in e if not split_budget(n)[1] and n != "base"})
    out = {}
    for form in forms:
        cells = {(t, b): equal_lora_verdict(table[t], form, b) for t in tasks for b in budgets}
        if all(v is None for v in cells.values()):
            continue  # the equal LoRA itself
        complete = all(v is not None for v in cells.values())
        losses = [f"{t} {b:g}x" for (t, b), v in cells.items() if v is not None and v["verdict"] == "loss"]
        wins = [t for t in tasks if (v := cells[(t, max(budgets))]) is not None and v["verdict"] == "win"]
        out[form] = {
            "complete": complete,
            "losses": losses,
            "wins_at_largest": wins,
            "qualifies": complete and not losses and len(wins) >= wins_needed(len(tasks)),
        }
    return out


def default_form_lines(table: dict[str, dict[str, dict]], budgets: list[float]) -> list[str]:
    forms = default_forms(table, budgets)
    if not forms:
        return []
    lines = [
        "",
        "## Which form qualifies as the default",
        "",
        "A form qualifies when, against the LoRA of its parameters and samples, it never loses on any task at any"
        f" budget and wins on at least two thirds of the tasks at the largest budget ({max(budgets):g}x): here"
        f" {wins_needed(len(table))} of the {len(table)} task{'s' if len(table) > 1 else ''} run"
        f" ({', '.join(table)}).",
        "",
        "| form | losses | wins at the largest budget | qualifies |",
        "|---|---|---|---|",
    ]
    for form, f in forms.items():
        verdict_word = "**yes**" if f["qualifies"] else "no" if f["complete"] else "not yet (rows missing)"
        lines.append(
            f"| {form} | {', '.join(f['losses']) or 'none'} | {', '.join(f['wins_at_largest']) or 'none'} |"
            f" {verdict_word} |"
        )
    return lines


def _scheduler_name() -> str:
    from tsm.bench.digits_sampler import SCHEDULER_LABELS
    from tsm.models.digits import DigitsFamily

    return SCHEDULER_LABELS[DigitsFamily().default_scheduler]


def _sampler_note(b: Budget) -> list[str]:
    """The validation table behind the default sampler (when the run uses it), for results.md."""
    from tsm.bench.digits_sampler import markdown as sampler_markdown
    from tsm.models.digits import SAMPLER_FILE

    if b.sample_steps is not None or b.guidance is not None or not SAMPLER_FILE.is_file():
        return []
    return [sampler_markdown(json.loads(SAMPLER_FILE.read_text())), ""]


def write_reports(out: Path, cfg: BenchConfig, done: dict, rows: list[Row], wall: float) -> dict:
    table = aggregate(done, rows)
    md = markdown(table, cfg, wall)
    (out / "results.md").write_text(md)
    print(md)
    bar_plot(table, out / "results.png")
    curve_plot(table, out / "curve.png")
    if cfg.long:
        long_curve_plot(table, out / "curves.png", cfg.budgets)
    if cfg.long:  # the grids of the largest budget (and the base)
        top = budget_suffix(max(cfg.budgets))
        rows = [r for r in rows if r.name == "base" or (split_budget(r.name)[1] == top)]
    side_by_side(out, rows, done, cfg.budget.eval_per_prompt)
    verdicts = {t: {n: e["verdicts"] for n, e in d.items() if e["verdicts"]} for t, d in table.items()}
    binding = {
        t: {n: e["binding_verdicts"] for n, e in d.items() if e.get("binding_verdicts")}
        for t, d in table.items()
    }
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    write_text_atomic(
        out / "results.json",
        json.dumps(
            {
                **results,
                "verdicts": verdicts,
                "binding_verdicts": binding,
                **({"default_forms": default_forms(table, cfg.budgets)} if cfg.long else {}),
            },
            indent=2,
        ),
    )
    return {
        "table": {
            t: {n: {k: v for k, v in e.items() if k != "runs"} for n, e in d.items()}
            for t, d in table.items()
        },
        "wall_seconds": wall,
    }


def bar_plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (task, m, label)
        for task, e in table.items()
        for m, label in METRICS
        if any(m in x for x in e.values()) and m in ("fid", "digit_acc", "color_acc", "ink_err")
    ]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (task, m, label) in zip(axes[0], panels, strict=True):
        names = list(table[task])
        means = [table[task][n][m][0] for n in names]
        stds = [table[task][n][m][1] for n in names]
        colors = [
            "0.6" if n == "base" else ("tab:blue" if n.startswith("LoRA") else "tab:orange") for n in names
        ]
        ax.bar(range(len(names)), means, yerr=stds, color=colors, capsize=3)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{task}: {label}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CURVES = {"LoRA r=32, 8x steps": "tab:blue", "TSM 1-stage n=8": "tab:orange"}


def curve_points(entries: dict[str, dict], name: str, metric: str) -> list[tuple[int, float, float]]:
    """(samples, mean, std) of one method at every budget of the curve that was run, by samples."""
    names = [name] + [f"{name} @{scale:g}x" for scale in CURVE_SCALES]
    points = [(entries[n]["samples_trained"], *entries[n][metric]) for n in names if n in entries]
    return sorted(points)


def curve_plot(table: dict, path: Path) -> None:
    """Quality vs compute (``--full``): the main metric of LoRA r=32 at 8x steps and TSM 1-stage n=8 (equal
    parameters and compute at every point) at three budgets, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t, e in table.items() if any(len(curve_points(e, n, "fid")) > 1 for n in CURVES)]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        metric, higher = MAIN_METRIC[task]
        for name, color in CURVES.items():
            pts = curve_points(table[task], name, metric)
            if pts:
                x, y, e = zip(*pts, strict=True)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, color=color, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("training samples seen")
        ax.set_ylabel(f"{metric} ({'higher' if higher else 'lower'} is better)")
        ax.set_title(task, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def long_curve_plot(table: dict, path: Path, budgets: list[float]) -> None:
    """``--long``: each task's main metric against training samples seen, one line per form (every form at a
    budget sees the same samples with the same parameters); the domain task's binding accuracy beside it, with
    chance drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(task, *MAIN_METRIC[task]) for task in table]
    panels += [(task, *BINDING_METRIC[task]) for task in table if task in BINDING_METRIC]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    for ax, (task, metric, higher) in zip(axes[0], panels, strict=True):
        entries = table[task]
        forms = [n for n in entries if not split_budget(n)[1] and n != "base"]
        for k, form in enumerate(forms):
            pts = sorted(
                (e["samples_trained"], *e[metric])
                for b in budgets
                if (e := entries.get(form + budget_suffix(b))) is not None and metric in e
            )
            if pts:
                x, y, err = zip(*pts, strict=True)
                style = "-" if form.startswith("LoRA r=") and "modulated" not in form else "--"
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, ls=style, label=form, color=f"C{k}")
        if metric == "color_acc":
            ax.axhline(BINDING_CHANCE, color="0.5", ls=":", label="chance")
            ax.axhline(3 * BINDING_CHANCE, color="0.7", ls=":", label="3x chance")
        ax.set_xscale("log")
        ax.set_xlabel("training samples seen")
        ax.set_ylabel(f"{metric} ({'higher' if higher else 'lower'} is better)")
        ax.set_title(f"{task}: {metric}", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def side_by_side(out: Path, rows: list[Row], done: dict, per_prompt: int, tiles: int = 32) -> None:
    """Per task and seed: each method's evaluation images (same prompts, same seeds) as one labelled row: the
    first ``tiles`` ones; for post, the first half of each of its two halves (source, colour-named)."""
    from PIL import Image, ImageDraw

    from tsm.images import make_grid, to_pil

    groups: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        if r.key in done and eval_png(out, r).is_file():
            groups.setdefault((r.task, r.seed), []).append(r)
    sizes = {task: len(eval_set(task, per_prompt)[0]) for task, _ in groups}  # images per evaluation PNG
    for (task, seed), members in groups.items():
        n = sizes[task]
        index = list(range(min(tiles, n)))
        if task == "post":  # tiles // 2 source prompts, then tiles // 2 colour-named ones
            index = index[: tiles // 2] + list(range(n // 2, n // 2 + tiles // 2))
        scale, label_w = 3, max(190, 8 + 6 * max(len(r.name) for r in members))
        canvas = Image.new("RGB", (label_w + len(index) * 8 * scale, len(members) * 8 * scale), "white")
        draw = ImageDraw.Draw(canvas)
        for k, r in enumerate(members):
            images = read_eval_png(eval_png(out, r), n)[index]
            strip = make_grid([to_pil(x) for x in images], columns=len(index), pad=0)
            canvas.paste(
                strip.resize((len(index) * 8 * scale, 8 * scale), Image.NEAREST), (label_w, k * 8 * scale)
            )
            draw.text((4, k * 8 * scale + 6), r.name, fill="black")
        canvas.save(out / f"grid_{task}_seed{seed}.png")


# ---------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="tsm bench digits", description=__doc__.split("\n")[0])
    p.add_argument(
        "--out", default=None, help="results folder (default results/digits, --long: results/digits_long)"
    )
    p.add_argument("--full", action="store_true", help="n = 2, 4, 8 and the ablations (quick mode: n = 4)")
    p.add_argument(
        "--long",
        action="store_true",
        help="the long budgets: the equal LoRA and every competing form at n = 4, at 1x, 4x and 16x the steps",
    )
    p.add_argument(
        "--long-n", type=int, nargs="+", default=None, help="--long: the expert counts (default 4)"
    )
    p.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=None,
        help="--long: the budgets, times --steps (default 1 4 16)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument(
        "--tasks",
        nargs="+",
        choices=TASKS,
        default=None,
        help="default: all (--long: domain, appearance, post)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="ROW",
        help="run only the rows of these names (as in results.md, e.g. 'LoRA r=16, 4x steps @16x')",
    )
    p.add_argument("--steps", type=int, default=None, help="steps per expert (default 60)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--eval-per-prompt", type=int, default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--base", default=None, help="base model folder (default: the shipped one)")
    p.add_argument(
        "--few-step",
        action="store_true",
        help="the few-step rows instead (distillation, Glance): tsm bench digits-fast, into OUT/fast",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--few-step" in argv:  # every other option is digits-fast's own (see `tsm bench digits-fast --help`)
        from tsm.bench.digits_fast import main as few_step

        rest, out = [a for a in argv if a != "--few-step"], "results/digits"
        if "--out" in rest:
            i = rest.index("--out")
            out, rest = rest[i + 1], rest[:i] + rest[i + 2 :]
        return few_step(["--out", str(Path(out) / "fast"), *rest])
    args = p.parse_args(argv)
    budget = Budget()
    for key, value in (
        ("steps", args.steps),
        ("batch", args.batch),
        ("eval_per_prompt", args.eval_per_prompt),
    ):
        if value is not None:
            budget = replace(budget, **{key: value})
    if args.steps is not None:
        budget = replace(budget, assemble_steps=args.steps)
    seeds = args.seeds or [0, 1, 2]  # >= 3 seeds in every mode: the verdicts are paired over them
    if os.cpu_count() and args.workers > os.cpu_count():
        raise TsmError(f"--workers {args.workers} is more than the {os.cpu_count()} CPU cores")
    if args.long and args.full:
        raise TsmError("--long and --full are two different sets of rows: run them one at a time")
    if not args.long and (args.long_n or args.budgets):
        raise TsmError("--long-n and --budgets set the rows of --long: add --long")
    if any(n < 2 for n in args.long_n or []) or any(b <= 0 for b in args.budgets or []):
        raise TsmError("--long-n takes expert counts >= 2 and --budgets positive multiples of --steps")
    out = args.out or ("results/digits_long" if args.long else "results/digits")
    tasks = args.tasks or (list(LONG_TASKS) if args.long else list(TASKS))
    cfg = BenchConfig(out, args.full, seeds, tasks, budget, args.workers, args.base, long=args.long)
    if args.long_n:
        cfg.long_ns = sorted(set(args.long_n))
    if args.budgets:
        cfg.budgets = sorted(set(args.budgets))
    if args.only:
        names = list(dict.fromkeys(r.name for r in cfg.rows()))
        unknown = [n for n in args.only if n not in names]
        if unknown:
            raise TsmError(
                f"--only: no row named {unknown[0]!r} in this run's {len(names)} rows (e.g. {names[1]!r}); "
                "names are as results.md writes them, one quoted argument each"
            )
        cfg.only = list(args.only)
    return run(cfg)


if __name__ == "__main__":
    main()
