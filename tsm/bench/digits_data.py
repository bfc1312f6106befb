"""Data of the digits benchmark: scikit-learn's 1,797 real 8x8 handwritten digits, coloured, with prompts.

Source domain: a digit drawn in a random foreground colour on black or (a quarter of the time) on another
colour; its prompt names only the digit ("digit 3"). Target domain (attribute binding, as in T2I-CompBench): the prompt
names both colours ("red 3 on blue") and the image must follow it. Everything here is fixed and
deterministic: the train/test split of the images, the train/test split of the (digit, fg, bg) combos,
and the word-level vocabulary of the benchmark's tiny text encoder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tsm.errors import TsmError, shorten
from tsm.models.digits import COLOR_WORDS, DIGIT_WORDS, TOKEN_ID, VOCAB, detokenize, tokenize  # noqa: F401 (re-exported)

# Six colours whose RGB differ by at least 1 (one full channel), so a colour is read off an image exactly.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
}
COLORS = tuple(PALETTE)  # colour index -> name
PALETTE_RGB = torch.tensor(list(PALETTE.values()))  # (6, 3) in [0, 1], rows in COLORS order
TEST_PER_CLASS = 40  # held-out images per digit: 400 test, 1,397 train
SPLIT_SEED = 0
SPLITS = ("train", "test")

assert COLORS == COLOR_WORDS, "the palette and the model's vocabulary name the same colours"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise TsmError(f"unknown split {split!r}; use 'train' or 'test'")


# ----------------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------------
def load_digit_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8) float32 in [0, 1], labels (N,) int64) of one fixed split of the 1,797 digits.

    Stratified: a permutation seeded with 0 puts the first 40 digits of each class in "test" (400 in
    all, never used for tuning) and the rest in "train" (1,397).
    """
    _check_split(split)
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16).astype(np.float32)  # pixel values 0..16
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    is_test = np.zeros(len(labels), dtype=bool)
    for d in range(10):
        is_test[order[labels[order] == d][:TEST_PER_CLASS]] = True
    keep = is_test if split == "test" else ~is_test
    return images[keep], labels[keep]


