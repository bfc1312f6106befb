"""Metrics of the digits benchmark: a digit classifier, FID in its feature space, and exact colour reading.

- `DigitNet` classifies coloured 8x8 digits whatever their colours; trained in seconds on the "train"
  split with random colours (`train_digit_net`), cached as safetensors (`load_or_train_digit_net`).
- `fid` / `class_fid`: the Frechet distance between Gaussians fitted to its 64-d penultimate features
  (FID with DigitNet in place of Inception), over the whole sets or per digit class.
- `measure_colors` reads the foreground and background colour names of an image (rule in its docstring);
  `color_accuracy` scores them against the prompts' colours.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from tsm.bench.digits_data import COLORS, PALETTE_RGB, colorize, load_digit_split, random_color_pairs
from tsm.io import _atomic_save

FEATURE_DIM = 64
STEPS = 800  # Adam steps of batch 128: about 10 s on one CPU thread, >= 0.97 held-out accuracy
NET_FORMAT = "1"  # metadata of cached weights; bump when DigitNet or its training changes
FG_PIXELS = 12  # pixels averaged for the foreground colour (every real digit has 12 at >= half intensity)

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------------------------------
# the digit classifier
# ----------------------------------------------------------------------------------------------------
class DigitNet(nn.Module):
    """A small CNN on (N, 3, 8, 8) images in [-1, 1]: 3 convs, a 64-d feature layer, a 10-way head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 2 * 2, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 64), the space FID is measured in."""
        x = F.relu(self.conv1(x))  # (N, 16, 8, 8)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (N, 32, 4, 4)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # (N, 64, 2, 2)
        return F.relu(self.fc(x.flatten(1)))  # (N, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, 10) logits


def _augmented_colors(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(fg, bg) RGB (n, 3): palette pairs for half the batch, any colours at least 0.4 apart for the rest,
    so the classifier ignores colour also on generated images whose colours are off the palette."""
    fg_i, bg_i = random_color_pairs(n, generator)
    fg, bg = PALETTE_RGB[fg_i], PALETTE_RGB[bg_i]
    free_fg, free_bg = torch.rand(n, 3, generator=generator), torch.rand(n, 3, generator=generator)
    use_free = (torch.rand(n, generator=generator) < 0.5) & ((free_fg - free_bg).norm(dim=1) >= 0.4)
    return torch.where(use_free[:, None], free_fg, fg), torch.where(use_free[:, None], free_bg, bg)


