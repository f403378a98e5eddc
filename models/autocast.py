"""What autocast will compute a tensor's operations in, for code that casts ahead of it."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype of `x`'s device when autocast is on there, else None (also on the meta device, which
    has no autocast state: the planner's shape-only runs)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if kind != "meta" and torch.is_autocast_enabled(kind) else None
