"""Add and remove timestep experts on any model; the timestep pre-hook; stages; what trains.

``add_experts(model, spec)`` wraps every targeted layer in an `ExpertLayer` and, when the model's forward
takes a ``timestep`` argument (every diffusers denoiser does), registers one forward pre-hook that reads it
and sets the routing that all expert layers share. Unmodified pipelines and training loops then route by
themselves. Models without a timestep (text encoders) are routed with `set_timesteps`.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
import re
from collections.abc import Iterator

import torch
from torch import nn

from tsm.errors import TsmError
from tsm.experts import SUPPORTED, ExpertLayer
from tsm.routing import Routing
from tsm.spec import ExpertSpec

ATTR = "tsm_routing"  # the model attribute holding the shared Routing


class _Hook:
    """Forward pre-hook: read the model's ``timestep`` argument and route the forward by it."""

    def __init__(self, routing: Routing, position: int | None) -> None:
        self.routing = routing
        self.position = position  # index of `timestep` among positional args (self excluded)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if "timestep" in kwargs:
            t = kwargs["timestep"]
        elif self.position is not None and len(args) > self.position:
            t = args[self.position]
        else:
            return  # no timestep this call: keep the routing set by the caller
        if t is None:
            return
        if isinstance(t, torch.Tensor) and t.dim() > 1:
            # per-token timesteps (B, L) (Wan 2.2 TI2V, `expand_timesteps`): a sample is routed by the t of its
            # noised tokens, the largest; tokens at 0 are the clean conditioning frame. (B,) and scalars as given
            t = t.flatten(1).amax(1)  # (B,)
        first = next(
            (a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() > 0), None
        )
        batch = first.shape[0] if first is not None else None
        self.routing.set_timesteps(t, batch_size=batch, training=module.training)


def _timestep_position(model: nn.Module) -> int | None:
    """Where ``timestep`` sits among forward's positional arguments, or None if forward has no such argument."""
    params = list(inspect.signature(model.forward).parameters.values())
    for i, p in enumerate(params):
        if p.name == "timestep":
            return i if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) else -1
    return None


def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    return name == target or name.endswith("." + target)


def _resolve_targets(model: nn.Module, targets: list[str]) -> list[str]:
    names = [n for n, _ in model.named_modules() if n]
    chosen: dict[str, None] = {}
    for target in targets:
        hits = [n for n in names if _matches(n, target)]
        if not hits:
            suffixes = sorted({".".join(n.split(".")[-k:]) for n in names for k in (1, 2)})
            close = difflib.get_close_matches(target.removeprefix("re:"), suffixes, n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise TsmError(f"target {target!r} matches no module of {type(model).__name__}{hint}")
        chosen.update(dict.fromkeys(hits))
    modules = dict(model.named_modules())
    out = []
    for name in chosen:
        module = modules[name]
        if isinstance(module, ExpertLayer):
            raise TsmError(f"{name} already has experts; call tsm.remove_experts(model) first")
        if isinstance(module, SUPPORTED):
            out.append(name)
    if not out:
        raise TsmError(f"targets {targets} match no Linear or Conv layer of {type(model).__name__}")
    return out


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def add_experts(model: nn.Module, spec: ExpertSpec, stage: str = "foster") -> nn.Module:
    """Wrap ``spec.targets`` of ``model`` in expert layers, in place, and set ``stage``; returns the model."""
    if getattr(model, ATTR, None) is not None:
        raise TsmError(f"{type(model).__name__} already has experts; call tsm.remove_experts(model) first")
    routing = Routing(spec)
    for name in _resolve_targets(model, spec.targets):
        _set_submodule(model, name, ExpertLayer(model.get_submodule(name), spec, routing))
    position = _timestep_position(model)
    handle = None
    if position is not None:
        hook = _Hook(routing, position if position >= 0 else None)
        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    routing.hook_handle = handle
    setattr(model, ATTR, routing)  # a plain attribute: not a submodule, not in state_dict
    set_stage(model, stage)
    return model


def get_routing(model: nn.Module) -> Routing:
    routing = getattr(model, ATTR, None)
    if routing is None:
        raise TsmError(f"{type(model).__name__} has no experts; call tsm.add_experts(model, spec) first")
    return routing


def expert_layers(model: nn.Module) -> Iterator[tuple[str, ExpertLayer]]:
    """(name, layer) for every expert layer, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, ExpertLayer):
            yield name, module


def set_timesteps(model: nn.Module, t: torch.Tensor | float, batch_size: int | None = None) -> None:
    """Route the model's next forward(s) by timestep(s) t explicitly (text encoders, or any model)."""
    get_routing(model).set_timesteps(t, batch_size=batch_size, training=model.training)


def set_stage(model: nn.Module, stage: str) -> None:
    """Freeze what the paper freezes. foster: only experts train; assemble: experts frozen, only routers train."""
    routing = get_routing(model)
    routing.set_stage(stage)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in expert_layers(model):
        layer.unmerge()
        for p in layer.expert_params():  # the routed experts and the shared one: trained in fostering only
            p.requires_grad_(stage == "foster")
        if layer.router is not None:
            for p in layer.router.parameters():
                p.requires_grad_(stage == "assemble")


def adapter_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train in the current stage (pass them to the optimizer)."""
    get_routing(model)
    return [p for _, layer in expert_layers(model) for p in layer.parameters() if p.requires_grad]


def remove_experts(model: nn.Module) -> nn.Module:
    """Unmerge and unwrap every expert layer and remove the hook: the original module tree comes back."""
    routing = get_routing(model)
    for name, layer in list(expert_layers(model)):
        layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
    if routing.hook_handle is not None:
        routing.hook_handle.remove()
    delattr(model, ATTR)
    return model


def base_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the base model, without experts or hook (e.g. distillation's fake score); ``model`` is untouched."""
    routing = get_routing(model)
    handle, routing.hook_handle = (
        routing.hook_handle,
        None,
    )  # a copied handle would remove the original's hook
    try:
        twin = copy.deepcopy(model)
    finally:
        routing.hook_handle = handle
    for name, layer in list(expert_layers(twin)):
        layer.unmerge()
        _set_submodule(twin, name, layer.base_layer)
    for key, hook in list(twin._forward_pre_hooks.items()):
        if isinstance(hook, _Hook):
            del twin._forward_pre_hooks[key]
            twin._forward_pre_hooks_with_kwargs.pop(key, None)
    delattr(twin, ATTR)
    return twin


@contextlib.contextmanager
def experts_off(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: inside the block every expert layer computes its base layer only.

    The same weights serve as the frozen teacher (distillation's real score) with no second copy. Keep the
    backward of a checkpointed forward inside the block that ran it.
    """
    routing = get_routing(model)
    before, routing.active = routing.active, False
    try:
        yield model
    finally:
        routing.active = before


def unmerge_all(model: nn.Module) -> None:
    """Restore every base weight (e.g. before saving the base model with save_pretrained)."""
    for _, layer in expert_layers(model):
        layer.unmerge()