def colorized_split(split: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """(images (N, 3, 8, 8) in [-1, 1], digits (N,), fg names, bg names): a split in random palette colours."""
    gray, labels = load_digit_split(split)
    fg, bg = random_color_pairs(len(labels), torch.Generator().manual_seed(seed))
    images = colorize(torch.from_numpy(gray), PALETTE_RGB[fg], PALETTE_RGB[bg])
    return images, torch.from_numpy(labels), [COLORS[i] for i in fg], [COLORS[i] for i in bg]


def train_digit_net(
    seed: int = 0, steps: int = STEPS, batch_size: int = 128, lr: float = 3e-3, noise: float = 0.05
) -> DigitNet:
    """A `DigitNet` trained with Adam on the "train" split, recoloured at random every step (plus Gaussian
    pixel noise of std ``noise``). Deterministic for a seed; leaves the global RNG as it was."""
    gray, labels = (torch.from_numpy(a) for a in load_digit_split("train"))
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitNet()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        index = torch.randint(len(labels), (batch_size,), generator=generator)
        x = colorize(gray[index], *_augmented_colors(batch_size, generator))  # (B, 3, 8, 8)
        x = x + noise * torch.randn(x.shape, generator=generator)
        loss = F.cross_entropy(net(x), labels[index])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval().requires_grad_(False)


def load_or_train_digit_net(cache_path: PathLike, seed: int = 0, steps: int = STEPS) -> DigitNet:
    """The `DigitNet` cached at ``cache_path`` (safetensors); trained and saved there when the file is
    missing, unreadable, or was trained with another seed, step count or network version."""
    cache_path = Path(cache_path)
    want = {"tsm_digit_net": NET_FORMAT, "seed": str(seed), "steps": str(steps)}
    try:
        with safe_open(str(cache_path), framework="pt") as f:
            metadata = f.metadata() or {}
        if all(metadata.get(k) == v for k, v in want.items()):
            with torch.device("meta"):  # no random init (and no draw from the global RNG) for weights we load
                net = DigitNet()
            net.load_state_dict(load_file(cache_path), assign=True)
            return net.eval().requires_grad_(False)
    except Exception:  # missing, truncated, another format or other shapes: retrain below
        pass
    net = train_digit_net(seed=seed, steps=steps)
    _atomic_save(net.state_dict(), cache_path, want)
    return net


# ----------------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------------
def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T


def frechet_distance(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D), float64:
    |mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^1/2).

    tr((C_a C_b)^1/2) is computed as the sum of square roots of the eigenvalues of the symmetric PSD
    matrix C_a^1/2 C_b C_a^1/2 (same spectrum), which avoids the complex round-off of a general sqrtm.
    """
    a, b = (np.asarray(torch.as_tensor(f).detach().cpu(), dtype=np.float64) for f in (feats_a, feats_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (N >= 2, D) feature sets of one width, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrt_psd(cov_a)
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


@torch.no_grad()
def digit_features(net: DigitNet, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """DigitNet features (N, 64) of images (N, 3, 8, 8) in [-1, 1] (clamped there first)."""
    images = images.float().clamp(-1, 1)
    return torch.cat([net.features(chunk) for chunk in images.split(batch_size)])


def fid(net: DigitNet, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """FID between two image sets in the DigitNet feature space."""
    return frechet_distance(digit_features(net, images_a), digit_features(net, images_b))


def class_fid(
    net: DigitNet,
    images: torch.Tensor,
    digits: Sequence[int] | torch.Tensor,
    ref_images: torch.Tensor,
    ref_digits: Sequence[int] | torch.Tensor,
) -> float:
    """Class-conditional FID: the mean over digit classes of the FID between the images labelled with that
    digit (e.g. generated for prompts naming it) and the reference images of that digit."""
    digits, ref_digits = torch.as_tensor(digits), torch.as_tensor(ref_digits)
    feats, ref_feats = digit_features(net, images), digit_features(net, ref_images)
    classes = [d for d in range(10) if (digits == d).sum() >= 2 and (ref_digits == d).sum() >= 2]
    if not classes:
        raise ValueError("no digit class has at least 2 images in both sets")
    return float(np.mean([frechet_distance(feats[digits == d], ref_feats[ref_digits == d]) for d in classes]))


@torch.no_grad()
def ink(images: torch.Tensor) -> torch.Tensor:
    """Per image (N,): the stroke coverage of a digit on a plain background, the fraction of pixels farther
    from the background colour (the median of the border pixels) than half the farthest pixel (about 0.29
    for real digits, 0.44 bold). The background's colour, not the luminance: on a yellow background a
    blue digit is darker than it."""
    x = images.float()  # (N, 3, H, W)
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 1:-1, 0], x[..., 1:-1, -1]], dim=-1)  # (N, 3, P)
    background = border.median(dim=-1).values[..., None, None]  # (N, 3, 1, 1)
    distance = (x - background).norm(dim=1)  # (N, H, W)
    far = distance.amax(dim=(1, 2), keepdim=True)
    return (distance > 0.5 * far).float().mean(dim=(1, 2))


def digit_accuracy(net: DigitNet, images: torch.Tensor, digits: Sequence[int] | torch.Tensor) -> float:
    """Fraction of images the DigitNet reads as the given digits."""
    logits = torch.cat([net(chunk) for chunk in images.float().clamp(-1, 1).split(1024)])
    return (logits.argmax(1) == torch.as_tensor(digits)).float().mean().item()


# ----------------------------------------------------------------------------------------------------
# colours
# ----------------------------------------------------------------------------------------------------
def _nearest_color(rgb: torch.Tensor) -> torch.Tensor:
    """Index into COLORS of the palette colour nearest to each RGB row (N, 3) in [0, 1]."""
    return torch.cdist(rgb, PALETTE_RGB).argmin(1)


def measure_colors(images: torch.Tensor) -> tuple[list[str], list[str]]:
    """(fg names, bg names) read off images (N, 3, 8, 8) in [-1, 1] (clamped).

    Background: the palette colour nearest to the per-channel median of the 28 border pixels (real digits
    put ink on at most 36% of them, so the median is background). Foreground: the palette colour nearest
    to the mean of the 12 pixels farthest from that background colour (every real digit has 12 pixels at
    half intensity or more). A blank image thus gets fg == bg, which no target prompt asks for.
    """
    pixels = (images.float().clamp(-1, 1) + 1) / 2  # (N, 3, H, W) in [0, 1]
    border = torch.ones(pixels.shape[-2:], dtype=torch.bool)
    border[1:-1, 1:-1] = False
    bg = _nearest_color(pixels[:, :, border].median(dim=2).values)  # (N,)
    flat = pixels.flatten(2).transpose(1, 2)  # (N, H*W, 3)
    distance = (flat - PALETTE_RGB[bg][:, None]).norm(dim=2)  # (N, H*W)
    far = distance.topk(FG_PIXELS, dim=1).indices  # (N, FG_PIXELS)
    fg = _nearest_color(flat.gather(1, far[..., None].expand(-1, -1, 3)).mean(1))
    return [COLORS[i] for i in fg], [COLORS[i] for i in bg]


def color_accuracy(images: torch.Tensor, fg: Sequence[str], bg: Sequence[str]) -> dict[str, float]:
    """Fractions of images whose measured foreground, background, and both colours match the given names."""
    got_fg, got_bg = measure_colors(images)
    fg_ok = np.array([a == b for a, b in zip(got_fg, fg, strict=True)])
    bg_ok = np.array([a == b for a, b in zip(got_bg, bg, strict=True)])
    return {"fg": float(fg_ok.mean()), "bg": float(bg_ok.mean()), "both": float((fg_ok & bg_ok).mean())}
