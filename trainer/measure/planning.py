"""The memory and communication calculator behind `python -m launch.plan` (docs/scaling.md).

Per rank and per optimizer step, for a config and a world size, without any device:

- **Parameters, gradients, optimizer state**, from the model's parameter shapes (built on the meta device) and
  what DeepSpeed 0.19 keeps at each ZeRO stage (`model_states`; the formulas are written out there), with the
  ZeRO-3 persistence threshold and optimizer offload of trainer/engine.py.
- **Activations**: the training forward runs on the meta device while autograd's saved-tensor hooks record
  every tensor kept for the backward pass (deduplicated by storage, parameters excluded). With activation
  checkpointing the checkpointed blocks are run under a hook of their own: what stays is their inputs, and the
  largest block's saved set comes back once during the backward recompute. The backward pass adds transient
  gradient buffers, taken as `BACKWARD_TRANSIENT` times the largest saved tensor. So the activation figure is
  exact for what autograd keeps, per micro batch, and linear in the micro batch.
- The figures are live tensor bytes: `torch.cuda.max_memory_allocated` on a GPU, and what `launch.bench`
  measures as `peak_mem_*` on a CPU (resident memory with glibc serving large blocks by mmap). Allocator caches
  come on top (`peak_held_*` in the bench).
- **Communication volume**: bytes each rank sends per optimizer step with ring collectives (all-reduce 2(W-1)/W,
  reduce-scatter and all-gather (W-1)/W of the payload): ZeRO 0 all-reduces gradients once per step (at the
  accumulation boundary), ZeRO 1 reduce-scatters them once and all-gathers updated parameters, ZeRO 2
  reduce-scatters every micro batch, ZeRO 3 also all-gathers the partitioned parameters in every forward and
  backward (and again for recomputed blocks).
- **FLOPs** per image of a training step and of an evaluation forward (torch.utils.flop_counter on the meta
  device).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional
from unittest import mock

import torch

from models import layers_multiscale
from models.objective import elbo_terms, training_loss
from models.registry import build_model
from trainer.config import Config
from trainer.fastpath import resolve_precision

GB = 1024**3
BACKWARD_TRANSIENT = 3  # gradient buffers alive at once in the backward pass, in units of the largest saved tensor
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # elements: DeepSpeed's default reduce_bucket_size (ZeRO 1-3)
DEFAULT_BANDWIDTH_GB_S = 50.0  # per-rank collective bandwidth assumed for the time estimate (docs/scaling.md)


# -- model shape ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamInventory:
    total: int  # trainable elements
    persistent: int  # ZeRO-3: elements of tensors small enough to stay whole on every rank
    largest_module: int  # elements of the largest module's own parameters (ZeRO-3 gathers one at a time)


def compute_dtype(cfg: Config, device_type: str = "cuda") -> torch.dtype:
    """The activations' dtype: bf16 under DeepSpeed's bf16 mode and under autocast (amp_bf16; the residual
    streams stay fp32 there, so this is the lower estimate), else fp32. `auto` as on `device_type`."""
    return torch.float32 if resolve_precision(cfg.trainer.precision, device_type) == "fp32" else torch.bfloat16


def resolved_for(cfg: Config, device_type: str) -> Config:
    """`cfg` with `trainer.precision=auto` replaced by what it means on `device_type` (trainer/fastpath.py)."""
    return replace(cfg, trainer=replace(cfg.trainer, precision=resolve_precision(cfg.trainer.precision, device_type)))


def meta_model(cfg: Config, dtype: torch.dtype) -> torch.nn.Module:
    with torch.device("meta"):
        return build_model(cfg.model).to(dtype)


def param_inventory(cfg: Config) -> ParamInventory:
    from trainer.engine import ZERO3_PERSISTENCE

    model = meta_model(cfg, torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    persistent = sum(p.numel() for p in params if p.numel() <= ZERO3_PERSISTENCE)
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return ParamInventory(sum(p.numel() for p in params), persistent, largest)


@dataclass(frozen=True)
class ActivationProfile:
    """Bytes per micro batch of `sets` sets (model dtype)."""

    sets: int
    saved: int  # kept for the backward pass outside checkpointed blocks, including checkpoint inputs
    recompute: int  # the largest checkpointed block's saved set, rematerialised once in the backward pass
    largest: int  # the largest single saved tensor
    eval_live: int  # estimate of live bytes in an evaluation forward (encoder features + working set)

    @property
    def train(self) -> int:
        return self.saved + self.recompute + BACKWARD_TRANSIENT * self.largest


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def activation_profile(cfg: Config, sets: int, model: Optional[torch.nn.Module] = None) -> ActivationProfile:
    """Run the training forward on the meta device and record what autograd keeps (see the module docstring).
    `model`: the meta model of `cfg` in its precision, if built already."""
    dtype = compute_dtype(cfg)
    model = (model if model is not None else meta_model(cfg, dtype)).train()
    params = {_storage_key(p) for p in model.parameters()}
    keep: List[torch.Tensor] = []  # holding every recorded tensor keeps storage keys unique
    outer: Dict[int, int] = {}
    blocks: List[int] = []
    largest = [0]

    def record(into: Dict[int, int], t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in params and key not in into:
            into[key] = t.untyped_storage().nbytes()
            largest[0] = max(largest[0], into[key])
            keep.append(t)
        return t

    def counting_checkpoint(fn, *args, **kwargs):
        for a in args:
            if isinstance(a, torch.Tensor):
                record(outer, a)
        inner: Dict[int, int] = {}
        with torch.autograd.graph.saved_tensors_hooks(lambda t: record(inner, t), lambda t: t):
            out = fn(*args)
        blocks.append(sum(v for k, v in inner.items() if k not in outer))
        return out

    m = cfg.model
    x = torch.zeros(sets, cfg.data.set_size, m.image_channels, m.image_size, m.image_size, device="meta", dtype=dtype)
    with mock.patch.object(layers_multiscale, "checkpoint", counting_checkpoint), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: record(outer, t), lambda t: t):
        training_loss(elbo_terms(model(x)), cfg.trainer.alpha)
    eval_live = _eval_live(model, x)
    return ActivationProfile(sets, sum(outer.values()), max(blocks, default=0), largest[0], eval_live)


@dataclass(frozen=True)
class ActivationModel:
    """Activation bytes as a linear function of the micro batch, from meta profiles at 1 and 2 sets."""

    train_1: int
    train_2: int
    eval_1: int
    eval_2: int

    def train(self, sets: int) -> int:
        return self.train_1 + (sets - 1) * (self.train_2 - self.train_1)

    def eval(self, sets: int) -> int:
        return self.eval_1 + (sets - 1) * (self.eval_2 - self.eval_1)


def activation_model(cfg: Config, model: Optional[torch.nn.Module] = None) -> ActivationModel:
    """Profiles at 1 and 2 sets; `model`: the meta model of `cfg` in its precision, if built already."""
    dtype = compute_dtype(cfg)
    model = model if model is not None else meta_model(cfg, dtype)
    one, two = (activation_profile(cfg, k, model) for k in (1, 2))
    return ActivationModel(one.train, two.train, one.eval_live, two.eval_live)


def _eval_live(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Evaluation forward: the encoder's retained features plus a working set of four of the largest tensors."""
    model.eval()
    with torch.no_grad():
        encoder = getattr(model, "encoder", None)
        if encoder is None:
            return 0
        feats = encoder(x.flatten(0, 1))
        values = [feats[k] for k in feats] if hasattr(feats, "keys") else [feats]
        sizes = [t.untyped_storage().nbytes() for t in values if isinstance(t, torch.Tensor)]
    model.train()
    return sum(sizes) + 4 * max(sizes, default=0)


