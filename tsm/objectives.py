"""Training objectives as small callables: DDPM epsilon/v-prediction and flow matching (SD3).

Each objective draws timesteps (over all of [0, T], or inside one expert's interval), makes the noisy
input, and returns a per-sample loss, so that the recipe can weight samples per expert
(`tsm.expert_loss_weights`) before reducing.

Timestep densities and loss weights follow diffusers' training scripts (``diffusers.training_utils``:
``compute_density_for_timestep_sampling``, ``compute_loss_weighting_for_sd3``, ``compute_snr``) and use
their scheme names. Diffusers draws u and takes the training table's entry ``(u * T).long()``, whose
noise level is s = 1 - u (to 1/T); every density here is written as the density of that s.
"""

from __future__ import annotations

import math
from types import ModuleType, SimpleNamespace

import torch

from tsm.errors import TsmError
from tsm.intervals import Scale, integer_timesteps, interval_bounds, sample_timesteps

WEIGHTINGS = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")
DDPM_WEIGHTINGS = ("none", "logit_normal", "mode")  # cosmap / sigma_sqrt weight by the flow sigma
_MODE_SCALE_MAX = 1 / (math.pi / 2 - 1)  # above it (or below -1) the "mode" map is not monotone


def _training_utils() -> ModuleType:
    # Imported on first use: diffusers.training_utils imports every pipeline (seconds); tsm needs none.
    from diffusers import training_utils

    return training_utils


def _per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).square().flatten(1).mean(1)  # (B,)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *[1] * (like.dim() - 1)).to(like.dtype)


def _draw_noise(shape: tuple[int, ...], generators: list[torch.Generator], offset: float) -> torch.Tensor:
    out = []
    for g in generators:
        n = torch.randn(tuple(shape), generator=g, device=g.device)
        if offset > 0:  # drawn after the main noise, so offset 0 leaves the draws as they were
            n = n + offset * torch.randn((shape[0], *[1] * (len(shape) - 1)), generator=g, device=g.device)
        out.append(n)
    return torch.stack(out)


def _float32_inside(a: float, b: float, closed: bool) -> tuple[float, float]:
    """The float32 bounds of [a, b) (or [a, b] if ``closed``): rounding t to float32 must not leave it."""
    lo, hi = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    if float(lo) < a:
        lo = torch.nextafter(lo, torch.tensor(math.inf))
    if float(hi) > b or (not closed and float(hi) >= b):
        hi = torch.nextafter(hi, torch.tensor(-math.inf))
    if lo > hi:
        raise TsmError(f"expert interval [{a}, {b}) holds no float32 timestep; use coarser cut points")
    return float(lo), float(hi)


