"""tsm: timestep LoRA experts (TimeStep Master) for diffusers models."""

from tsm.errors import TsmError
from tsm.grads import clip_grad_norm_per_expert, expert_loss_weights
from tsm.inject import (
    adapter_params,
    add_experts,
    expert_layers,
    get_routing,
    remove_experts,
    set_stage,
    set_timesteps,
    unmerge_all,
)
from tsm.intervals import expert_index, interval_bounds, sample_timesteps
from tsm.spec import ExpertSpec

__all__ = [
    "ExpertSpec",
    "TsmError",
    "adapter_params",
    "add_experts",
    "clip_grad_norm_per_expert",
    "expert_index",
    "expert_layers",
    "expert_loss_weights",
    "get_routing",
    "interval_bounds",
    "remove_experts",
    "sample_timesteps",
    "set_stage",
    "set_timesteps",
    "unmerge_all",
]
__version__ = "0.1.0"
