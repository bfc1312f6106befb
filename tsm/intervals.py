"""Timestep intervals: which expert owns a timestep, at every scale.

Convention (one for the whole project): timesteps live in [0, T] with T = ``num_timesteps``
(1000 by default). Integer DDPM timesteps are 0..T-1; flow-matching timesteps are floats
t = sigma * T, so t = T (pure noise) is allowed and belongs to the last interval.

A *scale* is either an int ``n`` (n uniform intervals; the expert of t is ``floor(t * n / T)``,
clamped to n - 1) or a sequence of interior cut points ``[c1, c2, ...]`` (strictly increasing,
inside (0, T); the expert of t is the number of cut points <= t). ``[875]`` gives two experts:
[0, 875) and [875, T].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tsm.errors import TsmError

Scale = int | Sequence[float]

DEFAULT_NUM_TIMESTEPS = 1000


def num_intervals(scale: Scale) -> int:
    """Number of experts a scale holds."""
    return scale if isinstance(scale, int) else len(scale) + 1


def check_scales(scales: Sequence[Scale], num_timesteps: int = DEFAULT_NUM_TIMESTEPS) -> tuple[Scale, ...]:
    """Validate scales (finest first) and return them as a tuple; raise a one-line TsmError if bad."""
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise TsmError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    if isinstance(scales, int | str) or len(scales) == 0:
        raise TsmError(f"scales must be a non-empty list such as (8, 1), got {scales!r}")
    out: list[Scale] = []
    for scale in scales:
        if isinstance(scale, bool):
            raise TsmError(f"scale {scale!r} is not an int or a list of cut points")
        if isinstance(scale, int):
            if not 1 <= scale <= num_timesteps:
                raise TsmError(f"scale {scale} must be between 1 and num_timesteps={num_timesteps}")
            out.append(scale)
            continue
        try:
            cuts = tuple(float(c) for c in scale)
        except (TypeError, ValueError):
            raise TsmError(f"scale {scale!r} is not an int or a list of cut points") from None
        if not cuts or any(not 0 < c < num_timesteps for c in cuts):
            raise TsmError(f"cut points {list(scale)} must be inside (0, {num_timesteps}) and non-empty")
        if any(b <= a for a, b in zip(cuts, cuts[1:], strict=False)):
            raise TsmError(f"cut points {list(scale)} must be strictly increasing")
        out.append(cuts)
    counts = [num_intervals(s) for s in out]
    if any(b >= a for a, b in zip(counts, counts[1:], strict=False)):
        raise TsmError(
            f"scales must go from finest to coarsest (strictly fewer intervals each), got {counts} intervals; "
            "write e.g. (8, 4, 2, 1)"
        )
    return tuple(out)


def check_timesteps(t: torch.Tensor, num_timesteps: int = DEFAULT_NUM_TIMESTEPS) -> None:
    """Raise a one-line TsmError if any timestep lies outside [0, num_timesteps]."""
    if t.numel() == 0:
        return
    lo, hi = float(t.min()), float(t.max())
    if not (lo >= 0 and hi <= num_timesteps):  # also catches NaN
        raise TsmError(
            f"timestep out of range: got values in [{lo}, {hi}], expected [0, {num_timesteps}]; "
            "for flow matching pass t = sigma * num_timesteps (or set ExpertSpec.timestep_scale)"
        )


def expert_index(
    t: torch.Tensor | float, scale: Scale, num_timesteps: int = DEFAULT_NUM_TIMESTEPS, check: bool = True
) -> torch.Tensor:
    """Expert index of timestep(s) t at one scale, as a long tensor of t's shape.

    Uniform scale n: ``i = floor(t * n / T)`` clamped to [0, n-1] (exact integer arithmetic for
    integer t). Cut points: ``i = #{c : c <= t}``. ``check=False`` skips the range check (done by the caller).
    """
    t = torch.as_tensor(t)
    if check:
        check_timesteps(t, num_timesteps)
    if isinstance(scale, int):
        if t.dtype.is_floating_point:
            i = torch.floor(t.double() * scale / num_timesteps).long()
        else:
            i = (t.long() * scale) // num_timesteps
        return i.clamp_(0, scale - 1)
    cuts = torch.tensor(scale, dtype=torch.float64, device=t.device)
    return torch.bucketize(t.double(), cuts, right=True)


def interval_bounds(
    index: int, scale: Scale, num_timesteps: int = DEFAULT_NUM_TIMESTEPS
) -> tuple[float, float]:
    """Half-open interval [lo, hi) of real timesteps owned by expert ``index`` (the last one also owns T)."""
    n = num_intervals(scale)
    if not 0 <= index < n:
        raise TsmError(f"expert index {index} out of range for a scale with {n} intervals")
    if isinstance(scale, int):
        return index * num_timesteps / scale, (index + 1) * num_timesteps / scale
    edges = (0.0, *scale, float(num_timesteps))
    return edges[index], edges[index + 1]


def integer_timesteps(index: int, scale: Scale, num_timesteps: int = DEFAULT_NUM_TIMESTEPS) -> range:
    """The integer timesteps 0..T-1 owned by expert ``index``."""
    lo, hi = interval_bounds(index, scale, num_timesteps)
    if isinstance(scale, int):  # ceil(i * T / n) in exact integer arithmetic
        lo_i, hi_i = -((-index * num_timesteps) // scale), -((-(index + 1) * num_timesteps) // scale)
    else:  # integer t is owned when c_i <= t < c_{i+1}
        lo_i, hi_i = math.ceil(lo), math.ceil(hi)
    if index == num_intervals(scale) - 1:
        hi_i = num_timesteps
    return range(lo_i, hi_i)


def sample_timesteps(
    index: int,
    scale: Scale,
    batch_size: int,
    num_timesteps: int = DEFAULT_NUM_TIMESTEPS,
    *,
    continuous: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw ``batch_size`` timesteps uniformly inside expert ``index``'s interval.

    Integer (long) DDPM timesteps by default; ``continuous=True`` gives floats in [lo, hi) for flow matching.
    """
    if continuous:
        lo, hi = interval_bounds(index, scale, num_timesteps)
        u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
        t = (lo + u * (hi - lo)).float()
        # float32 rounding may land on hi, which belongs to the next expert: step back one ulp.
        below_hi = torch.nextafter(
            torch.tensor(hi, dtype=torch.float32), torch.tensor(lo, dtype=torch.float32)
        )
        return torch.minimum(t, below_hi.to(t.device))
    owned = integer_timesteps(index, scale, num_timesteps)
    if len(owned) == 0:
        raise TsmError(f"expert {index} owns no integer timestep; use fewer intervals or continuous=True")
    return torch.randint(owned.start, owned.stop, (batch_size,), generator=generator, device=device)
