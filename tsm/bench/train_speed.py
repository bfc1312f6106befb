"""Training throughput of `tsm train` against the loop of diffusers' `train_text_to_image_lora.py`.

    python -m tsm.bench.train_speed [--steps 30] [--batch 16]

Both run in this process, one after the other, on the same tiny SD1.5-layout model (random weights,
written with save_pretrained and loaded back with from_pretrained) and the same local image folder
(real digits). The diffusers script itself cannot run here (it imports torchvision, which has no CPU build
on these machines, and `datasets`), so `diffusers_loop` reproduces its training step line for line:
`unet.add_adapter(LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian", target_modules=[to_k, to_q,
to_v, to_out.0]))`, VAE encoding of every batch, the frozen text encoder, `noise_scheduler.add_noise`,
MSE, `clip_grad_norm_`, AdamW, with a shuffled DataLoader and the script's resize/crop/normalise.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"


def write_tiny_sd15(path: str | Path, seed: int = 0) -> Path:
    """A tiny random SD1.5-layout model (unet/, vae/, text_encoder/, tokenizer/, scheduler/) at ``path``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in LETTERS:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for name, part in (("unet", unet), ("vae", vae), ("text_encoder", text), ("tokenizer", tokenizer)):
        part.save_pretrained(path / name)
    scheduler.save_pretrained(path / "scheduler")
    return path


class _Folder(torch.utils.data.Dataset):
    """The script's preprocessing without torchvision: resize (bilinear), center crop, to [-1, 1]."""

    def __init__(self, root: Path, resolution: int, tokenizer: object) -> None:
        self.files = sorted(root.glob("*.png"))
        self.resolution, self.tokenizer = resolution, tokenizer

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        image = Image.open(self.files[i]).convert("RGB").resize((self.resolution,) * 2, Image.BILINEAR)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1
        caption = self.files[i].with_suffix(".txt").read_text()
        ids = self.tokenizer(
            caption,
            max_length=self.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids[0]
        return {"pixel_values": pixels, "input_ids": ids}


def diffusers_loop(model: Path, data: Path, steps: int, batch: int, rank: int, resolution: int) -> float:
    """Steps per second of the diffusers LoRA script's training loop (after 3 warm-up steps)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_layers, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    loader = torch.utils.data.DataLoader(_Folder(data, resolution, tokenizer), shuffle=True, batch_size=batch)
    unet.train()
    done, t0 = 0, 0.0
    while done < steps + 3:
        for b in loader:
            if done == 3:
                t0 = time.perf_counter()
            latents = vae.encode(b["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],)
            ).long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(b["input_ids"], return_dict=False)[0]
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lora_layers, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            if done == steps + 3:
                break
    return steps / (time.perf_counter() - t0)


def tsm_train(
    model: Path, data: Path, out: Path, steps: int, batch: int, rank: int, resolution: int, **kw: object
) -> float:
    """Steps per second of `tsm train`: its own it/s over the whole loop (first steps included, so it is a little pessimistic)."""
    from tsm.config import load_config
    from tsm.recipes.run import train

    overrides = [
        "model.family=sd15",
        f"model.path={model}",
        f"data.path={data}",
        f"data.resolution={resolution}",
        f"experts.rank={rank}",
        f"experts.alpha={rank}",
        "experts.text_targets=[]",  # the diffusers script trains the UNet's LoRA only
        f"train.steps={steps}",
        f"train.batch_size={batch}",
        f"train.checkpoint_every={steps}",
        f"train.output_dir={out}",
        "train.validation_steps=1",
        "train.validation_seeds=[0]",
        *[f"{k.replace('__', '.')}={v}" for k, v in kw.items()],
    ]
    summary = train(load_config(None, overrides))
    return summary["it_per_s"]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m tsm.bench.train_speed", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tsm.data import write_digits_image_folder

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_tiny_sd15(tmp / "model")
        data = write_digits_image_folder(tmp / "data", n=256, size=args.resolution)
        common = dict(steps=args.steps, batch=args.batch, rank=args.rank, resolution=args.resolution)
        rows = [
            ("diffusers train_text_to_image_lora.py loop (PEFT LoRA)", diffusers_loop(model, data, **common)),
            (
                "tsm train method=lora, latent cache off",
                tsm_train(model, data, tmp / "a", train__method="lora", data__cache=False, **common),
            ),
            (
                "tsm train method=lora, latent cache on",
                tsm_train(model, data, tmp / "b", train__method="lora", **common),
            ),
            (
                "tsm train method=foster (8, 1), cache on",
                tsm_train(model, data, tmp / "c", train__method="foster", **common),
            ),
        ]
    ref = rows[0][1]
    table = [{"run": name, "it_per_s": ips, "vs_diffusers": ips / ref} for name, ips in rows]
    print(
        f"\n{args.steps} steps at batch {args.batch}, rank {args.rank}, {args.resolution}px, {args.threads} thread(s)\n"
    )
    print("| run | it/s | ÷ diffusers loop |\n|---|---:|---:|")
    for r in table:
        print(f"| {r['run']} | {r['it_per_s']:.2f} | {r['vs_diffusers']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))
    return table


if __name__ == "__main__":
    main()
