"""A smoke demo on scikit-learn's 8x8 digits: timestep experts from start to finish in a few CPU minutes.

``python -m tsm.demo [--out runs/demo] [--steps N]`` (``make demo``):

1. pretrain a tiny class-conditioned ``UNet2DConditionModel`` on the digits (DDPM epsilon loss); the digit
   label is a learned embedding passed as a one-token ``encoder_hidden_states``;
2. fine-tune it by training on the same digits for N more steps, on the same batches, two ways:
   a plain LoRA (``scales=(1,)``), and TSM experts with ``scales=(8, 1)``, all fostered in one run with
   mixed-t batches (`expert_loss_weights`, `clip_grad_norm_per_expert`), then assembled (routers only);
3. print the held-out denoising loss of each model (fixed noise, averaged over one t per core interval),
   save a sample grid of the TSM model (DDIM, rows = digits 0..9), its experts (`tsm.save`) and its core
   expert of interval 0 as a LoRA file (`tsm.export_lora`).

It shows that the pieces run together. It is not a benchmark: "more of the same data" gives experts
nothing to win, and the losses differ by little more than noise.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch import nn
from tqdm.auto import tqdm

import tsm
from tsm.images import make_grid, to_pil
from tsm.objectives import DDPMObjective

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
NUM_CLASSES = 10
LABEL_DIM = 32  # width of the label embedding = cross_attention_dim
HELD_OUT = 297  # digits kept out of training (1797 in all)


# ----------------------------------------------------------------------------------------------------
# data and model
# ----------------------------------------------------------------------------------------------------
def load_digits_split(
    seed: int = 0,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, held_out) pairs of images (N, 1, 8, 8) in [-1, 1] and labels (N,), split at random (seeded)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8 - 1  # pixel values 0..16
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    held, kept = order[:HELD_OUT], order[HELD_OUT:]
    return (images[kept], labels[kept]), (images[held], labels[held])


class Digits(nn.Module):
    """The denoiser and its label embedding. Experts go on ``unet`` (it has the ``timestep`` argument)."""

    def __init__(self) -> None:
        super().__init__()
        self.unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=LABEL_DIM,
            attention_head_dim=2,  # diffusers' legacy name: 2 heads
            norm_num_groups=8,
        )
        self.labels = nn.Embedding(NUM_CLASSES, LABEL_DIM)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        context = self.labels(labels)[:, None]  # (B, 1, LABEL_DIM)
        return self.unet(x, t, encoder_hidden_states=context).sample  # (B, 1, 8, 8): predicted noise


# ----------------------------------------------------------------------------------------------------
# training and evaluation
# ----------------------------------------------------------------------------------------------------
def train(
    model: Digits,
    data: tuple[torch.Tensor, torch.Tensor],
    objective: DDPMObjective,
    steps: int,
    desc: str,
    seed: int,
    lr: float,
    batch: int,
    per_expert: bool = False,
) -> None:
    """AdamW on whatever requires grad. ``per_expert``: fostering, each expert's own mean loss and clipping."""
    images, labels = data
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)  # the same seed gives the same batches, noise and t
    model.train()
    bar = tqdm(range(steps), desc=desc, leave=True)
    shown = None
    for _ in bar:
        idx = torch.randint(0, len(labels), (batch,), generator=g)
        x0, y = images[idx], labels[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = objective.sample_t(batch, generator=g)  # (B,): a different t per sample
        pred = model(objective.noisy(x0, noise, t), t, y)
        per_sample = objective.loss(pred, x0, noise, t)  # (B,)
        if per_expert:
            (tsm.expert_loss_weights(model.unet) * per_sample).sum().backward()
            tsm.clip_grad_norm_per_expert(model.unet, 1.0)
        else:
            per_sample.mean().backward()
            nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = per_sample.mean().item()  # the plain mean in every stage, so that the bars compare
        shown = loss if shown is None else 0.95 * shown + 0.05 * loss
        bar.set_postfix(loss=f"{shown:.4f}")


@torch.no_grad()
def held_out_loss(
    model: Digits, data: tuple[torch.Tensor, torch.Tensor], objective: DDPMObjective, seed: int = 1234
) -> float:
    """Mean epsilon loss on held-out digits at the centre of each of 8 equal t intervals, fixed noise.

    One t for the whole batch, as when sampling: fostered experts run merged.
    """
    images, labels = data
    model.eval()
    T = objective.num_timesteps
    losses = []
    for k in range(8):
        t = torch.tensor((2 * k + 1) * T // 16)  # a scalar, as a sampler passes it
        per_sample_t = t.expand(len(labels))  # (N,)
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed + k))
        pred = model(objective.noisy(images, noise, per_sample_t), t, labels)
        losses.append(objective.loss(pred, images, noise, per_sample_t).mean())
    return float(torch.stack(losses).mean())


