"""What the digits benchmark's runners share (`digits`, `digits_fast`, `digits_sampler`): the expert targets,
the evaluation PNGs read back, the scoring network, and quiet model loading. It imports no runner, so the
runners import it (and `digits_data`) and never each other in a circle (tests/test_layering.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]  # the denoiser's attention projections: every row's targets


def read_eval_png(path: Path, n: int, columns: int = 32) -> torch.Tensor:
    """The n 8x8 tiles of an evaluation PNG, as (n, 3, 8, 8) in [-1, 1]."""
    from PIL import Image

    grid = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).float() / 127.5 - 1  # (H, W, 3)
    rows = math.ceil(n / columns)
    tiles = grid.reshape(rows, 8, columns, 8, 3).permute(0, 2, 4, 1, 3).reshape(rows * columns, 3, 8, 8)
    return tiles[:n]


def load_net(net_path: Path, net_steps: int | None) -> Any:
    """The scoring CNN (FID features, digit accuracy), trained once and cached at ``net_path``."""
    from tsm.bench.metrics import load_or_train_digit_net

    return load_or_train_digit_net(net_path, **({"steps": net_steps} if net_steps else {}))


def quiet_loading_bars() -> None:
    """No per-file loading bars from diffusers/transformers under the benchmark's own progress bar."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def verdict(ours: list[float], theirs: list[float], higher_is_better: bool) -> dict[str, Any]:
    """win / tie / loss of ours against theirs, paired by seed, at 2 standard errors of the difference."""
    if len(ours) != len(theirs) or len(ours) < 2:
        return {"verdict": "n/a", "seeds": min(len(ours), len(theirs)), "reason": "needs >= 2 paired seeds"}
    d = np.asarray(ours, dtype=float) - np.asarray(theirs, dtype=float)
    d = d if higher_is_better else -d  # > 0: ours is better
    mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
    word = "win" if mean > 2 * se else "loss" if mean < -2 * se else "tie"
    return {"verdict": word, "mean_gain": mean, "se": se, "seeds": len(d)}
