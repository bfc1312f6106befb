"""The routing object: per-sample expert choices, computed once per forward and shared by all expert layers.

It is a plain attribute of the model's expert layers (no global state, no context manager), so gradient
checkpointing, which re-runs a layer's forward during backward, sees the routing of the forward it is
recomputing -- as long as no other forward of the same model ran in between.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from tsm.errors import TsmError
from tsm.intervals import Scale, check_timesteps, expert_index, interval_bounds, num_intervals
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
class Blend:
    """Smooth routing's second expert of each sample: the main expert gets weight 1 - w, this one w."""

    route: Route
    weight: torch.Tensor  # (B,) float32 on the layers' device, in [0, 1)
    uniform: float | None  # the weight of every sample, when all samples share it


@dataclass
class RoutingState:
    """What one forward routes: the main path (core, or the fostered expert), and the context paths."""

    main: Route
    context: list[Route]  # one per context scale (assembling stage), empty otherwise
    t_index: torch.Tensor  # (B,) long row of the router's timestep table E
    loss_ids: torch.Tensor | None = (
        None  # (B,) host: samples of one id share a loss mean (expert_loss_weights)
    )
    blend: Blend | None = None  # smooth routing: each sample's second core expert and its weight
    shared_grad: torch.Tensor | None = None  # (B,) factor on the shared expert's gradient (fostering)

    @property
    def merge_key(self) -> int | tuple[int, int, float] | None:
        """What the core path adds when the whole batch shares it: an expert id, (lo, hi, w) for a smooth
        blend of two, or None when samples differ (no merge)."""
        lo = self.main.uniform
        if lo is None or self.blend is None:
            return lo
        hi, w = self.blend.route.uniform, self.blend.uniform
        if hi is None or w is None:
            return None
        return lo if w == 0.0 else (lo, hi, w)

    @functools.cached_property
    def uniform_t(self) -> int | None:
        """The integer t every sample shares (None: they differ), read from the device once per state for
        all the model's layers (what a rank factor d(t) merges by)."""
        lo, hi = torch.stack(torch.aminmax(self.t_index)).tolist()  # one device sync
        return lo if lo == hi else None