def colorize(gray: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """RGB images in [-1, 1] (N, 3, 8, 8): each pixel is bg + (fg - bg) * gray, fg/bg (N, 3) in [0, 1]."""
    gray = torch.as_tensor(gray, dtype=torch.float32)[:, None]  # (N, 1, H, W)
    pixels = bg[:, :, None, None] + (fg - bg)[:, :, None, None] * gray  # (N, 3, H, W) in [0, 1]
    return pixels * 2 - 1


def random_color_pairs(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(fg, bg) colour indices (n,) into COLORS, uniform over the 30 ordered pairs with fg != bg."""
    fg = torch.randint(len(COLORS), (n,), generator=generator)
    bg = (fg + torch.randint(1, len(COLORS), (n,), generator=generator)) % len(COLORS)
    return fg, bg


# ----------------------------------------------------------------------------------------------------
# prompts and combos
# ----------------------------------------------------------------------------------------------------
def source_prompt(digit: int) -> str:
    """The source-domain prompt: the digit only ("digit 3")."""
    return f"digit {int(digit)}"


def target_prompt(digit: int, fg: str, bg: str) -> str:
    """The target-domain prompt: "red 3 on blue" (foreground colour, digit, "on", background colour)."""
    return f"{fg} {int(digit)} on {bg}"


def parse_target_prompt(text: str) -> tuple[int, str, str]:
    """(digit, fg, bg) of a target prompt written by `target_prompt`."""
    words = text.split()
    if (
        len(words) != 4
        or words[2] != "on"
        or words[1] not in DIGIT_WORDS
        or not {words[0], words[3]} <= set(COLORS)
    ):
        raise TsmError(f"{shorten(text)!r} is not a target prompt; expected '<colour> <digit> on <colour>'")
    return int(words[1]), words[0], words[3]


def target_combos(split: str) -> list[tuple[int, str, str]]:
    """The (digit, fg, bg) combos of a split: 300 in all (fg != bg), 240 "train" and 60 held-out "test".

    A combo is held out when (digit + fg index + bg index) % 5 == 0: 2 of the 10 digits for every colour
    pair, and at most 2 of the 5 other colours for every (digit, colour), so every pair inside a test
    combo (digit-fg, digit-bg, fg-bg) is seen in training but the triple never is.
    """
    _check_split(split)
    combos = []
    for d in range(10):
        for i, fg in enumerate(COLORS):
            for j, bg in enumerate(COLORS):
                if i != j and ((d + i + j) % 5 == 0) == (split == "test"):
                    combos.append((d, fg, bg))
    return combos


# ----------------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------------
COLORED_BACKGROUND = 0.25  # the share of source images on a random palette background instead of black


def source_colors(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(fg, bg) RGB (n, 3) of the source domain: a random palette colour on black, or (a quarter of the
    time) on another random palette colour. The prompt names neither ("digit 3").

    Why the coloured backgrounds: a base that has only ever drawn black backgrounds treats a coloured one as
    noise (its epsilon error at t < 100 on the target images was 1.87, against 0.20 on its own), and every
    fine-tuned row of the attribute-binding task then drew coloured noise: the task asked for a new kind of
    image instead of for binding colours to words. Why mostly black: with fg and bg both random and
    exchangeable, E[image | digit] is the same grey for every digit, so a denoiser gains almost nothing from
    the prompt at high noise and does not learn to follow it in a CPU budget; on black the digit's shape is
    in the mean (a base pretrained with half its backgrounds coloured drew the named digit only 90% of the
    time at its best validated sampler, against 97% for black only).
    """
    fg = torch.randint(len(COLORS), (n,), generator=generator)
    bg = (fg + torch.randint(1, len(COLORS), (n,), generator=generator)) % len(COLORS)
    colored = torch.rand(n, generator=generator) < COLORED_BACKGROUND
    return PALETTE_RGB[fg], torch.where(colored[:, None], PALETTE_RGB[bg], torch.zeros(n, 3))


def bold(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The appearance shift: every stroke one pixel wider to the right (a max with the image shifted by one
    column), (N, 8, 8) in [0, 1]. Same digits, same prompts; a base model draws them thin."""
    images = torch.as_tensor(images)
    shifted = torch.nn.functional.pad(images[..., :-1], (1, 0))  # column j takes column j - 1
    return torch.maximum(images, shifted)


def make_source_batch(
    images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, list[str]]:
    """n random digits (with replacement), a random colour on black, and prompts naming only the digit."""
    images, labels = torch.as_tensor(images), torch.as_tensor(labels)
    index = torch.randint(len(labels), (n,), generator=generator)
    fg, bg = source_colors(n, generator)
    pixels = colorize(images[index], fg, bg)  # (n, 3, 8, 8)
    return pixels, [source_prompt(d) for d in labels[index].tolist()]


def make_target_batch(
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    combos: list[tuple[int, str, str]],
    n: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, list[str]]:
    """n random combos (with replacement), each drawn as a random real image of its digit in its colours."""
    images, labels = torch.as_tensor(images), torch.as_tensor(labels)
    by_digit = torch.argsort(labels, stable=True)  # image indices grouped by digit
    counts = torch.bincount(labels, minlength=10)  # (10,)
    starts = torch.cumsum(counts, 0) - counts
    picked = [combos[i] for i in torch.randint(len(combos), (n,), generator=generator).tolist()]
    digits = torch.tensor([d for d, _, _ in picked])
    if (counts[digits] == 0).any():
        raise TsmError("a combo names a digit that has no image; pass images of every digit in the combos")
    offset = (torch.rand(n, generator=generator) * counts[digits]).long()
    index = by_digit[starts[digits] + offset]
    fg = PALETTE_RGB[[COLORS.index(c) for _, c, _ in picked]]  # (n, 3)
    bg = PALETTE_RGB[[COLORS.index(c) for _, _, c in picked]]
    return colorize(images[index], fg, bg), [target_prompt(*combo) for combo in picked]


def make_post_batch(
    images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, list[str]]:
    """The post-pretraining set, broader than the base's: n // 2 source samples ("digit 3") and the rest
    attribute-binding samples of the train combos ("red 3 on blue"), in random order."""
    src_pixels, src_prompts = make_source_batch(images, labels, n // 2, generator)
    tgt_pixels, tgt_prompts = make_target_batch(images, labels, target_combos("train"), n - n // 2, generator)
    order = torch.randperm(n, generator=generator)
    prompts = src_prompts + tgt_prompts
    return torch.cat([src_pixels, tgt_pixels])[order], [prompts[i] for i in order.tolist()]


# ---------------------------------------------------------------------------------------------------------
# the benchmark's training batches and held-out evaluation sets
# ---------------------------------------------------------------------------------------------------------
def train_batch(task: str, n: int, g: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """n training samples of a task: ``domain`` the attribute-binding targets ("red 3 on blue"), ``appearance``
    bold strokes with the source's prompts, ``source`` the base's own data ("digit 3"), and ``post`` the broader
    post-pretraining set: source and attribute-binding samples, half each, in random order."""
    images, labels = load_digit_split("train")
    if task == "domain":
        return make_target_batch(images, labels, target_combos("train"), n, g)
    if task == "appearance":  # the source's prompts, bold strokes
        return make_source_batch(bold(images), labels, n, g)
    if task == "post":
        return make_post_batch(images, labels, n, g)
    return make_source_batch(images, labels, n, g)


def eval_set(
    task: str, per_prompt: int, split: str = "test"
) -> tuple[list[str], list[int], torch.Tensor, list[tuple]]:
    """(prompts, seeds, real reference images, (digit, fg, bg) per prompt) — fixed, from the held-out split.

    ``domain``: the split's combos, ``per_prompt`` each; ``source`` and ``appearance``: the 10 digits x 6 x
    ``per_prompt`` source prompts (fg = bg = "": the prompt names no colour); ``post``: half of each (10 x 3 x
    ``per_prompt`` source prompts, then 30 x ``per_prompt`` of the combos, cycled). ``split="train"`` is the
    validation set: train-split digits and combos, other draws and other seeds (from 100,000), for choosing
    anything (the sampler) without looking at the test set.
    """
    images, labels = load_digit_split(split)
    g = torch.Generator().manual_seed(1234 if split == "test" else 4321)
    named = target_combos(split)
    if task == "domain":
        combos = [c for c in named for _ in range(per_prompt)]
    elif task == "post":
        source = [(d, "", "") for d in list(range(10)) * per_prompt * 3]
        combos = source + [named[i % len(named)] for i in range(30 * per_prompt)]
    else:
        combos = [(d, "", "") for d in list(range(10)) * per_prompt * 6]  # the prompt names the digit only
    by_digit = {d: np.flatnonzero(labels == d) for d in range(10)}
    picks = [int(by_digit[d][torch.randint(len(by_digit[d]), (1,), generator=g)]) for d, _, _ in combos]
    is_named = torch.tensor([bool(f) for _, f, _ in combos])
    fg_rgb = PALETTE_RGB[[COLORS.index(f) if f else 0 for _, f, _ in combos]]
    bg_rgb = PALETTE_RGB[[COLORS.index(b) if b else 0 for _, _, b in combos]]
    if not is_named.all():  # the source's random colours (drawn only where some prompt names none)
        src_fg, src_bg = source_colors(len(combos), g)
        fg_rgb = torch.where(is_named[:, None], fg_rgb, src_fg)
        bg_rgb = torch.where(is_named[:, None], bg_rgb, src_bg)
    gray = torch.as_tensor(images[picks])
    reference = colorize(bold(gray) if task == "appearance" else gray, fg_rgb, bg_rgb)
    prompts = [target_prompt(*c) if c[1] else source_prompt(c[0]) for c in combos]
    first = 0 if split == "test" else 100_000
    seeds = list(range(first, first + len(prompts)))
    return prompts, seeds, reference, combos


WRITE_TASKS = ("source", "post", "domain")


def write_folder(root: str | Path, task: str = "source", n: int = 256, seed: int = 0) -> Path:
    """Write ``n`` training-split images of ``task`` (source: a colour on black or on another colour,
    "digit 3"; domain: the attribute-binding target, "red 3 on blue"; post: half of each) as 8x8 PNGs with
    .txt captions: data for `tsm train` with ``model.family: digits`` (digits_distill, digits_glance)."""
    from PIL import Image

    if task not in WRITE_TASKS:
        raise TsmError(f"unknown task {task!r}; use one of {', '.join(WRITE_TASKS)}")
    images, labels = load_digit_split("train")
    g = torch.Generator().manual_seed(seed)
    if task == "domain":
        pixels, prompts = make_target_batch(images, labels, target_combos("train"), n, g)
    elif task == "post":
        pixels, prompts = make_post_batch(images, labels, n, g)
    else:
        pixels, prompts = make_source_batch(images, labels, n, g)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rgb = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, (image, prompt) in enumerate(zip(rgb, prompts, strict=True)):
        Image.fromarray(image).save(root / f"{task}_{i:04d}.png")
        (root / f"{task}_{i:04d}.txt").write_text(prompt + "\n")
    return root


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="write digits-benchmark training images with captions")
    p.add_argument("out")
    p.add_argument("--task", choices=list(WRITE_TASKS), default="source")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(write_folder(args.out, args.task, args.n, args.seed))