def flops_per_image(cfg: Config, model: Optional[torch.nn.Module] = None) -> Dict[str, float]:
    """FLOPs per image of a training step (forward + backward, as executed) and of an evaluation forward.
    `model`: the meta model of `cfg` in its precision, if built already."""
    from torch.utils.flop_counter import FlopCounterMode

    dtype = compute_dtype(cfg)
    model = (model if model is not None else meta_model(cfg, dtype)).train()
    m, s = cfg.model, cfg.data.set_size
    x = torch.zeros(1, s, m.image_channels, m.image_size, m.image_size, device="meta", dtype=dtype)
    with FlopCounterMode(display=False) as train:
        training_loss(elbo_terms(model(x)), cfg.trainer.alpha).backward()
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as evaluation:
        elbo_terms(model(x))
    return {"train": train.get_total_flops() / s, "eval": evaluation.get_total_flops() / s}


# -- memory -----------------------------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    """Per-rank bytes (see `model_states` for what each part holds); host = offloaded to CPU memory."""

    world_size: int
    zero_stage: int
    precision: str
    offload_optimizer: str
    micro_sets: int
    grad_accum: int
    params: int
    grads: int
    optimizer: int
    buffers: int
    step_temp: int
    activations: int
    eval_activations: int
    host: int
    comm_bytes_per_step: int
    device_type: str
    notes: List[str] = field(default_factory=list)

    @property
    def model_states(self) -> int:
        """What the step holds besides activations: params, optimizer state, gradients, buffers."""
        return self.params + self.grads + self.optimizer + self.buffers

    @property
    def train_peak(self) -> int:
        """Backward pass (activations) or optimizer step (its temporaries), whichever is higher."""
        return self.model_states + max(self.activations, self.step_temp)

    @property
    def eval_peak(self) -> int:
        """Evaluation after training: parameters and optimizer state stay resident, gradients are freed."""
        return self.params + self.optimizer + self.eval_activations

    def as_dict(self) -> Dict[str, object]:
        out = asdict(self)
        out.update(model_states=self.model_states, train_peak=self.train_peak, eval_peak=self.eval_peak)
        return out


