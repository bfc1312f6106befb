"""Expert layers: a bank of timestep LoRA experts around one `nn.Linear` or `nn.Conv1d/2d/3d`.

For input x and the routing of the current forward (see `tsm.routing`), with s = alpha / r::

    y = base(x) + s * B[main] A[main] x                         # core (or the fostered expert): no gate
                + s * sum_j G_j(x, t) * B[ctx_j] A[ctx_j] x     # context experts: assembling stage only
                + s0 * B0 A0 x                                  # shared expert (shared_rank > 0): every t

With smooth routing the core term is s * ((1 - w) B[lo] A[lo] + w B[hi] A[hi]) x (`tsm.routing.hat_weights`).
With a rank factor (``modulation`` / ``rank_schedule``, one full-range LoRA) it is s * B diag(d(t)) A x, d(t) in
R^r per sample: 1 + g[bin(t)] (g a learned table, zero at init) times T-LoRA's mask of the active ranks.

The base layer is wrapped, never copied. Each expert's A and B are separate parameters (``lora_A.s0_i3``),
so an expert that received no sample gets no gradient (``grad is None``) and its optimizer state does not
move: training all experts in one run equals training them one by one.

Paths:
- mixed batch, linear: gather each sample's A/B and use batched matmuls; convs: group the batch by expert;
- one expert for the whole batch: plain matmuls/convs with that expert's weights;
- eval mode with autograd off: the core expert (+ shared) is merged into the base weight when the interval
  changes (smooth routing: the blend, at every step; a rank factor: when d(t) changes, i.e. at a new table
  bin or active rank), so sampling costs what the base model costs. The
  original weight is kept and copied back on unmerge, so it is restored exactly after any number of switches;
- the fast path: once merged with nothing gated, and while the model's hook sees the same routing, the
  layer's ``forward`` *is* the base layer's bound forward (an instance attribute), so the wrapper costs one
  module call; `Routing.leave_fast_path` takes it away when the routing changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tsm.errors import TsmError
from tsm.router import Router
from tsm.routing import Route, Routing, RoutingState, expand_batch
from tsm.spec import ExpertSpec

_CONV_FN = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
SUPPORTED = (nn.Linear, *_CONV_FN)


@dataclass(frozen=True)
class StepKey:
    """The merge key of a layer with a rank factor: the expert, and what d(t) depends on at the batch's t."""

    expert: int
    row: int  # the table row bin(t) (0 without modulation)
    rank: int  # the active rank r(t) (the full rank without a rank schedule)


