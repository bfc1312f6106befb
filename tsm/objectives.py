"""Training objectives as small callables: DDPM epsilon/v-prediction and flow matching (SD3).

Each objective draws timesteps (over all of [0, T], or inside one expert's interval), makes the noisy
input, and returns a per-sample loss, so that the recipe can weight samples per expert
(`tsm.expert_loss_weights`) before reducing.
"""

from __future__ import annotations

import math

import torch

from tsm.errors import TsmError
from tsm.intervals import Scale, interval_bounds, sample_timesteps


def _per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).square().flatten(1).mean(1)  # (B,)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *[1] * (like.dim() - 1)).to(like.dtype)


class DDPMObjective:
    """Epsilon- or v-prediction with the model's own DDPM noise schedule (Ho et al. 2020; Salimans & Ho 2022).

    ``min_snr_gamma`` enables Min-SNR weighting (Hang et al. 2023): w = min(SNR, gamma) / SNR for epsilon,
    min(SNR, gamma) / (SNR + 1) for v.
    """

    continuous = False

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        prediction_type: str = "epsilon",
        min_snr_gamma: float | None = None,
        clip_sample: float | None = None,
    ) -> None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise TsmError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        self.alphas_cumprod = alphas_cumprod.double()
        self.num_timesteps = len(alphas_cumprod)
        self.prediction_type = prediction_type
        self.min_snr_gamma = min_snr_gamma
        self.clip_sample = clip_sample  # |x0| bound of `split`, as the scheduler's clip_sample (None: off)

    @classmethod
    def from_scheduler(cls, scheduler: object, min_snr_gamma: float | None = None) -> DDPMObjective:
        """Use a diffusers DDPM/DDIM-style scheduler's ``alphas_cumprod``, ``prediction_type`` and x0 clipping."""
        if not hasattr(scheduler, "alphas_cumprod"):
            raise TsmError(f"{type(scheduler).__name__} has no alphas_cumprod; use FlowMatchingObjective")
        cfg = scheduler.config
        clip = cfg.get("clip_sample_range", 1.0) if cfg.get("clip_sample", False) else None
        return cls(scheduler.alphas_cumprod, cfg.prediction_type, min_snr_gamma, clip)

    def sample_t(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        expert: tuple[Scale, int] | None = None,
    ) -> torch.Tensor:
        """Integer timesteps (B,), uniform over 0..T-1 or over ``expert = (scale, index)``'s interval."""
        if expert is not None:
            return sample_timesteps(
                expert[1], expert[0], batch, self.num_timesteps, generator=generator, device=device
            )
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device)

    def _ab(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ac = self.alphas_cumprod.to(t.device)[t.long()]
        return _bcast(ac.sqrt(), like), _bcast((1 - ac).sqrt(), like)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = self._ab(t, x0)
        return a * x0 + b * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        a, b = self._ab(t, x0)
        return a * noise - b * x0

    def split(
        self, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) implied by the model's prediction at x_t: what the explicit-timestep samplers step with.

        With ``clip_sample`` x0 is clipped as the scheduler clips it (DDIM keeps the unclipped eps). Near
        t = T an epsilon model's x0 = (x - b eps) / a divides by a -> 0 (5e-5 at t = 999 for the cosine
        schedule), so without the clip a one-step x0 there is noise amplified 10^4 times. The clip is
        straight-through: its gradient is the identity, so a generator trained on x0 still gets a gradient
        where it overshoots.
        """
        a, b = self._ab(t, x)
        pred = pred.to(x.dtype)
        if self.prediction_type == "epsilon":
            x0, eps = (x - b * pred) / a, pred
        else:
            x0, eps = a * x - b * pred, b * x + a * pred  # from v = a eps - b x0
        if self.clip_sample is not None:
            x0 = x0 + (x0.clamp(-self.clip_sample, self.clip_sample) - x0).detach()
        return x0, eps

    def loss(
        self, pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample loss (B,)."""
        loss = _per_sample_mse(pred, self.target(x0, noise, t))
        if self.min_snr_gamma is not None:
            ac = self.alphas_cumprod.to(t.device)[t.long()]
            snr = ac / (1 - ac)
            clipped = snr.clamp(max=self.min_snr_gamma)
            w = clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr
            loss = loss * w.float()
        return loss


class FlowMatchingObjective:
    """Rectified flow as in SD3 (Esser et al. 2024): x_t = (1 - s) x0 + s eps, target eps - x0, t = s * T.

    ``weighting``: "none" draws s uniformly; "logit_normal" draws s = sigmoid(N(mean, std)) (SD3's default).
    ``shift`` applies SD3's timestep shift s' = shift * s / (1 + (shift - 1) s) after drawing.
    """

    continuous = True
    prediction_type = "flow"

    def __init__(
        self,
        num_timesteps: int = 1000,
        weighting: str = "none",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
    ) -> None:
        if weighting not in ("none", "logit_normal"):
            raise TsmError(f"flow-matching weighting must be 'none' or 'logit_normal', got {weighting!r}")
        self.num_timesteps = num_timesteps
        self.weighting, self.logit_mean, self.logit_std, self.shift = weighting, logit_mean, logit_std, shift

    def _shift(self, s: torch.Tensor) -> torch.Tensor:
        return self.shift * s / (1 + (self.shift - 1) * s)

    def _unshift(self, s: float) -> float:
        return s / (self.shift - (self.shift - 1) * s)

    def sample_t(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        expert: tuple[Scale, int] | None = None,
    ) -> torch.Tensor:
        """Float timesteps t = sigma * T (B,), optionally truncated to ``expert = (scale, index)``'s interval."""
        lo, hi = 0.0, 1.0
        if expert is not None:  # the interval in shifted sigma, mapped back to the drawing variable
            a, b = interval_bounds(expert[1], expert[0], self.num_timesteps)
            lo, hi = self._unshift(a / self.num_timesteps), self._unshift(b / self.num_timesteps)
        u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
        if self.weighting == "logit_normal":  # inverse-CDF sampling of the truncated logit-normal
            cdf = [self._logit_cdf(v) for v in (lo, hi)]
            z = torch.special.ndtri(cdf[0] + u * (cdf[1] - cdf[0]))
            s = torch.sigmoid(self.logit_mean + self.logit_std * z)
        else:
            s = lo + u * (hi - lo)
        t = self._shift(s) * self.num_timesteps
        if expert is not None:  # keep float rounding inside [a, b)
            t = t.clamp(a, math.nextafter(b, a) if b < self.num_timesteps else b)
        return t.float()

    def _logit_cdf(self, s: float) -> float:
        if s <= 0:
            return 0.0
        if s >= 1:
            return 1.0
        return 0.5 * (
            1 + math.erf((math.log(s / (1 - s)) - self.logit_mean) / (self.logit_std * math.sqrt(2)))
        )

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = _bcast(t / self.num_timesteps, x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def split(
        self, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from the velocity v = eps - x0 at x_t = (1 - s) x0 + s eps."""
        s = _bcast(t / self.num_timesteps, x)
        v = pred.to(x.dtype)
        return x - s * v, x + (1 - s) * v

    def loss(
        self, pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        return _per_sample_mse(pred, self.target(x0, noise, t))