def model_states(inv: ParamInventory, world_size: int, stage: int, precision: str, offload: bool,
                 device_type: str) -> Dict[str, int]:
    """Bytes per rank of the model states, as DeepSpeed 0.19 keeps them with a torch Adam (trainer/engine.py).

    P = trainable elements, W = ranks, p = P / W (a partition), b = 4 (fp32) or 2 (bf16), Q = elements of the
    tensors ZeRO-3 keeps whole (trainer/engine.py's ZERO3_PERSISTENCE), B = DeepSpeed's reduce bucket
    (reduce_bucket_size = 5e8 elements of the model dtype: allocated in full on a GPU, touched only up to P on a
    CPU). Adam's moments and the master weights are fp32. Persistent between steps: "params", "optimizer";
    during the backward pass and the step: "grads" and "buffers"; during the step only, when the activations
    are gone: "step_temp".
    - ZeRO 0, fp32: params 4P, Adam 8P, gradients 4P; at W > 1 a flat copy of the gradients for the all-reduce
      (4P, step). bf16: bf16 params 2P, fp32 master 4P + Adam 8P, gradients: bf16 2P and the fp32
      accumulators 4P.
    - ZeRO 1/2: params bP (one flat buffer), master + Adam 12p, gradients bP on their way into the bucket B;
      at the step the fp32 gradient partition and its flattened copy (8p).
    - ZeRO 3: parameter partitions b(P - Q)/W twice (the partitions and their flat group) plus bQ; master,
      Adam and the fp32 gradient partition 16p; the bucket B; while a module runs, its gathered weights (GPU);
      with gloo (CPU) DeepSpeed's gradient reduce-scatter goes through full-size fp32 buffers: 8P (measured with
      launch.bench, fp32 and bf16); at the step the flattened gradient partition (4p).
    - On a CPU torch's Adam steps one tensor at a time and makes two temporaries of it: under ZeRO the flat
      partition, 8p (step); on a GPU the fused Adam makes none.
    - Optimizer offload moves master, moments, gradient partition and the step to host memory.
    """
    p_all, w = inv.total, world_size
    b = 2 if precision == "bf16" else 4
    cpu = device_type != "cuda"
    if stage == 0:
        if precision == "bf16":
            return {"params": 2 * p_all, "optimizer": 12 * p_all, "grads": 6 * p_all, "buffers": 0,
                    "step_temp": 0, "host": 0}
        return {"params": 4 * p_all, "optimizer": 8 * p_all, "grads": 4 * p_all, "buffers": 0,
                "step_temp": 4 * p_all if w > 1 else 0, "host": 0}
    part = math.ceil(p_all / w)
    bucket = b * (min(p_all, DEEPSPEED_REDUCE_BUCKET) if cpu else DEEPSPEED_REDUCE_BUCKET)
    adam_temp = 8 * part if cpu or offload else 0
    if stage == 3:
        q = inv.persistent
        params = b * (2 * math.ceil((p_all - q) / w) + q)
        optimizer, grads = 16 * part, (8 * p_all if cpu else b * inv.largest_module)
        step = 4 * part + adam_temp
    else:
        params, optimizer, grads = b * p_all, 12 * part, b * p_all
        step = 8 * part + adam_temp
    if offload:  # the fp32 partitions and the step live in host memory
        host = optimizer + step + (0 if stage == 3 else 4 * part)
        return {"params": params, "optimizer": 0, "grads": grads, "buffers": bucket, "step_temp": 0, "host": host}
    return {"params": params, "optimizer": optimizer, "grads": grads, "buffers": bucket, "step_temp": step,
            "host": 0}


def communication_bytes(inv: ParamInventory, world_size: int, stage: int, precision: str, grad_accum: int,
                        recompute_fraction: float) -> int:
    """Bytes each rank sends per optimizer step (ring collectives; payload in the model dtype)."""
    if world_size == 1:
        return 0
    b = 2 if precision == "bf16" else 4
    p, w, a = inv.total, world_size, grad_accum
    share = (w - 1) / w
    if stage == 0:
        return int(2 * share * p * b)
    if stage == 1:
        return int(share * p * b + share * p * b)
    if stage == 2:
        return int(a * share * p * b + share * p * b)
    partitioned = p - inv.persistent
    gathers = (2 + recompute_fraction) * share * partitioned * b  # forward, backward (+ recomputed blocks)
    return int(a * (gathers + share * p * b) + 2 * share * inv.persistent * b)


