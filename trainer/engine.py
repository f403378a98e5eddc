"""Build the DeepSpeed engine from the typed config: one engine at every world size, CPU or GPU."""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional

import torch
from torch import nn

from trainer.batching import plan_batches
from trainer.config import Config
from trainer.distributed import World
from trainer.fastpath import FastPath, resolve
from trainer.invariant import SharedNoise, replace_batchnorm


def deepspeed_config(cfg: Config, w: World) -> Dict[str, Any]:
    """Render the Hydra config into DeepSpeed's; clipping is always explicit (DeepSpeed defaults to 1.0)."""
    t = cfg.trainer
    plan = plan_batches(cfg, w.world_size)
    precision = resolve(t, w.device.type).precision
    config = {
        "train_micro_batch_size_per_gpu": plan.micro_sets,
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.global_sets,
        "gradient_clipping": t.grad_clip_norm,
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": zero_config(cfg, w),
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # offload steps our torch Adam (DeepSpeedCPUAdam needs a C++ build)
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision == "amp_bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return config


# -- ZeRO-3 and optimizer offload (the scaling work: docs/scaling.md, trainer/measure/planning.py) ---------------------
# ZeRO-3 settings. Parameters of at most ZERO3_PERSISTENCE elements stay whole on every rank (biases, heads: not
# worth a collective each); SCHA-VAE's bottleneck convolutions are mostly below DeepSpeed's default of 1e5, which
# would leave the ladder's models unpartitioned. A reuse distance of 0: every weight is used once per forward, and
# DeepSpeed's default look-ahead makes the first traced step quadratic in the number of modules (minutes at
# SCHA-VAE l / xl, thousands of modules).
ZERO3_PERSISTENCE = 10_000
ZERO3 = {"stage3_param_persistence_threshold": ZERO3_PERSISTENCE, "stage3_max_reuse_distance": 0}


def zero_config(cfg: Config, w: World) -> Dict[str, Any]:
    """The `zero_optimization` section: the stage, ZeRO-3's settings, and optimizer offload to host memory."""
    t = cfg.trainer
    zero: Dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        zero.update(ZERO3)
    if t.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": w.device.type == "cuda"}
    return zero


@contextlib.contextmanager
def _short_tensor_repr():
    """DeepSpeed's ZeRO-3 optimizer formats every parameter into a debug string when it is built (~10 ms a
    tensor: a minute for SCHA-VAE l); summarised to one item per edge meanwhile, restored after."""
    saved = {k: getattr(torch._tensor_str.PRINT_OPTS, k) for k in ("precision", "threshold", "edgeitems", "linewidth", "sci_mode")}
    torch.set_printoptions(threshold=0, edgeitems=1)
    try:
        yield
    finally:
        torch.set_printoptions(**saved)


@contextlib.contextmanager
def _linear_duplicate_check():
    """DeepSpeed checks that no parameter occurs twice in the optimizer's groups with a scan that is quadratic in
    the number of parameter tensors (40 s for SCHA-VAE l's 5,768 on a CPU, minutes for xl): the same check in
    linear time while the engine is built, the original method restored after."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine.__dict__.get("_check_for_duplicates")

    def check(self, optimizer) -> None:
        seen = set()
        for group in optimizer.param_groups:
            for p in group["params"]:
                assert id(p) not in seen, "a parameter occurs more than once in optimizer.param_groups"
                seen.add(id(p))

    if original is not None:
        DeepSpeedEngine._check_for_duplicates = check
    try:
        yield
    finally:
        if original is not None:
            DeepSpeedEngine._check_for_duplicates = original


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


def build_engine(model: nn.Module, cfg: Config, w: World, fast: Optional[FastPath] = None):
    """The DeepSpeed engine and the torch optimizer it steps, for `model`. With `trainer.data_parallel=invariant` the model's
    BatchNorm layers use global-batch statistics at world size > 1 and its training noise comes from a shared
    stream (`engine.shared_noise`, saved in checkpoints): see trainer/invariant.py. `fast`: the resolved speed
    settings where the caller decided `compile=auto` (the training loop), else resolved here."""
    import deepspeed

    fast = fast or resolve(cfg.trainer, w.device.type)
    invariant = cfg.trainer.data_parallel == "invariant"
    sync = invariant and w.world_size > 1
    if sync or fast.precision == "bf16":
        # bf16: DeepSpeed casts parameters, not buffers; BatchNorm then mixes bf16 weights with fp32 running
        # statistics (which CPU kernels reject) -- this layer normalises in fp32 and keeps fp32 statistics
        model = replace_batchnorm(model, sync=sync)
    noise = SharedNoise(model, w, cfg.trainer.seed) if invariant else None
    params = [p for p in model.parameters() if p.requires_grad]
    fused = w.device.type == "cuda" and cfg.trainer.offload_optimizer == "none"  # offload: steps on the host
    optimizer = torch.optim.Adam(params, lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay, fused=fused)
    if cfg.trainer.grad_clamp > 0:
        add_gradient_clamp(optimizer, cfg.trainer.grad_clamp)
    with _short_tensor_repr(), _linear_duplicate_check():
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, w))
    engine.shared_noise = noise
    apply_fast_path(engine.module, fast, w.device.type)
    # the torch optimizer itself, not DeepSpeed's ZeRO/bf16 wrapper (which torch LR schedulers reject): the
    # wrapper steps it with the same param_group dicts, so learning-rate changes made here reach every stage
    return engine, optimizer


def apply_fast_path(module: nn.Module, fast: FastPath, device_type: str) -> None:
    """Channels-last weights and graph capture, on the module the engine runs (after `deepspeed.initialize`, whose
    weight broadcast needs contiguous tensors). The optimizer holds the same Parameter objects, so it follows."""
    if fast.channels_last:
        module.to(memory_format=torch.channels_last)
    if fast.compile:
        from trainer.compiled import compile_training_forward

        compile_training_forward(module, device_type, fast.compile_backend)
