"""Tiny random models written in diffusers layout (save_pretrained), for the from_pretrained code paths.

``write_tiny_model("sd15", path)`` writes unet/, vae/, text_encoder/, tokenizer/, scheduler/ and a
model_index.json, as a user's SD1.5 folder would be laid out; likewise pixart, sd3, video3d, flux and qwen.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import (
    tiny_clip_text,
    tiny_clip_text_with_projection,
    tiny_flux,
    tiny_flux_vae,
    tiny_pixart,
    tiny_qwen_text,
    tiny_qwen_transformer,
    tiny_qwen_vae,
    tiny_sd3,
    tiny_t5,
    tiny_unet2d,
    tiny_unet3d,
    tiny_vae,
)

LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"


def clip_tokenizer():
    """A character-level CLIP tokenizer (every letter a token): real tokenization code, a 74-token vocabulary."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in LETTERS:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + ch, -1.0) for ch in LETTERS] + [(ch, -2.0) for ch in LETTERS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=16)


def qwen_tokenizer():
    """A byte-level BPE Qwen2Tokenizer trained on Qwen-Image's prompt template: every template word is one token,
    as in the real vocabulary (so the template prefix is the 34 tokens the pipeline drops); other words fall
    back to bytes. Special tokens <|endoftext|>, <|im_start|>, <|im_end|> are ids 0, 1, 2; < 400 ids in all."""
    import json

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from tsm.models.qwen import Qwen

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(  # Qwen2Tokenizer's own pre-tokenizer
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=1000,  # more than the template needs: training stops when every word is one token
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([Qwen.prompt_template.format("a cat")], trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return Qwen2Tokenizer(
        vocab=model["vocab"], merges=merges, additional_special_tokens=special[1:], model_max_length=64
    )


def _scheduler_ddpm():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000
    )


def write_tiny_model(family: str, path: str | Path) -> Path:
    """Write a tiny random model of ``family`` to ``path`` in diffusers layout; returns the path."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    path = Path(path)
    parts: dict[str, object] = {"vae": tiny_vae()}
    # FLUX.1-dev's and Qwen-Image's scheduler configs: sigmas shifted by mu from the image token count
    resolution_shift = dict(use_dynamic_shifting=True, base_shift=0.5, base_image_seq_len=256)
    if family == "sd15":
        parts.update(unet=tiny_unet2d(), text_encoder=tiny_clip_text(), tokenizer=clip_tokenizer())
        parts["scheduler"] = _scheduler_ddpm()
    elif family == "video3d":
        parts.update(unet=tiny_unet3d(), text_encoder=tiny_clip_text(), tokenizer=clip_tokenizer())
        parts["scheduler"] = _scheduler_ddpm()
    elif family == "pixart":
        parts.update(transformer=tiny_pixart(), text_encoder=tiny_t5(), tokenizer=t5_tokenizer())
        parts["scheduler"] = _scheduler_ddpm()
    elif family == "sd3":
        parts.update(
            transformer=tiny_sd3(),  # joint_attention_dim 64 = T5 width >= the two CLIP widths (32 + 32)
            text_encoder_3=tiny_t5(d_model=64),
            text_encoder=tiny_clip_text_with_projection(0),
            text_encoder_2=tiny_clip_text_with_projection(1),
            tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer(),
            tokenizer_3=t5_tokenizer(),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        )
    elif family == "flux":
        parts.update(
            transformer=tiny_flux(),  # joint_attention_dim 32 = the T5 width, pooled_projection_dim the CLIP one
            vae=tiny_flux_vae(),
            text_encoder=tiny_clip_text(0),
            text_encoder_2=tiny_t5(1),
            tokenizer=clip_tokenizer(),
            tokenizer_2=t5_tokenizer(),
            scheduler=FlowMatchEulerDiscreteScheduler(
                shift=3.0, max_shift=1.15, max_image_seq_len=4096, **resolution_shift
            ),
        )
    elif family == "qwen":
        parts.update(
            transformer=tiny_qwen_transformer(),
            vae=tiny_qwen_vae(),
            text_encoder=tiny_qwen_text(),
            tokenizer=qwen_tokenizer(),
            scheduler=FlowMatchEulerDiscreteScheduler(
                shift=1.0, max_shift=0.9, max_image_seq_len=8192, shift_terminal=0.02, **resolution_shift
            ),
        )
    else:
        raise ValueError(family)
    index = {"_class_name": "tiny-" + family}
    for name, part in parts.items():
        part.save_pretrained(path / name)
        index[name] = [type(part).__module__.split(".")[0], type(part).__name__]
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def write_digit_clips(root: str | Path, n: int = 4, frames: int = 3, size: int = 16) -> Path:
    """Clips of real digits (scikit-learn's 8x8 set) drifting one pixel per frame, as frame folders + captions."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = Path(root)
    for k in range(n):
        clip = root / f"clip{k:03d}"
        clip.mkdir(parents=True)
        image = (digits.images[k] / 16 * 255).astype(np.uint8)
        for f in range(frames):
            frame = (
                Image.fromarray(np.roll(image, f, axis=1)).resize((size, size), Image.NEAREST).convert("RGB")
            )
            frame.save(clip / f"{f:03d}.png")
        (root / f"clip{k:03d}.txt").write_text(f"a moving digit {digits.target[k]}")
    return root


# ---------------------------------------------------------------------------------------------------------
# subprocess runs
# ---------------------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]


def subprocess_env() -> dict:
    """The environment of a `tsm` child process: this checkout on the path, one thread, no GPU."""
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def kill_when(cmd: list[str], target: Path, timeout: float = 120) -> None:
    """Start ``cmd`` and SIGKILL it as soon as ``target`` exists (or it ends, or ``timeout`` passes)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


# ---------------------------------------------------------------------------------------------------------
# Wan (WanPipeline layout)
# ---------------------------------------------------------------------------------------------------------
def tiny_wan_transformer(seed: int = 0, channels: int = 4):
    """A 2-block WanTransformer3DModel: 2x2 patches of ``channels`` latent channels, 32-d text (the tiny UMT5's
    width)."""
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=channels,
        out_channels=channels,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
    )


def tiny_umt5():
    """A 2-layer UMT5 encoder of width 32 (seed 0)."""
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    config = UMT5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    return UMT5EncoderModel(config).eval()


def wan_unipc(flow_shift: float):
    """The UniPC flow scheduler of Wan's Diffusers folders (their scheduler_config.json) at ``flow_shift``."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift, num_train_timesteps=1000,
        solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
    )  # fmt: skip


def write_tiny_wan(path: str | Path, boundary_ratio: float | None = None) -> Path:
    """A tiny random WanPipeline folder saved with WanPipeline.save_pretrained: transformer/, vae/ (x8 space,
    x4 time, as Wan's VAE), text_encoder/ (UMT5), tokenizer/, scheduler/ (Wan 2.1's shipped UniPC config).
    ``boundary_ratio`` adds Wan 2.2's low-noise transformer_2/ (other weights) and the pipeline's boundary."""
    import torch
    from diffusers import AutoencoderKLWan, WanPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.8, 1.2, 2.0],
    )
    pipe = WanPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=tiny_umt5(),
        vae=vae,
        scheduler=wan_unipc(flow_shift=3.0),  # Wan2.1-T2V-1.3B-Diffusers' scheduler_config.json
        transformer=tiny_wan_transformer(0),
        transformer_2=tiny_wan_transformer(1) if boundary_ratio is not None else None,
        boundary_ratio=boundary_ratio,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def write_tiny_wan_ti2v(path: str | Path) -> Path:
    """A tiny random Wan 2.2 TI2V-5B folder (WanPipeline.save_pretrained, ``expand_timesteps: true``): one
    transformer of 48 latent channels in and out, Wan 2.2's VAE layout (z_dim 48, residual blocks, 2x2 pixel
    patchify of the 12 = 3 x 2 x 2 input channels, x16 space, x4 time; as Wan2.2-TI2V-5B-Diffusers' vae config,
    at widths of 8), per-channel latents_mean/std, UMT5, Wan's UniPC scheduler."""
    import torch
    from diffusers import AutoencoderKLWan, WanPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 1, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
        patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
        latents_mean=[0.05 * (k % 7 - 3) for k in range(48)], latents_std=[0.8 + 0.05 * (k % 9) for k in range(48)],
    )  # fmt: skip
    pipe = WanPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=tiny_umt5(),
        vae=vae,
        scheduler=wan_unipc(flow_shift=5.0),  # Wan2.2-TI2V-5B-Diffusers' scheduler_config.json
        transformer=tiny_wan_transformer(0, channels=48),
        expand_timesteps=True,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------
# SDXL
# ---------------------------------------------------------------------------------------------------------
def tiny_sdxl_unet():
    """An SDXL UNet ("text_time" added conditioning): cross-attention on the two CLIP widths side by side
    (32 + 32), added embedding of 6 time ids x 8 + the pooled projection 32."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=32,
    )


def write_tiny_sdxl(path: str | Path, force_zeros_for_empty_prompt: bool = True) -> Path:
    """A tiny random StableDiffusionXLPipeline folder, written by the pipeline's own save_pretrained (so its
    model_index.json is the real one): unet/, vae/, text_encoder/ (CLIPTextModel), text_encoder_2/
    (CLIPTextModelWithProjection), tokenizer/, tokenizer_2/, scheduler/ (SDXL's Euler config)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(  # stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(scaling_factor=0.13025),
        text_encoder=tiny_clip_text(0),
        text_encoder_2=tiny_clip_text_with_projection(1),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=tiny_sdxl_unet(),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    pipe.save_pretrained(path)
    return Path(path)
