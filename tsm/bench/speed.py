"""Speed of timestep experts next to a plain LoRA, PEFT LoRA and the base model, timed side by side.

``python -m tsm.bench.speed [--quick] [--json PATH]`` builds random ``UNet2DConditionModel``s (a tiny one,
and one with Stable Diffusion widths, trimmed to two levels on CPU) and, in one process, runs every variant
of a group once per round, round after round, after a warm-up; it reports each variant's median time.

training step: forward + backward + gradient clipping + fused AdamW (as tsm.recipes.run uses),
a different t for every sample
    foster     experts with scales (8, 1), fostering: the batch is split over experts (a mixed batch);
               losses weighted by `expert_loss_weights`, gradients clipped by `clip_grad_norm_per_expert`
    lora       our experts with scales (1,): a plain LoRA of the same rank (one expert, plain matmuls)
    peft       PEFT LoRA on the same targets
sampling step: eval + no_grad, one t for the whole batch (as a sampler calls the model)
    base       the model without adapters
    merged     fostered experts: the core expert of t stays merged into the base weight
    switch     t alternates between two core intervals, so every call unmerges and merges: the cost of the
               first call of each interval while sampling
    assemble   assembling stage: merged core + one gated context expert, non-zero routers
    peft       PEFT LoRA, unfused
    copy       an identical copy of the base model: base / copy shows how noisy this run's timings are
sampling loop: a mid-size UNet (widths 64/128, 16x16 latents, batch 2), the 20 timesteps of a DDIM sampler
    merged     fostered experts (8, 1), hard routing: merged core, and the fast path (the expert layers call
               their base layer directly while the interval stays the same)
    full       the same, with the fast path off: every layer runs its wrapper's forward every call
    smooth     smooth routing: the blend of two experts changes every step, so every step merges anew
    shared     hard routing plus a shared expert of rank 4 (merged with the core)
    peft       PEFT LoRA fused into the base weights (merge()): the reference for a merged adapter
    copy       an identical copy of the base model (timing noise)

The ratio is ours / reference; a target is the design's bound on it, and "ok?" says whether this run met
it. Timings on a shared CPU are noisy: rounds interleave the variants so that noise hits them alike, and
on CPU torch runs one thread unless ``--threads`` says otherwise (with several, other processes on a small
machine make OpenMP threads wait on each other and timings swing by 10x).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn

import tsm

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK = 4
FOSTER_SCALES = (8, 1)


@dataclass(frozen=True)
class BenchModel:
    """A random UNet2DConditionModel and the batch it is timed on."""

    name: str
    widths: tuple[int, ...]  # block_out_channels; every level but the last has cross-attention
    context_dim: int  # cross_attention_dim (768 as in SD 1.x)
    latent: int  # latent height = width
    batch: int
    text_len: int  # length of encoder_hidden_states
    groups: int  # norm_num_groups
    repeats: int  # timed rounds; the median is reported
    quick_repeats: int  # timed rounds with --quick
    warmup: int = 2  # untimed rounds first (allocations, AdamW state, the first merge)


TINY = BenchModel("tiny", (32, 64), 32, 16, 4, 8, 8, repeats=30, quick_repeats=8)
# SD 1.x widths and text size, trimmed to the first two levels: the full (320, 640, 1280, 1280) takes ~4 s a
# training step on one CPU thread and 2.3 GB a copy; at 16x16 latents its 1280 levels are 4x4 and 2x2 anyway.
SD_CPU = BenchModel(
    "sd-widths (320, 640)", (320, 640), 768, 16, 2, 77, 32, repeats=15, quick_repeats=3, warmup=1
)
# the sampling-loop case: small enough that a per-layer wrapper or a per-call hook shows in the ratio
MID = BenchModel("mid (64, 128)", (64, 128), 64, 16, 2, 16, 32, repeats=9, quick_repeats=3, warmup=1)
SAMPLING_STEPS = 20
SD_GPU = BenchModel(
    "sd-widths (320, 640, 1280, 1280)",
    (320, 640, 1280, 1280),
    768,
    32,
    4,
    77,
    32,
    repeats=20,
    quick_repeats=5,
)


@dataclass
class Row:
    model: str
    measurement: str
    ours_ms: float
    reference_ms: float
    target: float | None  # upper bound on the ratio; None: shown for reference only

    @property
    def ratio(self) -> float:
        return self.ours_ms / self.reference_ms

    @property
    def ok(self) -> str:
        if self.target is None:
            return "—"
        return "yes" if self.ratio <= self.target else "NO"


# ----------------------------------------------------------------------------------------------------
# models and steps
# ----------------------------------------------------------------------------------------------------
def build_unet(cfg: BenchModel, device: torch.device) -> UNet2DConditionModel:
    """A frozen random UNet; the same weights on every call (seeded)."""
    levels = len(cfg.widths)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=cfg.latent,
        in_channels=4,
        out_channels=4,
        block_out_channels=cfg.widths,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=cfg.context_dim,
        attention_head_dim=8,
        norm_num_groups=cfg.groups,
    )
    return unet.to(device).requires_grad_(False)


def with_experts(
    unet: nn.Module, scales: tuple[int, ...], stage: str = "foster", **variant: object
) -> nn.Module:
    spec = tsm.ExpertSpec(scales=scales, rank=RANK, alpha=RANK, targets=TARGETS, **variant)
    return tsm.add_experts(unet, spec, stage=stage)


def with_peft(unet: nn.Module) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    unet = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS), unet)
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)
    return unet


@torch.no_grad()
def randomize(model: nn.Module, std: float = 0.02) -> nn.Module:
    """Non-zero LoRA B (ours and PEFT's) and routers, so that no path could be skipped as zero."""
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name or ".router." in name or "shared_B" in name:
            p.copy_(torch.randn(p.shape, generator=g).to(p.device) * std)
    return model


def make_batch(cfg: BenchModel, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    latent = (cfg.batch, 4, cfg.latent, cfg.latent)
    return {
        "x": torch.randn(latent, generator=g).to(device),
        "noise": torch.randn(latent, generator=g).to(device),
        "context": torch.randn(cfg.batch, cfg.text_len, cfg.context_dim, generator=g).to(device),
        "t": torch.randint(0, 1000, (cfg.batch,), generator=g).to(device),  # one t per sample
    }


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], per_expert: bool) -> Callable[[], None]:
    """One fine-tuning step; ``per_expert``: TSM's per-expert loss weights and clipping (fostering)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step() -> None:
        pred = model(batch["x"], batch["t"], encoder_hidden_states=batch["context"]).sample
        per_sample = (pred - batch["noise"]).square().mean(dim=(1, 2, 3))  # (B,)
        if per_expert:
            (tsm.expert_loss_weights(model) * per_sample).sum().backward()
            tsm.clip_grad_norm_per_expert(model, 1.0)
        else:
            per_sample.mean().backward()
            nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def infer(model: nn.Module, batch: dict[str, torch.Tensor], timesteps: Sequence[int]) -> Callable[[], None]:
    """One denoiser call under no_grad with one t for the whole batch, cycling through ``timesteps``."""
    model.eval()
    device = batch["x"].device
    cycle = itertools.cycle([torch.tensor(t, device=device) for t in timesteps])  # 0-dim, as from a scheduler

    def call() -> None:
        with torch.no_grad():
            model(batch["x"], next(cycle), encoder_hidden_states=batch["context"])

    return call


# ----------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    calls: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Median milliseconds per call of each variant; each round runs every variant once, in rotating order."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            _sync(device)
            start = time.perf_counter()
            calls[name]()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def bench_training(cfg: BenchModel, device: torch.device, repeats: int, warmup: int) -> list[Row]:
    base = build_unet(cfg, device)
    batch = make_batch(cfg, device)
    steps = {
        "foster": train_step(with_experts(copy.deepcopy(base), FOSTER_SCALES), batch, per_expert=True),
        "lora": train_step(with_experts(copy.deepcopy(base), (1,)), batch, per_expert=False),
        "peft": train_step(with_peft(base), batch, per_expert=False),
    }
    ms = time_interleaved(steps, repeats, warmup, device)
    what = f"train step, foster {FOSTER_SCALES} mixed t"
    return [
        Row(cfg.name, f"{what} ÷ plain LoRA (scales (1,))", ms["foster"], ms["lora"], 1.10),
        Row(cfg.name, f"{what} ÷ PEFT LoRA", ms["foster"], ms["peft"], None),
    ]


def bench_inference(cfg: BenchModel, device: torch.device, repeats: int, warmup: int) -> list[Row]:
    base = build_unet(cfg, device)
    batch = make_batch(cfg, device)
    fostered = [randomize(with_experts(copy.deepcopy(base), FOSTER_SCALES)) for _ in range(2)]
    assembled = randomize(with_experts(copy.deepcopy(base), FOSTER_SCALES, stage="assemble"))
    calls = {
        "base": infer(base, batch, [500]),
        "copy": infer(copy.deepcopy(base), batch, [500]),
        "merged": infer(fostered[0], batch, [500]),
        "switch": infer(fostered[1], batch, [100, 900]),  # intervals 0 and 7 in turn
        "assemble": infer(assembled, batch, [500]),
        "peft": infer(randomize(with_peft(copy.deepcopy(base))), batch, [500]),
    }
    ms = time_interleaved(calls, repeats, warmup, device)
    return [
        Row(cfg.name, "base ÷ an identical copy of base (timing noise)", ms["base"], ms["copy"], None),
        Row(cfg.name, "sampling step, merged core ÷ base", ms["merged"], ms["base"], 1.02),
        Row(
            cfg.name, "sampling step after an interval change (merges) ÷ base", ms["switch"], ms["base"], None
        ),
        Row(
            cfg.name, "assembling inference, core + 1 context expert ÷ base", ms["assemble"], ms["base"], 1.15
        ),
        Row(cfg.name, "PEFT unfused LoRA inference ÷ base", ms["peft"], ms["base"], None),
    ]


def sampling_loop(model: nn.Module, batch: dict[str, torch.Tensor], steps: int) -> Callable[[], None]:
    """A sampler's ``steps`` denoiser calls under no_grad: DDIM's timesteps, one t for the whole batch."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    timesteps = [t.to(batch["x"].device) for t in scheduler.timesteps]
    model.eval()

    def run() -> None:
        with torch.no_grad():
            for t in timesteps:
                model(batch["x"], t, encoder_hidden_states=batch["context"])

    return run


