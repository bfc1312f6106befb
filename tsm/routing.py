"""The routing object: per-sample expert choices, computed once per forward and shared by all expert layers.

It is a plain attribute of the model's expert layers (no global state, no context manager), so gradient
checkpointing, which re-runs a layer's forward during backward, sees the routing of the forward it is
recomputing -- as long as no other forward of the same model ran in between.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tsm.errors import TsmError
from tsm.intervals import check_timesteps, expert_index
from tsm.spec import ExpertSpec

STAGES = ("foster", "assemble")


@dataclass
class Route:
    """One path through the expert bank: which expert each sample uses.

    ``ids`` are *global* expert ids (position in ``ExpertSpec.expert_keys()``). ``used`` lists the distinct
    ids in the batch and ``local`` maps each sample to its position in ``used``; ``uniform`` is the shared
    id when every sample uses the same expert (the single-expert fast path, always taken when sampling).
    """

    ids: torch.Tensor  # (B,) long
    used: list[int]
    local: torch.Tensor  # (B,) long, positions into `used`
    uniform: int | None

    @classmethod
    def from_ids(cls, ids: torch.Tensor, device: torch.device | str | None = None) -> Route:
        """From host ids; the per-sample tensors are copied to ``device`` (where the layers run) once."""
        used, local = torch.unique(ids, sorted=True, return_inverse=True)
        used_list = used.tolist()
        return cls(ids.to(device), used_list, local.to(device), used_list[0] if len(used_list) == 1 else None)

    def rows(self, batch: int) -> torch.Tensor:
        """``local`` expanded to a layer input whose batch is a multiple of the routed batch (frames, pixels)."""
        return expand_batch(self.local, batch)


def expand_batch(per_sample: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat per-sample values for a layer whose batch folds extra dims into the sample dim (sample-major)."""
    b = per_sample.shape[0]
    if batch == b:
        return per_sample
    if batch % b:
        raise TsmError(
            f"an expert layer got a batch of {batch} rows but the timestep routing has {b} samples; "
            "pass one timestep per sample (or a scalar) to the model"
        )
    return per_sample.repeat_interleave(batch // b, dim=0)


@dataclass
class RoutingState:
    """What one forward routes: the main path (core, or the fostered expert), and the context paths."""

    main: Route
    context: list[Route]  # one per context scale (assembling stage), empty otherwise
    t_index: torch.Tensor  # (B,) long row of the router's timestep table E


class Routing:
    """Shared by all expert layers of one model. The model's pre-hook (or a caller) sets the timesteps.

    Stages: in ``foster`` training each sample goes through exactly one expert: the scale given by
    ``foster_scales`` (default: sample b trains scale ``b % m``) and the interval of its t at that scale. In
    ``foster`` eval, and in ``assemble``, the main path is the core (scale 0) expert of t; ``assemble`` adds
    one gated context path per coarser scale.
    """

    def __init__(self, spec: ExpertSpec) -> None:
        self.spec = spec
        self.stage = "foster"
        self.foster_scales: torch.Tensor | int | None = None  # per-sample scale to train while fostering
        self.active = True  # False: every expert layer computes its base layer alone (see tsm.experts_off)
        self.state: RoutingState | None = None
        counts = spec.experts_per_scale
        self.offsets = [sum(counts[:s]) for s in range(len(counts))]  # global id of expert 0 of each scale

    def set_timesteps(
        self, t: torch.Tensor | float, batch_size: int | None = None, training: bool = False
    ) -> None:
        """Route the next forward(s) by timestep(s) t in [0, T]: a scalar, or one per sample."""
        spec = self.spec
        t = torch.as_tensor(t).detach().reshape(-1)
        device = t.device
        t = t.cpu()  # B values: route on the host, then copy once (no per-layer or per-scale device syncs)
        if spec.timestep_scale != 1.0:  # rounded: float32 0.7 * 1000 = 699.99998 must route as 700
            t = (t.double() * spec.timestep_scale * 1e4).round() / 1e4
        if t.numel() == 1 and batch_size is not None:
            t = t.expand(batch_size)
        elif batch_size is not None and t.numel() != batch_size:
            raise TsmError(
                f"got {t.numel()} timesteps for a batch of {batch_size}; pass one per sample or a scalar"
            )
        check_timesteps(t, spec.num_timesteps)
        per_scale = [expert_index(t, s, spec.num_timesteps, check=False) for s in spec.scales]  # m x (B,)
        t_index = (t.floor() if t.dtype.is_floating_point else t).long().clamp(0, spec.num_timesteps - 1)

        if self.stage == "foster" and training:
            scale_of = self._foster_scales(t.shape[0])  # (B,)
            offsets = torch.tensor(self.offsets)[scale_of]
            chosen = torch.stack(per_scale).gather(0, scale_of[None]).squeeze(0)
            self.state = RoutingState(Route.from_ids(offsets + chosen, device), [], t_index.to(device))
            return
        context = []
        if self.stage == "assemble":
            context = [
                Route.from_ids(self.offsets[s] + per_scale[s], device) for s in range(1, len(per_scale))
            ]
        self.state = RoutingState(Route.from_ids(per_scale[0], device), context, t_index.to(device))

    def _foster_scales(self, batch: int) -> torch.Tensor:
        m = len(self.spec.scales)
        fs = self.foster_scales
        if fs is None:
            return torch.arange(batch) % m
        fs = torch.as_tensor(fs).cpu().long().reshape(-1)
        if fs.numel() == 1:
            fs = fs.expand(batch)
        if fs.numel() != batch or int(fs.min()) < 0 or int(fs.max()) >= m:
            raise TsmError(
                f"foster_scales must be one scale in [0, {m}) per sample (or one int), got {fs.tolist()}"
            )
        return fs

    def set_stage(self, stage: str) -> None:
        if stage not in STAGES:
            raise TsmError(f"stage must be 'foster' or 'assemble', got {stage!r}")
        self.stage = stage
        self.state = None