@torch.no_grad()
def sample(
    model: Digits, scheduler: DDIMScheduler, per_digit: int, steps: int, seed: int = 0
) -> torch.Tensor:
    """DDIM (Song et al. 2021) samples (10 * per_digit, 1, 8, 8) in [-1, 1]: per_digit of each digit, in order."""
    model.eval()
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_digit)
    x = torch.randn((len(labels), 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    scheduler.set_timesteps(steps)
    for t in tqdm(scheduler.timesteps, desc="sampling", leave=False):
        x = scheduler.step(model(x, t, labels), t, x).prev_sample
    return x.clamp(-1, 1)


def save_grid(images: torch.Tensor, path: Path, columns: int, zoom: int = 4) -> Path:
    tiles = [to_pil(img.expand(3, -1, -1)) for img in images]  # grey -> RGB
    tiles = [tile.resize((tile.width * zoom, tile.height * zoom), resample=0) for tile in tiles]  # nearest
    make_grid(tiles, columns).save(path)
    return path


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tsm.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps, for LoRA and for fostering")
    p.add_argument("--pretrain-steps", type=int, default=400, help="steps of full training of the base model")
    p.add_argument("--assemble-steps", type=int, help="router training steps (default: steps // 3)")
    p.add_argument("--batch", type=int, default=64, help="batch size of every stage")
    p.add_argument(
        "--eval-size", type=int, default=HELD_OUT, help=f"held-out digits to score (<= {HELD_OUT})"
    )
    p.add_argument("--rank", type=int, default=4, help="LoRA rank of every expert and of the plain LoRA")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: best for a tiny model)"
    )
    args = p.parse_args(argv)
    if args.assemble_steps is None:
        args.assemble_steps = max(1, args.steps // 3)
    for name in ("steps", "pretrain_steps", "assemble_steps", "batch", "eval_size", "rank", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.eval_size > HELD_OUT:
        p.error(f"--eval-size must be at most {HELD_OUT} (the held-out digits), got {args.eval_size}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Run the demo; returns {"losses": {model: held-out loss}, "files": {what: path}, "seconds": float}."""
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    train_set, held_out = load_digits_split()
    held_out = (held_out[0][: args.eval_size], held_out[1][: args.eval_size])
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    objective = DDPMObjective.from_scheduler(ddpm)
    common = dict(objective=objective, batch=args.batch)
    print(f"digits: {len(train_set[1])} train, {len(held_out[1])} held out; output in {args.out}")

    # 1. the base model ------------------------------------------------------------------------------
    torch.manual_seed(0)
    base = Digits()
    train(base, train_set, steps=args.pretrain_steps, desc="pretrain base", seed=0, lr=2e-3, **common)
    base.requires_grad_(False)
    rows = [("base (pretrained)", held_out_loss(base, held_out, objective), 0)]

    # 2. plain LoRA and TSM experts, on the same batches ----------------------------------------------
    lora = copy.deepcopy(base)
    tsm.add_experts(lora.unet, tsm.ExpertSpec(scales=(1,), rank=args.rank, targets=TARGETS))
    train(lora, train_set, steps=args.steps, desc="plain LoRA", seed=1, lr=1e-3, **common)
    rows.append(("plain LoRA, scales (1,)", held_out_loss(lora, held_out, objective), trainable(lora)))

    experts = copy.deepcopy(base)
    tsm.add_experts(experts.unet, tsm.ExpertSpec(scales=(8, 1), rank=args.rank, targets=TARGETS))
    fostered = trainable(experts)
    train(
        experts, train_set, steps=args.steps, desc="TSM fostering", seed=1, lr=1e-3, per_expert=True, **common
    )
    rows.append(
        ("TSM 1-stage (fostered; core expert)", held_out_loss(experts, held_out, objective), fostered)
    )

    tsm.set_stage(experts.unet, "assemble")
    train(experts, train_set, steps=args.assemble_steps, desc="TSM assembling", seed=2, lr=1e-3, **common)
    rows.append(
        ("TSM 2-stage (+ assembled routers)", held_out_loss(experts, held_out, objective), trainable(experts))
    )

    print(f"\nheld-out epsilon loss, fixed noise, mean over 8 timesteps ({args.steps} fine-tuning steps)")
    print("| model | held-out loss | trained parameters |\n|---|---:|---:|")
    for name, loss, params in rows:
        print(f"| {name} | {loss:.4f} | {params if params else '— (all, pretraining)'} |")

    # 3. samples and files ---------------------------------------------------------------------------
    files = {}
    ddim = DDIMScheduler.from_config(ddpm.config)
    images = sample(experts, ddim, per_digit=10, steps=25)
    files["samples"] = save_grid(images, args.out / "samples_tsm.png", columns=10)
    files["experts"] = tsm.save(experts.unet, args.out / "experts.safetensors")
    files["core_lora"] = tsm.export_lora(
        experts.unet, args.out / "core_expert_i0_lora.safetensors", scale=0, index=0
    )
    seconds = time.perf_counter() - start
    print(f"\nsample grid (DDIM 25 steps, rows = digits 0..9): {files['samples']}")
    print(f"experts and routers (tsm.load): {files['experts']}")
    print(f"core expert of interval 0, t in [0, 125), as a diffusers LoRA: {files['core_lora']}")
    print(f"done in {seconds:.0f} s")
    return {"losses": {name: loss for name, loss, _ in rows}, "files": files, "seconds": seconds}


if __name__ == "__main__":
    main()
