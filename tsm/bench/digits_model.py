"""The digits benchmark's base model: a tiny text-conditioned diffusers UNet in pixel space (3 x 8 x 8).

A `UNet2DConditionModel` plus a tiny `CLIPTextModel` over the benchmark's own word-level vocabulary,
pretrained on the *source* domain (real 8x8 digits in random colours, prompts naming only the digit).
The shipped weights (``assets/digits_base/``, diffusers layout) are reproduced by

    python -m tsm.bench.digits_model --out tsm/models/assets/digits_base --steps 2500 --seed 0

The model itself (architecture, tokenizer, `DigitsFamily`) is an ordinary family: `tsm.models.digits`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tsm.bench.digits_data import load_digit_split, make_source_batch
from tsm.models.digits import BASE_DIR, TEXT_CONFIG, UNET_CONFIG, DigitsFamily, tokenize
from tsm.objectives import DDPMObjective

__all__ = ["BASE_DIR", "DigitsFamily", "base_available", "build_base", "pretrain_base"]

CAPTION_DROPOUT = 0.1  # pretraining drops the prompt this often, for classifier-free guidance


def build_base(
    seed: int = 0, prediction_type: str = "epsilon", beta_schedule: str = "squaredcos_cap_v2"
) -> tuple[nn.Module, nn.Module, Any]:
    """A randomly initialised (UNet, text encoder, DDPM scheduler)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction_type
    )
    return unet, text, scheduler


def pretrain_base(
    out: str | Path,
    steps: int = 2500,
    batch: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    prediction_type: str = "epsilon",
    beta_schedule: str = "squaredcos_cap_v2",
) -> Path:
    """Pretrain the base model on the source domain and save it in diffusers layout to ``out``."""
    out = Path(out)
    unet, text, scheduler = build_base(seed, prediction_type, beta_schedule)
    objective = DDPMObjective(scheduler.alphas_cumprod, prediction_type)
    images, labels = load_digit_split("train")
    params = [*unet.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    unet.train()
    text.train()
    t0, losses = time.perf_counter(), []
    bar = tqdm(range(steps), desc="pretraining the digits base", disable=not progress)
    for _ in bar:
        pixels, prompts = make_source_batch(images, labels, batch, g)
        drop = torch.rand(batch, generator=g) < CAPTION_DROPOUT
        prompts = ["" if d else p for d, p in zip(drop.tolist(), prompts, strict=True)]
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(pixels.shape, generator=g)
        pred = unet(
            objective.noisy(pixels, noise, t), t, encoder_hidden_states=text(tokenize(prompts))[0]
        ).sample
        loss = objective.loss(pred, pixels, noise, t).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    unet.save_pretrained(out / "unet")
    text.save_pretrained(out / "text_encoder")
    scheduler.save_pretrained(out / "scheduler")
    info = {
        "command": f"python -m tsm.bench.digits_model --out {out} --steps {steps} --batch {batch} --lr {lr} --seed {seed}",
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "seed": seed,
        "final_loss_mean_last_100": sum(losses[-100:]) / len(losses[-100:]),
        "seconds": round(time.perf_counter() - t0, 1),
        "torch_threads": torch.get_num_threads(),
    }
    (out / "pretrain.json").write_text(json.dumps(info, indent=2))
    return out


def base_available(path: str | Path = BASE_DIR) -> bool:
    path = Path(path)
    return all((path / sub).is_dir() for sub in ("unet", "text_encoder", "scheduler"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Pretrain the digits benchmark's base model on the source domain."
    )
    p.add_argument("--out", default=str(BASE_DIR))
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(pretrain_base(args.out, args.steps, args.batch, args.lr, args.seed))


if __name__ == "__main__":
    main()
