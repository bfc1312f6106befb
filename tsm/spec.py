"""`ExpertSpec`: what experts a model gets. Saved as JSON in every checkpoint's metadata."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from tsm.errors import TsmError
from tsm.intervals import DEFAULT_NUM_TIMESTEPS, Scale, check_scales, num_intervals

ROUTERS = ("asymmetric", "symmetric", "z_only", "t_only")
ROUTINGS = ("hard", "smooth")
MODULATIONS = ("none", "table")
RANK_SCHEDULES = ("none", "tlora")
# fields left out of the JSON while they hold these defaults, so a faithful-TSM file is byte-identical to one
# written before the variants existed (and older tsm versions still read it)
_OMIT_DEFAULTS = {
    "shared_rank": 0,
    "routing": "hard",
    "modulation": "none",
    "modulation_bins": 20,
    "rank_schedule": "none",
    "min_rank": 1,
}


@dataclass
class ExpertSpec:
    """Timestep LoRA experts for one model.

    ``ExpertSpec(scales=(8, 1), rank=4, alpha=4, targets=["to_q", "to_k", "to_v", "to_out.0"])`` gives every
    targeted layer 8 + 1 experts: scale 0 (the finest, the *core*) cuts [0, T] into 8 intervals, scale 1 is
    one full-range *context* expert. ``scales=(1,)`` is a plain LoRA.
    """

    scales: tuple[Scale, ...] = (
        8,
        1,
    )  # finest first; an int n (uniform) or a list of cut points such as [875]
    rank: int = 4  # LoRA rank r of every expert
    alpha: float | None = None  # LoRA alpha; the update is scaled by alpha / rank (None: alpha = rank)
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # ^ module-name suffixes as in PEFT's target_modules, or "re:<regex>" matched against the full name
    dropout: float = 0.0  # dropout on the expert input (PEFT's lora_dropout)
    num_timesteps: int = DEFAULT_NUM_TIMESTEPS  # T: timesteps live in [0, T]
    router: str = "asymmetric"  # asymmetric (paper) | symmetric (no core) | z_only | t_only (ablations)
    timestep_scale: float = (
        1.0  # multiplies the model's `timestep` argument (1000 for Flux-style t in [0, 1])
    )

    shared_rank: int = 0  # > 0: one full-range LoRA of this rank on every sample, beside the routed experts
    routing: str = (
        "hard"  # hard (paper): the interval's expert | smooth: the finest scale's two nearest, hat-weighted
    )
    # one LoRA whose rank channels vary with t: dW(t) = s * B diag(d(t)) A (scales (1,) only, see `rank_factor`)
    modulation: str = (
        "none"  # none | table: d(t) = 1 + g[bin(t)], g a learned zero-initialised (bins, r) table
    )
    modulation_bins: int = 20  # rows of g: bin(t) = floor(t * bins / T), equal bins of [0, T)
    rank_schedule: str = "none"  # none | tlora: only the first r(t) ranks are on (T-LoRA, arXiv 2507.05964)
    min_rank: int = 1  # tlora: r(t) = floor((rank - min_rank) * (T - t) / T) + min_rank, rank at t = 0

    def __post_init__(self) -> None:
        self.scales = check_scales(self.scales, self.num_timesteps)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise TsmError(f"rank must be a positive int, got {self.rank!r}")
        if self.alpha is None:
            self.alpha = float(self.rank)
        if not self.alpha > 0:
            raise TsmError(f"alpha must be positive, got {self.alpha!r}")
        if isinstance(self.targets, str) or not self.targets:
            raise TsmError(f"targets must be a non-empty list of module names, got {self.targets!r}")
        self.targets = list(self.targets)
        if not 0.0 <= self.dropout < 1.0:
            raise TsmError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.router not in ROUTERS:
            raise TsmError(f"router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if not self.timestep_scale > 0:
            raise TsmError(f"timestep_scale must be positive, got {self.timestep_scale!r}")
        if (
            isinstance(self.shared_rank, bool)
            or not isinstance(self.shared_rank, int)
            or self.shared_rank < 0
        ):
            raise TsmError(f"shared_rank must be an int >= 0 (0: no shared expert), got {self.shared_rank!r}")
        if self.routing not in ROUTINGS:
            raise TsmError(f"routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")
        self._check_rank_factor()

    def _check_rank_factor(self) -> None:
        if self.modulation not in MODULATIONS:
            raise TsmError(f"modulation must be one of {', '.join(MODULATIONS)}, got {self.modulation!r}")
        if self.rank_schedule not in RANK_SCHEDULES:
            raise TsmError(
                f"rank_schedule must be one of {', '.join(RANK_SCHEDULES)}, got {self.rank_schedule!r}"
            )
        bins = self.modulation_bins
        if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= self.num_timesteps:
            raise TsmError(f"modulation_bins must be an int in [1, {self.num_timesteps}], got {bins!r}")
        low = self.min_rank
        if isinstance(low, bool) or not isinstance(low, int) or not 1 <= low <= self.rank:
            raise TsmError(f"min_rank must be an int in [1, rank={self.rank}], got {low!r}")
        if self.varies_in_rank and (self.scales != (1,) or self.shared_rank or self.routing != "hard"):
            raise TsmError(
                "modulation and rank_schedule shape one full-range LoRA: use scales [1] with no shared_rank "
                f"and hard routing (got scales {list(self.scales)}, shared_rank {self.shared_rank}, "
                f"routing {self.routing})"
            )

    @property
    def varies_in_rank(self) -> bool:
        """True when the LoRA's rank channels are weighted by a function of t (modulation, rank_schedule)."""
        return self.modulation != "none" or self.rank_schedule != "none"

    @property
    def scaling(self) -> float:
        """The factor s = alpha / rank in front of every B A x."""
        return float(self.alpha) / self.rank

    @property
    def shared_scaling(self) -> float:
        """The factor s0 in front of the shared B0 A0 x: the experts' alpha / rank, so that the shared part
        and an expert of equal weights contribute alike (PEFT's rule with lora_alpha = alpha * r0 / r)."""
        return self.scaling

    @property
    def experts_per_scale(self) -> tuple[int, ...]:
        return tuple(num_intervals(s) for s in self.scales)

    @property
    def num_gates(self) -> int:
        """Router outputs per layer: the context scales, or every scale when the router is symmetric."""
        m = len(self.scales)
        return m if self.router == "symmetric" else m - 1

    def expert_keys(self) -> list[str]:
        """Parameter names of all experts, in global order: ``s{scale}_i{index}``, finest scale first."""
        return [f"s{s}_i{i}" for s, n in enumerate(self.experts_per_scale) for i in range(n)]

    def as_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (scales as lists)."""
        d = asdict(self)
        d["scales"] = [s if isinstance(s, int) else list(s) for s in self.scales]
        return d

    def to_json(self) -> str:
        d = self.as_dict()
        for key, default in _OMIT_DEFAULTS.items():
            if d[key] == default:
                del d[key]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ExpertSpec:
        try:
            d: dict[str, Any] = json.loads(text)
        except json.JSONDecodeError as e:
            raise TsmError(f"expert spec metadata is not valid JSON ({e}); the file is corrupt") from None
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise TsmError(
                f"expert spec has unknown fields {sorted(unknown)}; was it written by a newer tsm?"
            )
        d["scales"] = tuple(s if isinstance(s, int) else tuple(s) for s in d.get("scales", (8, 1)))
        return cls(**d)
