"""Build the DeepSpeed engine from the typed config: one engine at every world size, CPU or GPU."""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from trainer.config import Config
from trainer.distributed import World


def deepspeed_config(cfg: Config, w: World) -> Dict[str, Any]:
    """Render the Hydra config into DeepSpeed's; clipping is always explicit (DeepSpeed defaults to 1.0)."""
    t = cfg.trainer
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_sets,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.data.batch_sets * t.grad_accum * w.world_size,
        "gradient_clipping": t.grad_clip_norm,
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def add_gradient_clamp(model: nn.Module, value: float) -> None:
    """The reference's element-wise clamp of every gradient to [-value, value] (SPEC 3.11).

    A tensor hook clamps each parameter's gradient as autograd produces it, so it works under every
    ZeRO stage and precision (DeepSpeed moves gradients out of `.grad` in stages 2 and 3).
    """
    for p in model.parameters():
        if p.requires_grad:
            p.register_hook(lambda g: g.clamp(-value, value))


def build_engine(model: nn.Module, cfg: Config, w: World):
    import deepspeed

    if cfg.trainer.grad_clamp > 0:
        add_gradient_clamp(model, cfg.trainer.grad_clamp)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = w.device.type == "cuda"
    optimizer = torch.optim.Adam(params, lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay, fused=fused)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, w))
    return engine, optimizer
