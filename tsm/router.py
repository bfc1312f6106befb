"""The assembling-stage router G(z, t) = F(z) + E[t] (TSM Eqs. 5-6), and its ablation variants.

F is a linear map of the wrapped layer's input z, applied per token (linear layers) or per pixel (convs:
a conv with the base conv's geometry, so that the gate has the shape of the layer's output). E is a
learned T x g table indexed by the integer timestep. Both start at zero, so at the start of assembling
the mixture equals the core-only model.

Variants (``ExpertSpec.router``):
    asymmetric  g = m - 1 gates, one per context scale; the core is always on (the paper's design)
    symmetric   g = m gates, the core is gated too; its gate starts at 1 so the start is still core-only
    z_only      G = F(z)          (no timestep table)
    t_only      G = E[t]          (no input projection)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tsm.routing import expand_batch

_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


class Router(nn.Module):
    """Gates for one expert layer: ``forward(z, t_index)`` returns (B, *, g) for linear inputs, (B, g, *) for convs."""

    def __init__(self, base_layer: nn.Module, num_gates: int, num_timesteps: int, variant: str) -> None:
        super().__init__()
        self.variant = variant
        self.num_gates = num_gates
        self.base_conv = type(base_layer) if type(base_layer) in _CONV else None
        device = base_layer.weight.device
        if variant != "t_only":
            if self.base_conv is None:  # F: (g, in), per token
                shape = (num_gates, base_layer.in_features)
            else:  # F: (g, in, *kernel), per output pixel
                shape = (num_gates, base_layer.in_channels, *base_layer.kernel_size)
                self.conv_kwargs = dict(
                    stride=base_layer.stride, padding=base_layer.padding, dilation=base_layer.dilation
                )
            self.proj = nn.Parameter(torch.zeros(shape, device=device))
        if variant != "z_only":
            self.table = nn.Parameter(torch.zeros(num_timesteps, num_gates, device=device))  # E: (T, g)
        offset = torch.zeros(num_gates, device=device)
        if variant == "symmetric":
            offset[0] = 1.0  # the core gate starts open: assembling starts from the core-only model
        self.register_buffer("offset", offset, persistent=False)

    def forward(self, z: torch.Tensor, t_index: torch.Tensor) -> torch.Tensor:
        channel_last = self.base_conv is None
        if hasattr(self, "proj"):
            if channel_last:
                gate = F.linear(z, self.proj)  # (B, *, g)
            else:
                gate = _CONV[self.base_conv](z, self.proj, **self.conv_kwargs)  # (B, g, *spatial)
        else:
            gate = None
        extra = self.offset
        if hasattr(self, "table"):
            extra = self.table[expand_batch(t_index, z.shape[0])] + extra  # (B, g)
        else:
            extra = extra.expand(z.shape[0], -1)
        # broadcast (B, g) over tokens (linear) or output pixels (conv)
        lead = [1] * (z.dim() - 2)
        if channel_last:
            extra = extra.reshape(z.shape[0], *lead, self.num_gates)
        else:
            extra = extra.reshape(z.shape[0], self.num_gates, *lead)
        return extra if gate is None else gate + extra
