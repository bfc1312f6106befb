"""Peak memory of a training step with and without ``model.storage_dtype`` and ``train.offload_inactive``.

    python -m tsm.bench.memory [--model WAN22_FOLDER] [--steps 3] [--dim 768] [--layers 6]

Each option set runs in a fresh process: the model is built as `tsm train` builds it (`tsm.recipes.run.build`,
bf16 base, experts float32), the peak is reset, ``--steps`` fostering steps run (gradient checkpointing on, as the packaged configs) on one 5-frame clip per
micro-batch, and the peak is read: ``torch.cuda.max_memory_allocated`` on a GPU, the process's peak resident
memory (VmHWM, reset through /proc/self/clear_refs; glibc told to give freed tensors back) minus its memory
before the model was loaded on a CPU.
Printed as MiB and as ratios to the bf16 baseline. Without ``--model`` a random Wan 2.2 folder (two
transformers of ``--layers`` blocks of width ``--dim``, a tiny UMT5 and VAE) is written with save_pretrained.

On a CPU the offload moves the inactive transformer from "the device" to the CPU, i.e. nowhere: its ratio is
1 there by construction; it is measured on a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

OPTIONS = {  # name -> config overrides
    "bf16 (baseline)": [],
    "model.storage_dtype=float8_e4m3fn": ["model.storage_dtype=float8_e4m3fn"],
    "train.offload_inactive=true": ["train.offload_inactive=true"],
    "both": ["model.storage_dtype=float8_e4m3fn", "train.offload_inactive=true"],
}
LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"
# glibc: every allocation above 64 KiB its own mapping, unmapped when freed, so that the CPU's resident memory
# follows the live tensors (a weight cast to float8 gives its bf16 copy back) instead of the heap's high mark
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def write_wan22(path: Path, dim: int = 768, layers: int = 6) -> Path:
    """A random Wan 2.2 T2V folder (WanPipeline.save_pretrained, bf16): two transformers of ``layers`` blocks
    of width ``dim`` (64-d heads, FFN 4 x dim), boundary_ratio 0.875; a tiny UMT5, T5 tokenizer and VAE."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    def transformer(seed: int) -> WanTransformer3DModel:
        torch.manual_seed(seed)
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=dim // 64, attention_head_dim=64, in_channels=4,
            out_channels=4, text_dim=32, freq_dim=64, ffn_dim=4 * dim, num_layers=layers, rope_max_seq_len=32,
        ).to(torch.bfloat16)  # fmt: skip

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)  # fmt: skip
    text = UMT5EncoderModel(
        UMT5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    )
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + ch, -1.0) for ch in LETTERS] + [(ch, -2.0) for ch in LETTERS]
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    WanPipeline(
        tokenizer=T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=16), text_encoder=text, vae=vae,
        scheduler=scheduler, transformer=transformer(0), transformer_2=transformer(1), boundary_ratio=0.875,
    ).save_pretrained(path)  # fmt: skip
    return path


def write_clips(root: Path, n: int = 2, frames: int = 5, size: int = 32) -> Path:
    """``n`` random clips of ``frames`` PNG frames with a caption each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(n):
        clip = root / f"clip{k}"
        clip.mkdir(parents=True)
        for f in range(frames):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(clip / f"{f:03d}.png")
        (root / f"clip{k}.txt").write_text("a clip")
    return root


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(model: Path, clips: Path, overrides: list[str], steps: int, out: Path) -> dict[str, float]:
    """One option set in this process: build, reset the peak, ``steps`` fostering steps, read the peak (MiB)."""
    from tsm.config import load_config
    from tsm.data import load_dataset
    from tsm.recipes.base import weight_dtype
    from tsm.recipes.lora_foster import LoraFosterRecipe
    from tsm.recipes.run import build, make_accelerator

    cuda = torch.cuda.is_available()
    cfg = load_config("wan22_pair", [
        f"model.path={model}", f"data.path={clips}", "data.resolution=32", "data.num_frames=5", "data.cache=false",
        "experts.rank=4", "experts.alpha=4", "train.batch_size=2", "train.grad_accum=2", f"train.steps={steps}",
        "train.high_noise_fraction=0.5", "train.gradient_checkpointing=true", "train.log_with=none",
        f"train.output_dir={out}", *overrides,
    ])  # fmt: skip
    before = _rss_mib("VmRSS")
    acc = make_accelerator(cfg, out)
    c = build(cfg, acc.device, weight_dtype(cfg))
    recipe = LoraFosterRecipe(cfg, c, load_dataset(cfg.data, video=True, seed=0), None, acc)
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    losses = [recipe.step(step)["loss"] for step in range(steps)]
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mib("VmHWM") - before
    return {"peak_mib": peak, "loss": losses[-1]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tsm.bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a Wan 2.2 folder (default: a random one is written)")
    parser.add_argument("--steps", type=int, default=3, help="training steps measured per option set")
    parser.add_argument("--dim", type=int, default=768, help="the written transformers' width")
    parser.add_argument("--layers", type=int, default=6, help="the written transformers' blocks")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one option set, JSON on stdout
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.child is not None:
            spec = json.loads(args.child)
            print(json.dumps(measure(Path(spec["model"]), Path(spec["clips"]), spec["overrides"], args.steps,
                                     root / "run")))  # fmt: skip
            return
        model = Path(args.model) if args.model else write_wan22(root / "wan22", args.dim, args.layers)
        clips = write_clips(root / "clips")
        where = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU (peak RSS)"
        print(f"peak memory of {args.steps} training steps, {where}; model {model}")
        rows = {}
        for name, overrides in OPTIONS.items():
            child = json.dumps({"model": str(model), "clips": str(clips), "overrides": overrides})
            done = subprocess.run(
                [sys.executable, "-m", "tsm.bench.memory", "--steps", str(args.steps), "--child", child],
                capture_output=True, text=True, env={**os.environ, **MALLOC},
            )  # fmt: skip
            if done.returncode:
                raise SystemExit(f"{name}: {done.stderr.strip().splitlines()[-1]}")
            rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
        base = rows["bf16 (baseline)"]["peak_mib"]
        print("| option | peak MiB | ratio to bf16 | last loss |\n|---|---|---|---|")
        for name, row in rows.items():
            print(f"| {name} | {row['peak_mib']:.0f} | {row['peak_mib'] / base:.2f} | {row['loss']:.4f} |")


if __name__ == "__main__":
    main()
