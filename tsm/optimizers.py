"""The optimizers of a run, chosen by ``optim.name``: every recipe builds its optimizers here.

    name       class                                   install          notes
    adamw      torch.optim.AdamW                       (core)           the default
    adamw8bit  bitsandbytes.optim.AdamW8bit            tsm[bnb]         needs a CUDA GPU
    prodigy    prodigyopt.Prodigy                      tsm[prodigy]     lr ~1.0: it estimates its step size d
    adafactor  transformers.optimization.Adafactor     (core)           uses lr; betas and eps ignored

Per-expert bookkeeping: adamw, adamw8bit and adafactor update each tensor from its own gradient and state,
and skip a tensor whose ``grad is None`` (an expert no sample was routed to), so fostering experts together
still equals fostering them apart. Prodigy too skips such tensors, but its step size d is one number
estimated from every parameter it holds: experts trained together then share it.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import torch

from tsm.config import OPTIMIZERS, OptimConfig
from tsm.errors import TsmError

# Adafactor as kohya's sd-scripts and SimpleTuner configure it for LoRA: a fixed lr (from the schedule)
# instead of its relative step, no scaling by the parameter's RMS, no warm-up of its own
ADAFACTOR_FIXED = {"relative_step": False, "scale_parameter": False, "warmup_init": False}


def build_optimizer(
    optim: OptimConfig, param_groups: list[dict[str, Any]], *, fused: bool | None = None
) -> torch.optim.Optimizer:
    """``optim.name``'s optimizer over ``param_groups`` (dicts with ``params`` and optionally ``lr`` and
    ``weight_decay``; missing ones are ``optim.lr`` / ``optim.weight_decay``).

    ``fused``: adamw only, torch's fused kernel (one kernel for the many small per-expert tensors).
    """
    groups = [{"lr": optim.lr, "weight_decay": optim.weight_decay, **g} for g in param_groups]
    betas = (float(optim.betas[0]), float(optim.betas[1]))
    name = optim.name
    if name == "adamw":
        return torch.optim.AdamW(groups, betas=betas, eps=optim.eps, fused=fused)
    if name == "adamw8bit":
        return _bnb_adamw8bit(groups, betas, optim.eps)
    if name == "prodigy":
        return _prodigy(optim, groups, betas)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=optim.lr, weight_decay=optim.weight_decay, **ADAFACTOR_FIXED)
    raise TsmError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def _on_cuda(groups: list[dict[str, Any]]) -> bool:
    return torch.cuda.is_available() and all(p.is_cuda for g in groups for p in g["params"])


def _bnb_adamw8bit(groups: list[dict[str, Any]], betas: tuple[float, float], eps: float) -> Any:
    if not _on_cuda(groups):  # bitsandbytes' 8-bit AdamW runs CUDA kernels
        raise TsmError(
            "optim.name=adamw8bit needs a CUDA GPU (parameters on cuda); use optim.name=adamw here"
        )
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise TsmError("optim.name=adamw8bit needs bitsandbytes: pip install 'tsm[bnb]'") from None
    return bnb.optim.AdamW8bit(groups, betas=betas, eps=eps)


def _prodigy(optim: OptimConfig, groups: list[dict[str, Any]], betas: tuple[float, float]) -> Any:
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise TsmError("optim.name=prodigy needs prodigyopt: pip install 'tsm[prodigy]'") from None
    lrs = sorted({float(g["lr"]) for g in groups})
    if len(lrs) > 1:  # Prodigy raises at its first step otherwise: d is one step size for all groups
        raise TsmError(f"optim.name=prodigy takes one learning rate for all its parameters, got {lrs}")
    if lrs[0] < 0.1:  # e.g. distill.fake_lr: its steps are d * lr
        raise TsmError(f"optim.name=prodigy estimates its own step size: set its lr to 1.0 (got {lrs[0]})")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay"
        return Prodigy(
            groups,
            lr=lrs[0],
            betas=betas,
            beta3=optim.prodigy_beta3,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            decouple=optim.prodigy_decouple,
            use_bias_correction=optim.prodigy_use_bias_correction,
            safeguard_warmup=optim.prodigy_safeguard_warmup,
            d_coef=optim.prodigy_d_coef,
        )