def fused_peft(unet: nn.Module) -> nn.Module:
    """PEFT LoRA with non-zero weights, merged into the base weights (what ``pipe.fuse_lora()`` does)."""
    from peft.tuners.lora import LoraLayer

    unet = randomize(with_peft(unet))
    for module in unet.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    return unet


def bench_sampling(cfg: BenchModel, device: torch.device, repeats: int, warmup: int) -> list[Row]:
    base = build_unet(cfg, device)
    batch = make_batch(cfg, device)
    full = randomize(with_experts(copy.deepcopy(base), FOSTER_SCALES))
    tsm.get_routing(full).fast_path = False
    models = {
        "base": base,
        "copy": copy.deepcopy(base),
        "merged": randomize(with_experts(copy.deepcopy(base), FOSTER_SCALES)),
        "full": full,
        "smooth": randomize(with_experts(copy.deepcopy(base), FOSTER_SCALES, routing="smooth")),
        "shared": randomize(with_experts(copy.deepcopy(base), FOSTER_SCALES, shared_rank=RANK)),
        "peft": fused_peft(copy.deepcopy(base)),
    }
    calls = {name: sampling_loop(m, batch, SAMPLING_STEPS) for name, m in models.items()}
    ms = time_interleaved(calls, repeats, warmup, device)
    what = f"{SAMPLING_STEPS}-step sampling loop"
    return [
        Row(
            cfg.name, f"{what}: base ÷ an identical copy of base (timing noise)", ms["base"], ms["copy"], None
        ),
        Row(cfg.name, f"{what}: hard experts, merged + fast path ÷ base", ms["merged"], ms["base"], 1.02),
        Row(cfg.name, f"{what}: hard experts, merged, no fast path ÷ base", ms["full"], ms["base"], None),
        Row(
            cfg.name,
            f"{what}: smooth routing (a new blend merged every step) ÷ base",
            ms["smooth"],
            ms["base"],
            None,
        ),
        Row(cfg.name, f"{what}: shared (r 4) + hard experts, merged ÷ base", ms["shared"], ms["base"], 1.02),
        Row(cfg.name, f"{what}: PEFT LoRA fused into the weights ÷ base", ms["peft"], ms["base"], None),
    ]


