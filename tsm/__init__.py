"""tsm: timestep LoRA experts (TimeStep Master) for diffusers models."""

from tsm.errors import TsmError
from tsm.grads import clip_grad_norm_per_expert, expert_loss_weights
from tsm.inject import (
    adapter_params,
    add_experts,
    expert_layers,
    experts_off,
    get_routing,
    remove_experts,
    set_stage,
    set_timesteps,
    unmerge_all,
)
from tsm.intervals import expert_index, interval_bounds, sample_timesteps
from tsm.io import (
    export_all_lora,
    export_lora,
    import_lora,
    load,
    read_metadata,
    read_spec,
    save,
)
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
    "experts_off",
    "export_all_lora",
    "export_lora",
    "get_routing",
    "import_lora",
    "interval_bounds",
    "load",
    "read_metadata",
    "read_spec",
    "remove_experts",
    "sample_timesteps",
    "save",
    "set_stage",
    "set_timesteps",
    "unmerge_all",
]
__version__ = "0.1.0"