def plan_memory(cfg: Config, world_size: int, device_type: str = "cuda", activations: Optional[ActivationModel] = None,
                inventory: Optional[ParamInventory] = None) -> MemoryPlan:
    """The per-rank memory and communication of training `cfg` on `world_size` ranks (see the module docstring).
    `activations` / `inventory`: computed already for this model, precision and checkpointing."""
    from trainer.batching import plan_batches

    cfg = resolved_for(cfg, device_type)
    t = cfg.trainer
    batches = plan_batches(cfg, world_size)
    inv = inventory or param_inventory(cfg)
    act = activations or activation_model(cfg)
    precision = t.precision  # amp_bf16 keeps fp32 weights and gradients: model states and traffic as fp32
    states = model_states(inv, world_size, t.zero_stage, precision, t.offload_optimizer != "none", device_type)
    notes = []
    if device_type == "cpu":
        notes.append("cpu: live tensor bytes (launch.bench's peak_mem_*); glibc's default allocator holds more")
    elif t.zero_stage:
        notes.append(f"DeepSpeed's reduce bucket ({DEEPSPEED_REDUCE_BUCKET:.0e} elements) is allocated in full on "
                     "a GPU: most of the buffers figure for the smaller models")
    every = cfg.model.checkpoint_every if cfg.model.activation_checkpointing == "blocks" else 0
    recompute_fraction = (1.0 / every) if every else 0.0
    comm = communication_bytes(inv, world_size, t.zero_stage, precision, batches.grad_accum, recompute_fraction)
    return MemoryPlan(world_size, t.zero_stage, precision, t.offload_optimizer, batches.micro_sets,
                      batches.grad_accum, states["params"], states["grads"], states["optimizer"], states["buffers"],
                      states["step_temp"], act.train(batches.micro_sets), act.eval(batches.micro_sets),
                      states["host"], comm, device_type, notes)


# -- choosing stage, micro batch and accumulation -----------------------------------------------------------------
def max_micro_sets(cfg: Config, world_size: int, device_bytes: int, device_type: str = "cuda",
                   activations: Optional[ActivationModel] = None, inventory: Optional[ParamInventory] = None) -> int:
    """The largest per-rank micro batch (sets) whose predicted training peak fits in `device_bytes` (0: none)."""
    act = activations or activation_model(cfg)
    one = plan_memory(_with_micro(cfg, 1), world_size, device_type, act, inventory)
    room = device_bytes - one.model_states
    if room < max(one.step_temp, act.train(1)):
        return 0
    return 1 + int((room - act.train(1)) // max(act.train(2) - act.train(1), 1))


def _with_micro(cfg: Config, micro: int) -> Config:
    t = replace(cfg.trainer, global_batch_sets=0, grad_accum=1)
    return replace(cfg, data=replace(cfg.data, batch_sets=micro), trainer=t)


def options(cfg: Config, world_size: int, device_bytes: int, global_sets: int, device_type: str = "cuda",
            stages=(0, 1, 2, 3), inventory: Optional[ParamInventory] = None,
            activations: Optional[Dict[str, ActivationModel]] = None) -> List[Dict[str, object]]:
    """For each ZeRO stage x activation checkpointing (x optimizer offload from stage 1): the largest micro batch
    that fits and the smallest accumulation that reaches `global_sets` sets per optimizer step on `world_size`
    ranks with a micro batch that fits and divides it. `activations`: models computed already, by checkpointing
    mode ("none", "blocks" = every block)."""
    cfg = resolved_for(cfg, device_type)
    inv = inventory or param_inventory(cfg)
    activations = {} if activations is None else activations
    rows = []
    modes = ["none"]
    try:  # activation checkpointing where the model supports it (SCHA-VAE)
        replace(cfg.model, activation_checkpointing="blocks", checkpoint_every=1)
        modes.append("blocks")
    except ValueError:
        pass
    for ckpt in modes:
        model = replace(cfg.model, activation_checkpointing=ckpt, checkpoint_every=1)
        act = activations.get(ckpt) or activation_model(replace(cfg, model=model))
        for stage in stages:
            for offload in (("none", "cpu") if stage else ("none",)):
                c = replace(cfg, model=model, trainer=replace(cfg.trainer, zero_stage=stage, offload_optimizer=offload))
                micro = max_micro_sets(c, world_size, device_bytes, device_type, act, inv)
                row: Dict[str, object] = {"zero_stage": stage, "activation_checkpointing": ckpt,
                                          "offload_optimizer": offload, "max_micro_sets": micro,
                                          "grad_accum": None, "micro_sets": None}
                for accum in range(1, global_sets + 1):
                    if micro and global_sets % (world_size * accum) == 0 and global_sets // (world_size * accum) <= micro:
                        row.update(grad_accum=accum, micro_sets=global_sets // (world_size * accum))
                        break
                rows.append(row)
    return rows