def markdown(rows: Sequence[Row]) -> str:
    lines = [
        "| model | measurement | ms (ours) | ms (reference) | ratio | target | ok? |",
        "|---|---|---:|---:|---:|---:|:-:|",
    ]
    for r in rows:
        target = "—" if r.target is None else f"≤ {r.target:.2f}"
        lines.append(
            f"| {r.model} | {r.measurement} | {r.ours_ms:.2f} | {r.reference_ms:.2f} | {r.ratio:.3f} "
            f"| {target} | {r.ok} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(
        prog="python -m tsm.bench.speed", description="Time timestep experts against LoRA, PEFT and the base."
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds (under a minute on 2 CPU cores)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default: 1)")
    parser.add_argument(
        "--sampling-only", action="store_true", help="only the mid-size UNet's sampling-loop table"
    )
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    models = [TINY, SD_GPU if device.type == "cuda" else SD_CPU]
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    rows: list[Row] = []
    start = time.perf_counter()
    for cfg in [] if args.sampling_only else models:
        repeats = cfg.quick_repeats if args.quick else cfg.repeats
        warmup = 1 if args.quick else cfg.warmup
        for bench in (bench_training, bench_inference):
            print(f"  {cfg.name}: {bench.__name__} ({warmup} warm-up + {repeats} rounds)", flush=True)
            rows += bench(cfg, device, repeats, warmup)
    repeats = MID.quick_repeats if args.quick else MID.repeats
    print(f"  {MID.name}: bench_sampling ({MID.warmup} warm-up + {repeats} rounds)", flush=True)
    rows += bench_sampling(MID, device, repeats, MID.warmup)
    print(f"({time.perf_counter() - start:.0f} s)\n\n{markdown(rows)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        results = [asdict(r) | {"ratio": r.ratio, "ok": r.ok} for r in rows]
        meta = {
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "quick": args.quick,
            "sampling_steps": SAMPLING_STEPS,
        }
        args.json.write_text(json.dumps(meta | {"rows": results}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