def hat_weights(
    t: torch.Tensor, scale: Scale, num_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Smooth routing at one scale: (lo, hi, w) per t, the output being (1 - w) * expert lo + w * expert hi.

    Each interval's expert has weight 1 at the interval's centre and falls linearly to 0 at the neighbouring
    centres (a hat function); below the first centre or above the last the end expert has weight 1. Where
    w = 0 (a centre, or an end) hi = lo, so no second expert enters the graph.
    """
    n = num_intervals(scale)
    centres = torch.tensor(
        [sum(interval_bounds(i, scale, num_timesteps)) / 2 for i in range(n)], dtype=torch.float64
    )  # (n,)
    td = t.double()
    lo = (torch.bucketize(td, centres, right=True) - 1).clamp(0, n - 1)  # the last centre <= t
    hi = (lo + 1).clamp(max=n - 1)
    span = (centres[hi] - centres[lo]).clamp(min=1e-12)
    w = ((td - centres[lo]) / span).clamp(0.0, 1.0)
    w = torch.where(hi == lo, torch.zeros_like(w), w)
    hi = torch.where(w == 0, lo, hi)
    return lo, hi, w.float()


class Routing:
    """Shared by all expert layers of one model. The model's pre-hook (or a caller) sets the timesteps.

    Stages: in ``foster`` training each sample goes through exactly one expert: the scale given by
    ``foster_scales`` (default: sample b trains scale ``b % m``) and the interval of its t at that scale. In
    ``foster`` eval, and in ``assemble``, the main path is the core (scale 0) expert of t; ``assemble`` adds
    one gated context path per coarser scale. ``spec.routing == "smooth"`` blends the finest scale's two
    nearest experts (`hat_weights`) wherever that scale is routed; coarser scales stay hard.

    Fast path: while a sampler calls the model (eval, autograd off) and the routed core stays the same, expert
    layers that merged it call their base layer directly (see `ExpertLayer`); every routing change
    (`set_timesteps` with another interval or mode, ``active``, `set_stage`) sends them back to the full forward.
    """

    def __init__(self, spec: ExpertSpec) -> None:
        self.spec = spec
        self.stage = "foster"
        self.foster_scales: torch.Tensor | int | None = None  # per-sample scale to train while fostering
        # per-sample factor on the shared expert's gradient, set by a caller whose loss weights span more
        # than one forward (micro-batches, processes); None: count_b / B of this forward (`loss_weights`)
        self.shared_grad_scale: torch.Tensor | None = None
        self._active = True
        self.state: RoutingState | None = None
        self.hook_handle = None
        self.fast_path = True  # False: merged layers still run their full forward every call (for timing)
        self.fast_key: tuple | None = None  # the routing the fast layers were set up for (None: no fast path)
        self.fast_layers: list = []  # expert layers that currently call their base layer directly
        self._memo: dict[tuple, RoutingState] = {}  # scalar-t routings (eval, assembling), built once
        counts = spec.experts_per_scale
        self.offsets = [sum(counts[:s]) for s in range(len(counts))]  # global id of expert 0 of each scale

    @property
    def active(self) -> bool:
        """False: every expert layer computes its base layer alone (see tsm.experts_off)."""
        return self._active

    @active.setter
    def active(self, value: bool) -> None:
        self._active = value
        self.leave_fast_path()

    def leave_fast_path(self) -> None:
        """Send every layer on the fast path back to the full forward (it re-checks its merge there)."""
        for layer in self.fast_layers:
            layer.__dict__.pop("forward", None)  # the class's forward again
        self.fast_layers.clear()
        self.fast_key = None

    def set_timesteps(
        self, t: torch.Tensor | float, batch_size: int | None = None, training: bool = False
    ) -> None:
        """Route the next forward(s) by timestep(s) t in [0, T]: a scalar, or one per sample."""
        spec = self.spec
        t = torch.as_tensor(t).detach().reshape(-1)
        device = t.device
        t = t.cpu()  # B values: route on the host, then copy once (no per-layer or per-scale device syncs)
        memo = None
        if t.numel() == 1 and not (self.stage == "foster" and training):
            # a sampler's call: one t for the batch; its routing depends on nothing else, so a schedule's
            # routings are built once (the per-call cost of routing is then a dict lookup)
            memo = (t.item(), t.dtype, batch_size, self.stage, device)
            state = self._memo.get(memo)
            if state is not None:
                self.state = state
                self._check_fast_path(training)
                return
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
        smooth = spec.routing == "smooth"
        if smooth:  # the finest scale: (1 - w) * expert lo + w * expert hi
            lo, hi, w = hat_weights(t, spec.scales[0], spec.num_timesteps)
            per_scale[0] = lo

        if self.stage == "foster" and training:
            scale_of = self._foster_scales(t.shape[0])  # (B,)
            offsets = torch.tensor(self.offsets)[scale_of]
            ids = offsets + torch.stack(per_scale).gather(0, scale_of[None]).squeeze(0)
            blend = None
            if smooth:  # samples of coarser scales: hi = lo with weight 0, i.e. their one expert
                fine = scale_of == 0
                blend = self._blend(torch.where(fine, hi, ids), torch.where(fine, w, 0.0), device)
            loss_ids = self.loss_ids(t, scale_of, per_scale)
            self.state = RoutingState(
                Route.from_ids(ids, device),
                [],
                t_index.to(device),
                loss_ids=loss_ids,
                blend=blend,
                shared_grad=self._shared_grad(loss_ids, device),
            )
        else:
            context = []
            if self.stage == "assemble":
                context = [
                    Route.from_ids(self.offsets[s] + per_scale[s], device) for s in range(1, len(per_scale))
                ]
            self.state = RoutingState(
                Route.from_ids(per_scale[0], device),
                context,
                t_index.to(device),
                blend=self._blend(hi, w, device) if smooth else None,
            )
            if memo is not None:
                if len(self._memo) >= 4096:  # a bound for callers that sample ever new timesteps
                    self._memo.clear()
                self._memo[memo] = self.state
        self._check_fast_path(training)

    def _blend(self, hi: torch.Tensor, w: torch.Tensor, device: torch.device) -> Blend:
        first = float(w[0])
        uniform = first if bool((w == first).all()) else None
        return Blend(Route.from_ids(hi, device), w.to(device), uniform)

    def loss_ids(
        self, t: torch.Tensor, scale_of: torch.Tensor, per_scale: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Fostering: the samples that share an id share one loss mean (`tsm.expert_loss_weights`).

        Hard routing: the global id of each sample's expert, so every expert trains on its own mean loss.
        Smooth routing: every finest-scale sample gets id 0, since neighbouring experts share samples: the
        finest scale is one LoRA that varies continuously with t, trained on the mean loss of its samples.
        """
        spec = self.spec
        if per_scale is None:
            per_scale = [expert_index(t, s, spec.num_timesteps) for s in spec.scales]
        ids = torch.tensor(self.offsets)[scale_of] + torch.stack(per_scale).gather(0, scale_of[None])[0]
        if spec.routing == "smooth":
            ids = torch.where(scale_of == 0, torch.zeros_like(ids), ids)
        return ids

    def _shared_grad(self, loss_ids: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """The shared expert's per-sample gradient factor: it trains on the plain batch mean, so a sample
        weighted 1 / n_e by its expert's mean gets its shared gradient scaled by n_e / B."""
        if not self.spec.shared_rank:
            return None
        if self.shared_grad_scale is not None:
            scale = torch.as_tensor(self.shared_grad_scale, dtype=torch.float32).reshape(-1)
            if scale.numel() != loss_ids.numel():
                raise TsmError(
                    f"shared_grad_scale has {scale.numel()} values for a batch of {loss_ids.numel()}; "
                    "set one per sample (or None)"
                )
            return scale.to(device)
        _, inverse, counts = torch.unique(loss_ids, return_inverse=True, return_counts=True)
        return (counts[inverse].float() / loss_ids.numel()).to(device)

    def _check_fast_path(self, training: bool) -> None:
        """Keep the fast layers only if this forward routes exactly as the one they were set up for."""
        state = self.state
        key = None
        fast = self.fast_path and self._active and not training and not torch.is_grad_enabled()
        if fast and not state.context:
            merge = state.merge_key
            if merge is not None:
                key = (merge, self.stage, state.main.ids.shape[0])
        if (
            key is not None
            and self.fast_key is not None
            and key != self.fast_key
            and key[1:] == self.fast_key[1:]
        ):
            # the sampler moved to another interval: merge its expert into the fast layers right here, so they
            # stay on the fast path (no layer runs its wrapper's forward at an interval change either)
            for layer in self.fast_layers:
                layer._merge(key[0])
        elif key is None or key != self.fast_key:
            self.leave_fast_path()
        self.fast_key = key

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
        self._memo.clear()
        self.leave_fast_path()
