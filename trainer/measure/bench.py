"""One benchmark configuration: the trainer's own step and the evaluation forward, timed on a fixed synthetic
batch, with memory, FLOPs, the resolved fast path and the calculator's prediction in one JSON-able record
(the fields: launch/bench.py's docstring and docs/performance.md)."""
from __future__ import annotations

import contextlib
import itertools
import os
import platform
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from trainer.measure.flops import count_flops, peak_flops
from trainer.measure.memory import PeakMemory, release_free_memory, set_malloc_thresholds

PLAIN_NOTE = ("deepspeed is not importable: the same step in plain torch (torch.optim.Adam with the same gradient "
              "clamp and clipping, bf16 by autocast over fp32 weights, no ZeRO)")


# -- environment ------------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} cpus, {torch.get_num_threads()} torch threads)"


def deepspeed_version() -> Optional[str]:
    try:
        import deepspeed
    except ImportError:
        return None
    return deepspeed.__version__


def versions(deepspeed: Optional[str]) -> Dict[str, Optional[str]]:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed,
            "cuda": torch.version.cuda, "cudnn": str(cudnn) if cudnn else None}


def cpu_threads(setting: str) -> int:
    """Intra-op threads: `auto` = this process's share of the machine's cores (all of them for one process; the
    entry points' default of 1 thread suits data workers and tests, not a speed measurement)."""
    if setting != "auto":
        return int(setting)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local)


# -- pieces of a measurement ------------------------------------------------------------------------------------
def synthetic_batch(cfg, sets: int, generator: torch.Generator) -> torch.Tensor:
    """A fixed (sets, S, C, H, W) batch in [0, 1] with the configured likelihood's pixel values."""
    m, s = cfg.model, cfg.data.set_size
    shape = (sets, s, m.image_channels, m.image_size, m.image_size)
    if m.likelihood == "bernoulli":
        return torch.bernoulli(torch.full(shape, 0.3), generator=generator)
    return torch.randint(0, 256, shape, generator=generator).float() / 255.0


def timed(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds of one call, the device synchronised on both sides (only around timed calls, never in the step)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def prediction(cfg, world_size: int, device: torch.device) -> Optional[Dict[str, object]]:
    """The calculator's per-rank memory and FLOPs for this configuration (an error entry if it cannot say)."""
    try:
        from trainer.planning import flops_per_image, plan_memory

        p = plan_memory(cfg, world_size, device_type=device.type)
        flops = flops_per_image(cfg)
    except Exception as exc:  # the measurement stands without it
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"peak_train_bytes": p.train_peak, "peak_eval_bytes": p.eval_peak,
            "model_states_bytes": p.model_states, "activations_bytes": p.activations,
            "flops_per_image_train": flops["train"], "flops_per_image_eval": flops["eval"]}


def tiny_twin(cfg):
    """A one-block-per-resolution SCHA-VAE with `cfg`'s trainer settings and image shape, one set per batch: its
    untimed step loads the libraries' lazy code and one-time buffers before anything is measured."""
    strings = {32: "32-1,16-1,8-1,4-1,2-1,1-1", 64: "64-1,32-1,16-1,8-1,4-1,2-1,1-1"}
    ladder = strings[64 if cfg.model.image_size == 64 else 32]
    tiny = replace(cfg.model, name="schavae", hidden_dim=16, c_dim=4, z_dim=4, depth=1, aggregation="mean",
                   activation_checkpointing="none", checkpoint_every=1, str_enc=ladder, str_gen="1-1", str_dec=ladder)
    return replace(cfg, model=tiny, data=replace(cfg.data, batch_sets=1),
                   trainer=replace(cfg.trainer, global_batch_sets=0, grad_accum=1))


# -- a session: one process group, any number of configurations -------------------------------------------------
class SingleProcessOnly(ValueError):
    """Several processes were launched, but without DeepSpeed there is no engine to join them."""


