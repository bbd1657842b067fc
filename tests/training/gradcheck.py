"""Central differences, the numeric side of the tests' hand checks of autograd."""

from __future__ import annotations

from typing import Callable

import torch


def central_differences(f: Callable[[torch.Tensor], torch.Tensor], value: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """d f / d value, one coordinate at a time: (f(v + eps e_i) - f(v - eps e_i)) / (2 eps)."""
    value = value.detach()
    numeric = torch.zeros_like(value)
    for i in range(value.numel()):
        bump = torch.zeros_like(value)
        bump.view(-1)[i] = eps
        numeric.view(-1)[i] = (f(value + bump) - f(value - bump)) / (2 * eps)
    return numeric