class _Density:
    """Density of the noise level s = 1 - u of ``compute_density_for_timestep_sampling`` (SD3 paper, 3.1).

    Diffusers has no truncated draw; ``truncated`` restricts the same density to [lo, hi] by inverse-CDF
    sampling, so that a mixture of per-interval draws weighted by their mass is the untruncated density.
    """

    def __init__(self, weighting: str, logit_mean: float, logit_std: float, mode_scale: float) -> None:
        if weighting not in WEIGHTINGS:
            raise TsmError(f"objective.weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        if weighting == "logit_normal" and not logit_std > 0:
            raise TsmError(f"objective.logit_std must be > 0, got {logit_std!r}")
        if weighting == "mode" and not -1 <= mode_scale <= _MODE_SCALE_MAX:
            raise TsmError(
                f"objective.mode_scale must be in [-1, {_MODE_SCALE_MAX:.4f}] (a monotone map; diffusers' "
                f"default 1.29), got {mode_scale!r}"
            )
        self.weighting, self.logit_mean, self.logit_std = weighting, logit_mean, logit_std
        self.mode_scale = mode_scale

    @property
    def uniform(self) -> bool:
        return self.weighting not in ("logit_normal", "mode")  # cosmap / sigma_sqrt draw uniformly too

    def draw_u(
        self, batch: int, generator: torch.Generator | None, device: torch.device | str | None
    ) -> torch.Tensor:
        """Diffusers' u (float32, (B,)), drawn by diffusers itself so the same generator gives the same u."""
        return _training_utils().compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting,
            batch_size=batch,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            device=device,
            generator=generator,
        )

    def _mode(self, v: torch.Tensor | float) -> torch.Tensor | float:
        # s = 1 - u of diffusers' u = 1 - v - m (cos^2(pi v / 2) - 1 + v), v uniform: increasing in v
        cos = torch.cos(math.pi * v / 2) if isinstance(v, torch.Tensor) else math.cos(math.pi * v / 2)
        return v + self.mode_scale * (cos**2 - 1 + v)

    def cdf(self, s: float) -> float:
        """P(noise level <= s)."""
        if s <= 0:
            return 0.0
        if s >= 1:
            return 1.0
        if self.weighting == "logit_normal":  # logit(1 - s) ~ N(mean, std), so logit(s) ~ N(-mean, std)
            z = (math.log(s / (1 - s)) + self.logit_mean) / (self.logit_std * math.sqrt(2))
            return 0.5 * (1 + math.erf(z))
        if self.weighting == "mode":  # s = mode(v) with v uniform: the CDF is mode^-1, by bisection
            lo, hi = 0.0, 1.0
            for _ in range(200):
                mid = 0.5 * (lo + hi)
                if mid in (lo, hi):
                    break
                lo, hi = (mid, hi) if self._mode(mid) < s else (lo, mid)
            return 0.5 * (lo + hi)
        return s

    def icdf(self, v: torch.Tensor) -> torch.Tensor:
        """The noise level whose CDF is v (float64 tensor)."""
        v = v.clamp(0, 1)  # rounding of lo + v (hi - lo) may overshoot 1 by an ulp
        if self.weighting == "logit_normal":
            return torch.sigmoid(self.logit_std * torch.special.ndtri(v) - self.logit_mean)
        if self.weighting == "mode":
            return self._mode(v)
        return v

    def truncated(
        self,
        lo: float,
        hi: float,
        batch: int,
        generator: torch.Generator | None,
        device: torch.device | str | None,
    ) -> torch.Tensor:
        """Noise levels (float64, (B,)) drawn from the density restricted to [lo, hi]."""
        c0, c1 = self.cdf(lo), self.cdf(hi)
        v = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
        return self.icdf(c0 + v * (c1 - c0))


