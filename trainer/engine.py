"""Build the DeepSpeed engine from the typed config: one engine at every world size, CPU or GPU."""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from trainer.batching import plan_batches
from trainer.config import Config
from trainer.distributed import World
from trainer.invariant import SharedNoise, replace_batchnorm


def deepspeed_config(cfg: Config, w: World) -> Dict[str, Any]:
    """Render the Hydra config into DeepSpeed's; clipping is always explicit (DeepSpeed defaults to 1.0)."""
    t = cfg.trainer
    plan = plan_batches(cfg, w.world_size)
    return {
        "train_micro_batch_size_per_gpu": plan.micro_sets,
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.global_sets,
        "gradient_clipping": t.grad_clip_norm,
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def add_gradient_clamp(optimizer: torch.optim.Optimizer, value: float) -> None:
    """The reference's element-wise clamp of every gradient to [-value, value] (SPEC 3.11), applied to the
    gradients the optimizer steps with.

    DeepSpeed calls the torch optimizer's `step()` after it has reduced (all-reduce / reduce-scatter) and
    accumulated the gradients, under every ZeRO stage and precision (stages 1-2 and bf16 hand it the flat fp32
    partitions, whose `.grad` is the reduced gradient; element-wise clamping commutes with partitioning). So the
    clamp sees what one process would see on the whole global batch; a hook on each parameter would clamp every
    rank's (and every micro batch's) partial gradient instead, and N processes would train differently from one.
    It follows any global-norm clipping (`trainer.grad_clip_norm`), which DeepSpeed applies before `step()`.
    """

    def clamp(opt: torch.optim.Optimizer, args, kwargs) -> None:
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            torch._foreach_clamp_min_(grads, -value)
            torch._foreach_clamp_max_(grads, value)

    optimizer.register_step_pre_hook(clamp)


def build_engine(model: nn.Module, cfg: Config, w: World):
    """The DeepSpeed engine and the torch optimizer it steps, for `model`. With `trainer.data_parallel=invariant` the model's
    BatchNorm layers use global-batch statistics at world size > 1 and its training noise comes from a shared
    stream (`engine.shared_noise`, saved in checkpoints): see trainer/invariant.py."""
    import deepspeed

    invariant = cfg.trainer.data_parallel == "invariant"
    sync = invariant and w.world_size > 1
    if sync or cfg.trainer.precision == "bf16":
        # bf16: DeepSpeed casts parameters, not buffers; BatchNorm then mixes bf16 weights with fp32 running
        # statistics (which CPU kernels reject) -- this layer normalises in fp32 and keeps fp32 statistics
        model = replace_batchnorm(model, sync=sync)
    noise = SharedNoise(model, w, cfg.trainer.seed) if invariant else None
    params = [p for p in model.parameters() if p.requires_grad]
    fused = w.device.type == "cuda"
    optimizer = torch.optim.Adam(params, lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay, fused=fused)
    if cfg.trainer.grad_clamp > 0:
        add_gradient_clamp(optimizer, cfg.trainer.grad_clamp)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, w))
    engine.shared_noise = noise
    # the torch optimizer itself, not DeepSpeed's ZeRO/bf16 wrapper (which torch LR schedulers reject): the
    # wrapper steps it with the same param_group dicts, so learning-rate changes made here reach every stage
    return engine, optimizer