@dataclass
class Session:
    world: object  # trainer.distributed.World
    use_deepspeed: bool
    warmed: bool = field(default=False)

    def measure(self, cfg, opts: Dict[str, str], count: bool = True) -> Dict[str, object]:
        """The record of one configuration (complete on rank 0); the first call warms the process up. `count`:
        FLOPs, the CPU live-memory pass and the calculator's prediction (the timings and allocator peaks always)."""
        if not self.warmed:
            bench_config(tiny_twin(cfg), {"warmup": "0", "steps": "1", "eval": "true"}, self.world,
                         self.use_deepspeed, count=False)
            self.warmed = True
        return bench_config(cfg, opts, self.world, self.use_deepspeed, count=count)


@contextlib.contextmanager
def session() -> Iterator[Session]:
    """The process group the trainer would use (DeepSpeed's, also at world size 1), torn down on exit; plain torch
    in one process where DeepSpeed is not importable."""
    from trainer import distributed

    use_deepspeed = deepspeed_version() is not None
    if use_deepspeed:
        world = distributed.init()
    else:
        world = distributed.world()
        if world.world_size > 1:
            raise SingleProcessOnly("without DeepSpeed the bench runs one process only")
    try:
        yield Session(world, use_deepspeed)
    finally:
        if use_deepspeed:
            distributed.shutdown()