class ExpertLayer(nn.Module):
    """Timestep LoRA experts around ``base_layer`` (Linear or Conv1d/2d/3d). Adapters are kept in float32."""

    def __init__(self, base_layer: nn.Module, spec: ExpertSpec, routing: Routing) -> None:
        super().__init__()
        if not isinstance(base_layer, SUPPORTED):
            raise TsmError(
                f"cannot add experts to {type(base_layer).__name__}; supported: Linear, Conv1d/2d/3d"
            )
        self.conv_fn = next((fn for cls, fn in _CONV_FN.items() if isinstance(base_layer, cls)), None)
        if self.conv_fn is not None and base_layer.groups != 1:
            raise TsmError(
                f"cannot add experts to a grouped conv (groups={base_layer.groups}); drop it from targets"
            )
        self.base_layer = base_layer
        self.routing = routing  # shared; a plain attribute, not a submodule
        self.scaling = spec.scaling
        self.keys = spec.expert_keys()  # global expert id -> parameter name
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        r, device = spec.rank, base_layer.weight.device
        if self.conv_fn is None:
            a_shape, b_shape = (r, base_layer.in_features), (base_layer.out_features, r)
        else:  # A: conv with the base kernel/stride/padding; B: 1x1 conv (as PEFT)
            kernel = tuple(base_layer.kernel_size)
            a_shape, b_shape = (
                (r, base_layer.in_channels, *kernel),
                (base_layer.out_channels, r, *[1] * len(kernel)),
            )
            self.conv_kwargs = dict(
                stride=base_layer.stride, padding=base_layer.padding, dilation=base_layer.dilation
            )
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for key in self.keys:
            a = torch.empty(a_shape, device=device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default init of A
            self.lora_A[key] = nn.Parameter(a)
            self.lora_B[key] = nn.Parameter(
                torch.zeros(b_shape, device=device)
            )  # B = 0: starts as the base layer
        self.shared_scaling = spec.shared_scaling
        self.shared_A: nn.Parameter | None = None
        self.shared_B: nn.Parameter | None = None
        if spec.shared_rank:  # one full-range LoRA of rank r0 on every sample: A0 (r0, in[, *k]), B0 = 0
            r0 = spec.shared_rank
            a = torch.empty((r0, *a_shape[1:]), device=device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.shared_A = nn.Parameter(a)
            self.shared_B = nn.Parameter(torch.zeros((b_shape[0], r0, *b_shape[2:]), device=device))
        self.router = (
            Router(base_layer, spec.num_gates, spec.num_timesteps, spec.router)
            if spec.num_gates > 0
            else None
        )
        self.symmetric = spec.router == "symmetric"
        # rank factor d(t) (spec.varies_in_rank): g, a (bins, r) table, zero: the layer starts as the plain LoRA
        self.rank = r
        self.num_timesteps = spec.num_timesteps
        self.varies_in_rank = spec.varies_in_rank
        self.bins = spec.modulation_bins
        self.modulation: nn.Parameter | None = None
        if spec.modulation == "table":
            self.modulation = nn.Parameter(torch.zeros((spec.modulation_bins, r), device=device))
        self.min_rank = spec.min_rank if spec.rank_schedule == "tlora" else None
        self.merged: int | tuple[int, int, float] | StepKey | None = None  # expert id (or blend) merged in
        self._base_weight: torch.Tensor | None = None  # original weight while merged
        self._flat: tuple[torch.Tensor, torch.Tensor] | None = None  # 2-D views of the weight and of it
        self.train(base_layer.training)  # a model loaded in eval mode stays in eval mode (merge, no dropout)

    def expert_params(self) -> list[nn.Parameter]:
        """Every expert's A and B, and the shared expert's (what fostering trains and assembling freezes)."""
        shared = [self.shared_A, self.shared_B] if self.shared_A is not None else []
        table = [self.modulation] if self.modulation is not None else []
        return [*self.lora_A.values(), *self.lora_B.values(), *shared, *table]

    # ------------------------------------------------------------------------------------------------
    # rank factor d(t): modulation table and T-LoRA's rank schedule
    # ------------------------------------------------------------------------------------------------
    def active_rank(self, t_index: torch.Tensor) -> torch.Tensor:
        """T-LoRA's r(t) = floor((r - r_min) (T - t) / T) + r_min per sample (the full rank without a
        schedule): r at t = 0, r_min from t > T - T / (r - r_min) on; t_index (B,) long in [0, T)."""
        if self.min_rank is None:
            return torch.full_like(t_index, self.rank)
        return (self.rank - self.min_rank) * (
            self.num_timesteps - t_index
        ) // self.num_timesteps + self.min_rank

    def rank_factor(self, t_index: torch.Tensor) -> torch.Tensor:
        """d(t) (B, r): (1 + g[bin(t)]) * [k < r(t)], with bin(t) = floor(t bins / T); t_index (B,) long."""
        d = None
        if self.modulation is not None:
            d = 1.0 + self.modulation[t_index * self.bins // self.num_timesteps]  # (B, r)
        if self.min_rank is not None:
            ranks = torch.arange(self.rank, device=t_index.device)  # (r,)
            mask = (ranks < self.active_rank(t_index)[:, None]).to(torch.float32)  # (B, r)
            d = mask if d is None else d * mask
        return d

    def step_factor(self, t: float) -> torch.Tensor:
        """d(t) (r,) at one timestep t in [0, T] (what `tsm.io.export_step_lora` bakes into B)."""
        t_index = torch.tensor(
            [min(int(float(t)), self.num_timesteps - 1)], device=self.lora_A[self.keys[0]].device
        )
        return self.rank_factor(t_index)[0].detach()

    def _row_factor(self, key: StepKey) -> torch.Tensor:
        """d (r,) of a merge key: the same values `rank_factor` gives each sample at that key's t."""
        device = self.lora_A[self.keys[0]].device
        d = 1.0 + self.modulation[key.row] if self.modulation is not None else None
        if self.min_rank is not None:
            mask = (torch.arange(self.rank, device=device) < key.rank).to(torch.float32)  # (r,)
            d = mask if d is None else d * mask
        return d

    def _step_key(self, expert: int, state: RoutingState) -> StepKey | None:
        """The merge key at the batch's one t, or None when its samples differ in t (no merge)."""
        t = state.uniform_t
        if t is None:
            return None
        row = t * self.bins // self.num_timesteps if self.modulation is not None else 0
        rank = self.rank  # r(t) as `active_rank`, in Python ints (no tensor on this per-call path)
        if self.min_rank is not None:
            rank = (self.rank - self.min_rank) * (
                self.num_timesteps - t
            ) // self.num_timesteps + self.min_rank
        return StepKey(expert, row, rank)

    def _scaled_b(self, b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """B diag(d): d (r,) on B's rank axis, (out, r) or (out, r, 1, ..)."""
        return b * d.reshape(1, -1, *[1] * (b.dim() - 2))

    # ------------------------------------------------------------------------------------------------
    # single expert
    # ------------------------------------------------------------------------------------------------
    def _lora(
        self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor | None = None
    ) -> torch.Tensor:
        """B diag(d) A x; d (B', r) per routed sample, or None (the plain B A x)."""
        if self.conv_fn is None:
            if d is None:
                return F.linear(F.linear(x, a), b)  # (B, *, r) -> (B, *, out)
            d = expand_batch(d, x.shape[0]).reshape(x.shape[0], *[1] * (x.dim() - 2), -1)  # (B, 1.., r)
            return F.linear(F.linear(x, a) * d, b)
        h = self.conv_fn(x, a, **self.conv_kwargs)  # (B, r, *)
        if d is not None:
            h = h * expand_batch(d, x.shape[0]).reshape(*h.shape[:2], *[1] * (h.dim() - 2))
        return self.conv_fn(h, b)  # (B, out, *)

    def _product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """B A shaped like the base weight: (out, in) or (out, in, *kernel)."""
        if self.conv_fn is None:
            return b @ a
        return torch.einsum("or,ri...->oi...", b.flatten(1), a)

    def delta_weight(self, expert: int | tuple[int, int, float]) -> torch.Tensor:
        """The weight update of a merge key: s * B A for one expert, or (1 - w) s B_lo A_lo + w s B_hi A_hi
        for a smooth blend; plus s0 * B0 A0 when there is a shared expert (float32)."""
        terms = iter(self._merge_terms(expert))
        c, a, b = next(terms)
        delta = c * self._product(a, b)
        for c, a, b in terms:
            delta = delta + c * self._product(a, b)
        return delta

    # ------------------------------------------------------------------------------------------------
    # mixed batches
    # ------------------------------------------------------------------------------------------------
    def _route(self, x: torch.Tensor, route: Route, d: torch.Tensor | None = None) -> torch.Tensor:
        """s * B A x with each sample's expert; x is the (dropped-out, float32) input; d: the rank factor
        (one expert only: the spec allows a rank factor with scales (1,) alone)."""
        if route.uniform is not None:
            key = self.keys[route.uniform]
            return self.scaling * self._lora(x, self.lora_A[key], self.lora_B[key], d)
        rows = route.rows(x.shape[0])  # (B,) position of each row's expert in route.used
        if self.conv_fn is None:
            a = torch.stack([self.lora_A[self.keys[e]] for e in route.used])  # (k, r, in)
            b = torch.stack([self.lora_B[self.keys[e]] for e in route.used])  # (k, out, r)
            x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, L, in)
            h = torch.bmm(x3, a[rows].transpose(1, 2))  # (B, L, r)
            y = torch.bmm(h, b[rows].transpose(1, 2))  # (B, L, out)
            return self.scaling * y.reshape(*x.shape[:-1], y.shape[-1])
        out = None
        for pos, expert in enumerate(route.used):  # a loop over experts, never over samples
            idx = (rows == pos).nonzero().squeeze(1)
            key = self.keys[expert]
            y = self._lora(x.index_select(0, idx), self.lora_A[key], self.lora_B[key])
            if out is None:
                out = y.new_zeros((x.shape[0], *y.shape[1:]))
            out = out.index_copy(0, idx, y)
        return self.scaling * out

    def _core(self, x: torch.Tensor, state: RoutingState) -> torch.Tensor:
        """The main path: one expert per sample, or smooth routing's per-sample blend of two."""
        d = self.rank_factor(state.t_index) if self.varies_in_rank else None
        main = self._route(x, state.main, d)
        blend = state.blend
        if blend is None or blend.uniform == 0.0:
            return main
        if blend.uniform is not None and blend.route.uniform == state.main.uniform:
            return main  # hi = lo for the whole batch (weight 0 on hi)
        w = expand_batch(blend.weight, x.shape[0]).reshape(-1, *[1] * (x.dim() - 1))  # (B, 1, ...)
        return (1.0 - w) * main + w * self._route(x, blend.route)

    def _shared(self, x: torch.Tensor, grad_scale: torch.Tensor | None) -> torch.Tensor:
        """s0 * B0 A0 x. Fostering: sample b's gradient into A0, B0 is scaled by ``grad_scale[b]`` (so the
        shared expert trains on the plain batch mean) while the gradient it sends back to x is unchanged."""
        if grad_scale is None or not torch.is_grad_enabled():
            return self.shared_scaling * self._lora(x, self.shared_A, self.shared_B)
        c = expand_batch(grad_scale, x.shape[0]).reshape(-1, *[1] * (x.dim() - 1))  # (B, 1, ...)
        if x.requires_grad:
            x = x.view_as(x)  # its own node: only the shared branch's gradient to x is rescaled
            x.register_hook(lambda g: g / c)
        y = self.shared_scaling * self._lora(x, self.shared_A, self.shared_B)
        if y.requires_grad:
            y.register_hook(lambda g: g * c)
        return y

    # ------------------------------------------------------------------------------------------------
    # merge / unmerge
    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, expert: int | tuple[int, int, float]) -> None:
        """Put expert ``expert`` (global id, or a smooth blend (lo, hi, w)) into the base weight; a no-op
        if it is there already."""
        self._merge(expert)

    def _merge(self, expert: int | tuple[int, int, float]) -> None:
        """`merge` without its no_grad context (the sampling forward calls it with autograd off already)."""
        if self.merged == expert:
            return
        weight = self.base_layer.weight
        if self._base_weight is None:
            self._base_weight = weight.detach().clone()
        if weight.dtype != torch.float32 or not weight.is_contiguous():
            weight.copy_(self._base_weight)
            weight.add_(self.delta_weight(expert).to(weight.dtype))
            self.__dict__["merged"] = expert
            return
        # W = W0 + sum_k c_k B_k A_k as fused addmm passes over W: a merge costs what one pass over W costs.
        # The 2-D views are kept while they still view the weight (a .to() replaces its storage).
        flat = self._flat
        if flat is None or flat[0].data_ptr() != weight.data_ptr():
            out = weight.shape[0]
            flat = (weight.view(out, -1), self._base_weight.view(out, -1))  # (out, in * kernel)
            self.__dict__["_flat"] = flat
        w2, base2 = flat
        terms = self._merge_terms(expert)
        for k, (c, a, b) in enumerate(terms):
            if self.conv_fn is not None:
                a, b = a.flatten(1), b.flatten(1)  # (r, in * kernel), (out, r)
            if k == 0:
                torch.addmm(base2, b, a, alpha=c, out=w2)
            else:
                w2.addmm_(b, a, alpha=c)
        # plain values set past nn.Module.__setattr__ (its checks cost more than the merge on small layers)
        self.__dict__["merged"] = expert

    def _merge_terms(
        self, expert: int | tuple[int, int, float]
    ) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
        """(c, A, B) with delta_weight(expert) = sum c B A; never empty."""
        if isinstance(expert, tuple):
            lo, hi, w = expert
            keys = [(lo, 1.0 - w), (hi, w)] if w != 0 else [(lo, 1.0)]
        elif isinstance(expert, StepKey):  # s B diag(d(t)) A: d folded into B's columns
            key = self.keys[expert.expert]
            d = self._row_factor(expert)
            return [(self.scaling, self.lora_A[key], self._scaled_b(self.lora_B[key], d))]
        else:
            keys = [(expert, 1.0)]
        terms = [(self.scaling * w, self.lora_A[self.keys[e]], self.lora_B[self.keys[e]]) for e, w in keys]
        if self.shared_A is not None:
            terms.append((self.shared_scaling, self.shared_A, self.shared_B))
        return terms

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the original base weight exactly (and leave the fast path)."""
        self.__dict__.pop("forward", None)
        if self._base_weight is not None:
            self.base_layer.weight.copy_(self._base_weight)
        self._base_weight = None
        self._flat = None
        self.merged = None

    # ------------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if not self.routing.active:  # the base model, e.g. the frozen teacher of distillation
            if self.merged is not None:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        state = self.routing.state
        if state is None:
            raise TsmError(
                "expert layer called before any timestep was set: call the model with a `timestep`, "
                "or tsm.set_timesteps(model, t) for a model that has none (text encoders)"
            )
        key = state.merge_key
        merge = not self.training and not torch.is_grad_enabled() and key is not None and not self.symmetric
        # a float8-stored base (model.storage_dtype) would round the expert away: it adds on the side
        merge = merge and self.base_layer.weight.element_size() > 1
        if merge and self.varies_in_rank:  # d(t) too must be one for the batch: merged per (row, rank)
            key = self._step_key(key, state)
            merge = key is not None
        if merge:
            self._merge(key)  # autograd is off here (merge requires it)
        elif self.merged is not None:
            self.unmerge()
        out = self.base_layer(x, *args, **kwargs)
        if merge and not state.context:  # sampling a fostered model: exactly the base model's cost
            routing = self.routing
            # a rank factor changes with t inside the routing's one expert, which the fast path does not see:
            # those layers stay on this forward (one wrapper call a layer) and re-merge when d(t) changes
            if routing.fast_key is not None and routing.hook_handle is not None and not self.varies_in_rank:
                # the hook re-checks the routing every forward and calls leave_fast_path on any change
                self.__dict__["forward"] = self.base_layer.forward  # (past nn.Module.__setattr__)
                routing.fast_layers.append(self)
            return out
        z = x.to(torch.float32)
        zd = self.dropout(z)
        gates = self.router(z, state.t_index) if (state.context or self.symmetric) else None
        gate_axis = -1 if self.conv_fn is None else 1
        delta = None
        if not merge:
            delta = self._core(zd, state)
            if self.symmetric:
                delta = delta * gates.narrow(gate_axis, 0, 1)
            if self.shared_A is not None:
                delta = delta + self._shared(zd, state.shared_grad)
        first = 1 if self.symmetric else 0
        for j, route in enumerate(state.context):
            term = gates.narrow(gate_axis, first + j, 1) * self._route(zd, route)
            delta = term if delta is None else delta + term
        return out if delta is None else out + delta.to(out.dtype)

    def extra_repr(self) -> str:
        return f"experts={len(self.keys)}, scaling={self.scaling:g}, merged={self.merged}"
