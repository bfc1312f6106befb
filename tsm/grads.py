"""Loss normalisation and gradient clipping per expert, so that fostering every expert in one run with
mixed-timestep batches takes the same optimizer steps as fostering each expert alone on its own samples."""

from __future__ import annotations

import torch
from torch import nn

from tsm.inject import expert_layers, get_routing


def expert_loss_weights(model: nn.Module) -> torch.Tensor:
    """Per-sample loss weights (B,) of the last routed forward: 1 / (samples sharing this sample's expert).

    ``(weights * per_sample_loss).sum()`` is the sum over experts of each expert's own mean loss, so each
    expert's gradient is the one a separate run on its samples would get.

    Variants: with smooth routing the finest scale's samples count as one group (1 / their number): the
    finest scale is one LoRA that varies continuously with t, and neighbouring experts share samples. The
    shared expert (``shared_rank``) is its own "expert" trained on the plain batch mean: the expert layers
    scale its per-sample gradient by n_e / B during fostering, so these weights serve it too.
    """
    state = get_routing(model).state
    if state is None:
        raise ValueError("no routed forward yet: run the model before asking for loss weights")
    if state.loss_ids is not None:  # fostering: the routing's own grouping (expert, or smooth finest scale)
        _, local = torch.unique(state.loss_ids, return_inverse=True)
        local = local.to(state.main.local.device)
    else:
        local = state.main.local
    counts = torch.bincount(local).to(torch.float32)
    return 1.0 / counts[local]


def clip_grad_norm_per_expert(model: nn.Module, max_norm: float) -> dict[str, float]:
    """Clip each expert's gradient (its A and B in every layer) to ``max_norm`` on its own; routers together.

    Returns the norm before clipping of every expert (and of ``"shared"``, ``"router"``) that has a gradient.
    With smooth routing each expert is still clipped on its own.
    """
    groups: dict[str, list[torch.Tensor]] = {}
    for _, layer in expert_layers(model):
        for key, a, b in zip(layer.keys, layer.lora_A.values(), layer.lora_B.values(), strict=True):
            for p in (a, b):
                if p.grad is not None:
                    groups.setdefault(key, []).append(p)
        if layer.shared_A is not None:  # the shared expert is clipped on its own, as one more expert
            groups.setdefault("shared", []).extend(
                p for p in (layer.shared_A, layer.shared_B) if p.grad is not None
            )
        if layer.router is not None:
            groups.setdefault("router", []).extend(p for p in layer.router.parameters() if p.grad is not None)
    get_routing(model)
    norms = {k: nn.utils.clip_grad_norm_(ps, max_norm) for k, ps in groups.items() if ps}
    values = (
        torch.stack(list(norms.values())).tolist() if norms else []
    )  # one device sync, not one per expert
    return dict(zip(norms, values, strict=True))