def bench_config(cfg, opts: Dict[str, str], world, use_deepspeed: bool, count: bool = True) -> Dict[str, object]:
    """Time one configuration in this process; the JSON record (complete on rank 0). `opts`: warmup, steps, eval."""
    from models.objective import elbo_terms
    from models.registry import build_model, count_parameters
    from trainer.batching import plan_batches
    from trainer.fastpath import autocast_context, resolve
    from trainer.guard import NonFiniteGuard
    from trainer.measure.plain import PlainEngine
    from trainer.step import TrainingStep

    device = world.device
    plan = plan_batches(cfg, world.world_size)
    t = cfg.trainer
    fast = resolve(t, device.type)
    if not use_deepspeed and fast.precision == "bf16":  # plain torch has no bf16-weights mode: autocast instead
        fast = replace(fast, precision="amp_bf16")
    torch.manual_seed(t.seed)
    gen = torch.Generator().manual_seed(t.seed + 1)
    micro = [synthetic_batch(cfg, plan.micro_sets, gen).to(device, fast.input_dtype) for _ in range(plan.grad_accum)]
    eval_x = synthetic_batch(cfg, cfg.data.batch_sets, gen).to(device, fast.input_dtype)

    mem = PeakMemory(device)
    mem.start()
    model = build_model(cfg.model)
    n_params = count_parameters(model)
    guard = NonFiniteGuard(model, t.max_consecutive_skips, fast.guard_every, device)
    if use_deepspeed:
        from trainer.engine import build_engine

        engine, optimizer = build_engine(model, cfg, world)
        module = engine.module
    else:
        engine = PlainEngine(model.to(device), cfg, plan.grad_accum, fast, device)
        module, optimizer = engine.module, engine.optimizer
    step = TrainingStep(engine, optimizer, guard)
    counter = itertools.count()

    def train_step() -> None:  # one optimizer step: trainer.grad_accum micro batches, as in trainer/loop.py
        for x in micro:
            step(x, t.alpha, next(counter))

    def eval_step() -> None:  # trainer/evaluation/elbo.py, one batch, as trainer/loop.py runs it
        with torch.no_grad(), autocast_context(fast, device.type):
            e = elbo_terms(module(eval_x))
            torch.stack([e.vlb, e.logpx, e.kl_z, e.kl_c]).double()

    init_peak = mem.peak()  # building the model and the engine (DeepSpeed's flattening copies, ...)
    warmup, steps, with_eval = int(opts["warmup"]), int(opts["steps"]), opts["eval"] == "true"
    module.train()
    live_train = live_eval = None
    cpu_live = count and device.type == "cpu" and mem.method == "cpu_vmhwm_reset" and set_malloc_thresholds(128 << 10)
    if cpu_live:
        # live tensor memory on a CPU: two training steps and an evaluation forward with glibc serving every block
        # of 128 KiB or more by mmap, so that freed tensors leave the resident set at once
        release_free_memory()
        mem.reset_peak()
        train_step()
        train_step()
        live_train = mem.peak()
        if with_eval:
            module.eval()
            release_free_memory()
            mem.reset_peak()
            eval_step()
            live_eval = mem.peak()
            module.train()
        set_malloc_thresholds(32 << 20, 64 << 20)  # the timing: glibc's dynamic thresholds at their maxima

    release_free_memory()
    mem.reset_peak()
    for _ in range(warmup):
        train_step()
    times = [timed(train_step, device) for _ in range(steps)]
    held_train = mem.held()
    live_train = live_train if cpu_live else mem.peak()
    train_flops = count_flops(train_step) if count else None

    eval_times: List[float] = []
    held_eval = eval_flops = None
    if with_eval:
        module.eval()
        release_free_memory()
        mem.reset_peak()
        for _ in range(min(warmup, 1)):
            eval_step()
        eval_times = [timed(eval_step, device) for _ in range(steps)]
        held_eval = mem.held()
        live_eval = live_eval if cpu_live else mem.peak()
        eval_flops = count_flops(eval_step) if count else None
        module.train()
    mem.stop()

    values = [live_train, live_eval or 0, init_peak, held_train or 0, held_eval or 0]
    peaks = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.is_initialized() and world.world_size > 1:
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    live_train, live_eval_all, init_peak, held_train, held_eval_all = (int(v) for v in peaks.tolist())
    live_eval = live_eval_all if live_eval is not None else None
    held_eval = held_eval_all if held_eval is not None else None

    name = device_name(device)
    images = plan.global_sets * cfg.data.set_size
    eval_images = cfg.data.batch_sets * cfg.data.set_size
    median = statistics.median(times)
    eval_median = statistics.median(eval_times) if eval_times else None
    peak, basis = peak_flops(device, name, fast.precision)
    achieved = train_flops * world.world_size / median if train_flops else None
    record: Dict[str, object] = {
        "model": cfg.model.name, "params": n_params, "image_size": cfg.model.image_size,
        "image_channels": cfg.model.image_channels, "hidden_dim": getattr(cfg.model, "hidden_dim", None),
        "batch_sets": plan.micro_sets, "set_size": cfg.data.set_size,
        "grad_accum": plan.grad_accum, "world_size": world.world_size, "global_images_per_step": images,
        "precision": fast.precision, "precision_setting": t.precision, "channels_last": fast.channels_last,
        "guard_every": fast.guard_every, "compile": fast.compile, "zero_stage": t.zero_stage,
        "offload_optimizer": t.offload_optimizer,
        "activation_checkpointing": cfg.model.activation_checkpointing, "checkpoint_every": cfg.model.checkpoint_every,
        "engine": "deepspeed" if use_deepspeed else "torch", "engine_note": None if use_deepspeed else PLAIN_NOTE,
        "device": device.type, "device_name": name, "warmup": warmup, "steps": steps,
        "step_time_median_s": median, "step_time_min_s": min(times),
        "train_img_s": images / median,
        "eval_time_median_s": eval_median,
        "eval_img_s": eval_images * world.world_size / eval_median if eval_median else None,
        "peak_mem_train_bytes": live_train, "peak_mem_eval_bytes": live_eval, "peak_mem_init_bytes": init_peak,
        "peak_held_train_bytes": held_train, "peak_held_eval_bytes": held_eval,
        # the whole process at its highest during the timed training steps (CPU: VmHWM, what `time -v` calls
        # maximum resident set size; CUDA: the caching allocator's peak reservation incl. what it held before)
        "process_peak_train_bytes": mem.base_total + held_train,
        "peak_mem_method": mem.method + ("+mmap_threshold_128k" if cpu_live else ""),
        "train_flops_per_step": train_flops * world.world_size if train_flops else None,
        "train_flops_per_image": train_flops * world.world_size / images if train_flops else None,
        "eval_flops_per_image": eval_flops / eval_images if eval_flops else None,
        "achieved_flops_per_s": achieved,
        "mfu": achieved / (peak * world.world_size) if achieved and peak else None,
        "peak_flops_per_device": peak, "peak_flops_basis": basis,
        "predicted": prediction(cfg, world.world_size, device) if count else None,
        "versions": versions(deepspeed_version() if use_deepspeed else None),
    }
    del module, model, step, optimizer
    if use_deepspeed:
        engine.destroy()
    del engine
    release_free_memory()
    return record