class DDPMObjective:
    """Epsilon- or v-prediction with the model's own DDPM noise schedule (Ho et al. 2020; Salimans & Ho 2022).

    ``min_snr_gamma`` enables Min-SNR weighting (Hang et al. 2023) as train_text_to_image_lora.py computes
    it: w = min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v. ``weighting`` draws t
    from one of diffusers' SD3 densities of the noise level s (t = floor(s T)) instead of uniformly.
    """

    continuous = False

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        prediction_type: str = "epsilon",
        min_snr_gamma: float | None = None,
        clip_sample: float | None = None,
        weighting: str = "none",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        noise_offset: float = 0.0,
    ) -> None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise TsmError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        if weighting in WEIGHTINGS and weighting not in DDPM_WEIGHTINGS:
            raise TsmError(
                f"objective.weighting {weighting!r} weights flow-matching losses by sigma; DDPM models take "
                f"{', '.join(DDPM_WEIGHTINGS)} (and objective.min_snr_gamma)"
            )
        if min_snr_gamma is not None and not min_snr_gamma > 0:
            raise TsmError(f"objective.min_snr_gamma must be > 0, got {min_snr_gamma!r}")
        if not noise_offset >= 0:
            raise TsmError(f"objective.noise_offset must be >= 0, got {noise_offset!r}")
        self.density = _Density(weighting, logit_mean, logit_std, mode_scale)
        self._snr_source = SimpleNamespace(alphas_cumprod=alphas_cumprod)  # as given: compute_snr's dtype
        self.alphas_cumprod = alphas_cumprod.double()
        self.num_timesteps = len(alphas_cumprod)
        self.prediction_type = prediction_type
        self.min_snr_gamma = min_snr_gamma
        self.clip_sample = clip_sample  # |x0| bound of `split`, as the scheduler's clip_sample (None: off)
        self.weighting, self.logit_mean, self.logit_std = weighting, logit_mean, logit_std
        self.mode_scale, self.noise_offset = mode_scale, noise_offset

    @classmethod
    def from_scheduler(
        cls,
        scheduler: object,
        min_snr_gamma: float | None = None,
        weighting: str = "none",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        noise_offset: float = 0.0,
    ) -> DDPMObjective:
        """A diffusers DDPM/DDIM-style scheduler's ``alphas_cumprod``, ``prediction_type`` and x0 clipping."""
        if not hasattr(scheduler, "alphas_cumprod"):
            raise TsmError(f"{type(scheduler).__name__} has no alphas_cumprod; use FlowMatchingObjective")
        cfg = scheduler.config
        clip = cfg.get("clip_sample_range", 1.0) if cfg.get("clip_sample", False) else None
        return cls(
            scheduler.alphas_cumprod,
            cfg.prediction_type,
            min_snr_gamma,
            clip,
            weighting,
            logit_mean,
            logit_std,
            mode_scale,
            noise_offset,
        )

    def sample_t(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        expert: tuple[Scale, int] | None = None,
    ) -> torch.Tensor:
        """Integer timesteps (B,) from the density over 0..T-1, or inside ``expert = (scale, index)``."""
        T = self.num_timesteps
        if self.density.uniform:  # the draws as they always were
            if expert is not None:
                return sample_timesteps(expert[1], expert[0], batch, T, generator=generator, device=device)
            return torch.randint(0, T, (batch,), generator=generator, device=device)
        if expert is None:
            s = 1 - self.density.draw_u(batch, generator, device)
            return torch.floor(s * T).long().clamp(0, T - 1)
        owned = integer_timesteps(expert[1], expert[0], T)
        if len(owned) == 0:
            raise TsmError(f"expert {expert[1]} owns no integer timestep; use fewer intervals")
        # t = k exactly when s is in [k/T, (k+1)/T) (s = 1 gives T-1, as untruncated): restrict s to those
        s = self.density.truncated(owned.start / T, owned.stop / T, batch, generator, device)
        return torch.floor(s * T).long().clamp(owned.start, owned.stop - 1)

    def draw_noise(self, shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
        """Per-sample Gaussian noise (B, *shape) plus the noise offset of train_text_to_image_lora.py."""
        return _draw_noise(shape, generators, self.noise_offset)

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

    def snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR loss weights (B,) as train_text_to_image_lora.py computes them (Hang et al. 2023)."""
        if self.min_snr_gamma is None:
            raise TsmError("snr_weights needs objective.min_snr_gamma")
        t = t.long()
        snr = _training_utils().compute_snr(self._snr_source, t)
        w = torch.stack([snr, self.min_snr_gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
        return w / (snr + 1) if self.prediction_type == "v_prediction" else w / snr

    def loss(
        self, pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample loss (B,)."""
        loss = _per_sample_mse(pred, self.target(x0, noise, t))
        if self.min_snr_gamma is not None:
            loss = loss * self.snr_weights(t).float().to(loss.device)
        return loss


def _flow_table(num_timesteps: int, shift: float) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler.__init__'s training timesteps (T, descending), same float32 ops."""
    sigmas = torch.linspace(1, num_timesteps, num_timesteps, dtype=torch.float64).flip(0).float()
    sigmas = sigmas / num_timesteps
    if shift != 1.0:
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas * num_timesteps


class FlowMatchingObjective:
    """Rectified flow as in SD3 (Esser et al. 2024): x_t = (1 - s) x0 + s eps, target eps - x0, t = s * T.

    ``weighting`` is diffusers' scheme (train_dreambooth_lora_sd3.py): "none" / "cosmap" / "sigma_sqrt"
    draw u uniformly, "logit_normal" draws sigmoid(N(logit_mean, logit_std)), "mode" uses ``mode_scale``;
    t is the training table's entry (u T).long(), the table being ``T * shift(s)`` on s = 1, 1 - 1/T, ..,
    1/T with SD3's shift(s) = shift s / (1 + (shift - 1) s). cosmap / sigma_sqrt also weight the loss.
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
        mode_scale: float = 1.29,
        noise_offset: float = 0.0,
        timesteps: torch.Tensor | None = None,
        min_snr_gamma: float | None = None,
        precondition_outputs: bool = False,
    ) -> None:
        self.precondition_outputs = precondition_outputs  # the SD3 script's default: the loss on x0
        if min_snr_gamma is not None:
            raise TsmError(
                "objective.min_snr_gamma applies to epsilon/v-prediction models; "
                "flow models weight by objective.weighting"
            )
        if not shift > 0:
            raise TsmError(f"flow-matching shift must be > 0, got {shift!r}")
        if not noise_offset >= 0:
            raise TsmError(f"objective.noise_offset must be >= 0, got {noise_offset!r}")
        self.density = _Density(weighting, logit_mean, logit_std, mode_scale)
        self.num_timesteps = num_timesteps
        self.weighting, self.logit_mean, self.logit_std, self.shift = weighting, logit_mean, logit_std, shift
        self.mode_scale, self.noise_offset = mode_scale, noise_offset
        # The training table untruncated draws index; it must have been built with `shift` (truncated
        # draws apply `shift` in closed form).
        self.timesteps = (
            _flow_table(num_timesteps, shift) if timesteps is None else timesteps.detach().float().cpu()
        )
        if self.timesteps.shape != (num_timesteps,):
            raise TsmError(
                f"timesteps table must have {num_timesteps} entries, got {tuple(self.timesteps.shape)}"
            )

    @classmethod
    def from_scheduler(
        cls,
        scheduler: object,
        weighting: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        shift: float | None = None,
        noise_offset: float = 0.0,
        min_snr_gamma: float | None = None,
        precondition_outputs: bool = False,
    ) -> FlowMatchingObjective:
        """A FlowMatchEulerDiscreteScheduler's training table, as the SD3 / Flux LoRA scripts index it.

        ``shift=None``: the scheduler's table right after ``from_config`` (its config shift, or none under
        ``use_dynamic_shifting``: Flux / Qwen-Image shift by resolution at inference only). A number
        rebuilds the table with that shift.
        """
        if hasattr(scheduler, "alphas_cumprod"):
            raise TsmError(f"{type(scheduler).__name__} is a DDPM-style scheduler; use DDPMObjective")
        cfg = scheduler.config
        T = int(cfg.get("num_train_timesteps", 1000))
        table = None
        if shift is None:
            shift = 1.0 if cfg.get("use_dynamic_shifting", False) else float(cfg.get("shift", 1.0))
            # the scheduler's own table, fresh: `scheduler` may have had set_timesteps called on it
            table = type(scheduler).from_config(cfg).timesteps
            if table.shape != (T,) or not torch.allclose(table.float(), _flow_table(T, shift), atol=1e-3):
                raise TsmError(
                    f"{type(scheduler).__name__}'s training timesteps are not the shifted linspace of "
                    f"FlowMatchEulerDiscreteScheduler; pass shift= explicitly"
                )
        return cls(
            T, weighting, logit_mean, logit_std, shift, mode_scale, noise_offset, table, min_snr_gamma,
            precondition_outputs,
        )  # fmt: skip

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
        """Float timesteps t = sigma * T (B,), optionally inside ``expert = (scale, index)``'s interval."""
        T = self.num_timesteps
        if expert is None:  # as the SD3 / Flux scripts: t = timesteps[(u * T).long()]
            u = self.density.draw_u(batch, generator, device)
            # u = 1 exactly ("mode" at v = 0) would index past the table: the script fails there
            idx = (u * T).long().clamp(0, T - 1)
            return self.timesteps.to(idx.device)[idx]
        # the interval in shifted sigma, mapped back to the drawing variable; the draw there is continuous
        a, b = interval_bounds(expert[1], expert[0], T)
        s = self.density.truncated(self._unshift(a / T), self._unshift(b / T), batch, generator, device)
        lo, hi = _float32_inside(a, b, closed=b >= T)  # keep float32 rounding inside [a, b)
        return (self._shift(s) * T).float().clamp(lo, hi)

    def draw_noise(self, shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
        """Per-sample Gaussian noise (B, *shape) plus the noise offset of train_text_to_image_lora.py."""
        return _draw_noise(shape, generators, self.noise_offset)

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

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """compute_loss_weighting_for_sd3 at sigma = t / T (B,): ones unless cosmap / sigma_sqrt (SD3)."""
        sigmas = t.float() / self.num_timesteps
        if self.weighting == "sigma_sqrt":  # the table's smallest sigma bounds sigma^-2 at truncated t ~ 0
            sigmas = sigmas.clamp(min=(self.timesteps.min() / self.num_timesteps).item())
        return _training_utils().compute_loss_weighting_for_sd3(self.weighting, sigmas).float()

    def loss(
        self, pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample loss (B,): mean over each sample of weighting * (pred - target)^2, as the SD3 script.

        ``precondition_outputs`` (train_dreambooth_lora_sd3.py's default) compares x_t - sigma pred with x0
        instead: x_t - sigma v - x0 = -sigma (v - (eps - x0)), i.e. the same loss times sigma^2 per sample.
        """
        diff = (pred.float() - self.target(x0, noise, t).float()).square()
        if self.weighting in ("cosmap", "sigma_sqrt"):
            diff = _bcast(self.loss_weights(t).to(diff.device), diff) * diff
        loss = diff.flatten(1).mean(1)
        if self.precondition_outputs:
            loss = loss * (t.float().to(loss.device) / self.num_timesteps).square()
        return loss
