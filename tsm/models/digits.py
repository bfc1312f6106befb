"""The digits benchmark's model: a tiny text-conditioned diffusers UNet in pixel space (3 x 8 x 8).

A `UNet2DConditionModel` plus a tiny `CLIPTextModel` over a word-level vocabulary ("red 3 on blue",
"digit 3"), pretrained on real 8x8 digits (``python -m tsm.bench.digits_model`` reproduces the shipped
weights in ``assets/digits_base/``). An ordinary family: the same calling convention as SD1.5, an identity
"VAE" (pixel space) and its own tokenizer; ``model.path: ""`` means the shipped weights.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tsm.errors import TsmError, shorten
from tsm.models.base import ATTN, Components, Family
from tsm.models.registry import register

BASE_DIR = Path(__file__).parent / "assets" / "digits_base"
# the sampler chosen on a validation set (python -m tsm.bench.digits_sampler writes it; the table is in it)
SAMPLER_FILE = BASE_DIR / "sampler.json"
# its scheduler names: DDIM (deterministic) or DDPM's ancestral sampler, both on the folder's noise schedule
SCHEDULERS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler"}

# ----------------------------------------------------------------------------------------------------
# vocabulary and tokenizer
# ----------------------------------------------------------------------------------------------------
COLOR_WORDS = ("red", "green", "blue", "yellow", "cyan", "magenta")
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
DIGIT_WORDS = tuple(str(d) for d in range(10))
VOCAB = [PAD, BOS, EOS, "digit", "on", *DIGIT_WORDS, *COLOR_WORDS]
TOKEN_ID = {word: i for i, word in enumerate(VOCAB)}


def tokenize(prompts: list[str], max_length: int = 6) -> torch.Tensor:
    """Token ids (N, max_length): <bos> words <eos>, padded with <pad>. Words must be in VOCAB."""
    ids = torch.full((len(prompts), max_length), TOKEN_ID[PAD], dtype=torch.long)
    for row, text in enumerate(prompts):
        words = text.split()
        unknown = [w for w in words if w not in TOKEN_ID]
        if unknown:
            raise TsmError(
                f"unknown word {unknown[0]!r} in prompt {shorten(text)!r}; the vocabulary is {VOCAB[3:]}"
            )
        if len(words) + 2 > max_length:
            raise TsmError(
                f"prompt {shorten(text)!r} has {len(words)} words; at most {max_length - 2} fit max_length"
            )
        tokens = [TOKEN_ID[BOS], *(TOKEN_ID[w] for w in words), TOKEN_ID[EOS]]
        ids[row, : len(tokens)] = torch.tensor(tokens)
    return ids


def detokenize(ids: torch.Tensor) -> list[str]:
    """The prompts of token ids from `tokenize` (special tokens dropped)."""
    special = {TOKEN_ID[PAD], TOKEN_ID[BOS], TOKEN_ID[EOS]}
    return [" ".join(VOCAB[i] for i in row if i not in special) for row in ids.tolist()]


# ----------------------------------------------------------------------------------------------------
# architecture
# ----------------------------------------------------------------------------------------------------
UNET_CONFIG: dict[str, Any] = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=16,
)
TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=len(VOCAB),
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=8,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    # 20x CLIP's init scale: with the default (std 0.02) every prompt encodes to nearly the same vector after
    # the final layer norm, and the UNet learns to ignore the text within a CPU budget (measured)
    initializer_factor=20.0,
)


@register
class DigitsFamily(Family):
    """Pixel-space digits model: same calling convention as SD1.5, no VAE, the benchmark's tokenizer."""

    name = "digits"
    default_targets = ATTN
    default_text_targets = ["q_proj", "v_proj"]

    @property
    def default_steps(self) -> int:
        return int(_validated_sampler()["steps"])

    @property
    def default_guidance(self) -> float:
        return float(_validated_sampler()["guidance"])

    @property
    def default_scheduler(self) -> str:
        """The sampling scheduler chosen with the steps and guidance: "ddim" or "ddpm" (ancestral)."""
        return str(_validated_sampler().get("scheduler", "ddim"))

    def load(
        self,
        path: str,
        revision: str | None = None,
        prediction_type: str | None = None,
        objective: Mapping[str, Any] | None = None,
    ) -> Components:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        path = str(path or BASE_DIR)  # "": the shipped base model
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        text = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
        scheduler = scheduler_class(self.default_scheduler).from_pretrained(path, subfolder="scheduler")
        for m in (unet, text):
            m.requires_grad_(False)
            m.eval()
        obj = self.objective(scheduler.config, prediction_type, objective)  # with DDIM's x0 clipping
        return Components(self, unet, {"text_encoder": text}, {}, nn.Identity(), scheduler, obj, str(path))

    def encode_prompt(self, c: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        encoder = c.text_encoders["text_encoder"]
        return {"encoder_hidden_states": encoder(tokenize(list(captions)).to(encoder.device))[0]}

    def latent_dist(self, c: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pixels, torch.zeros_like(pixels)

    def scale_latents(self, c: Components, z: torch.Tensor) -> torch.Tensor:
        return z

    def decode(self, c: Components, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)

    def latent_shape(self, c: Components, resolution: int, num_frames: int) -> tuple[int, ...]:
        return (3, 8, 8)


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class of a `SCHEDULERS` name ("ddim" or "ddpm")."""
    import diffusers

    return getattr(diffusers, SCHEDULERS[name])


@functools.cache
def _validated_sampler() -> dict[str, Any]:
    """The (scheduler, steps, guidance) `tsm.bench.digits_sampler` chose on validation data for the shipped
    weights."""
    import json

    if not SAMPLER_FILE.is_file():
        raise TsmError(
            f"{SAMPLER_FILE} is missing; run python -m tsm.bench.digits_sampler to choose the sampler"
        )
    return json.loads(SAMPLER_FILE.read_text())["chosen"]
