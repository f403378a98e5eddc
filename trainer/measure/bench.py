"""One benchmark configuration: the trainer's own step and the evaluation forward, timed on a fixed synthetic
batch, with memory, FLOPs, the resolved fast path and the calculator's prediction in one JSON-able record
(the fields: launch/bench.py's docstring and docs/performance.md)."""
from __future__ import annotations

import contextlib
import itertools
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from trainer.fastpath import device_name
from trainer.measure.flops import count_flops, peak_flops
from trainer.measure.memory import PeakMemory, release_free_memory, set_malloc_thresholds
from trainer.run.errors import ConfigError

PLAIN_NOTE = ("deepspeed is not importable: the same step in plain torch (torch.optim.Adam with the same gradient "
              "clamp and clipping, bf16 by autocast over fp32 weights, no ZeRO)")


# -- environment ------------------------------------------------------------------------------------------------
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
    """Intra-op threads of a measurement: `auto` = this process's share of the usable cores (trainer/threads.py),
    whatever OMP_NUM_THREADS says: the tests' 1 thread suits data workers and tests, not a speed figure."""
    from trainer import distributed, threads

    return threads.resolve(setting, distributed.local_world_size(), env={})[0]


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
        from trainer.measure.planning import flops_per_image, plan_memory

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
class SingleProcessOnly(ConfigError):
    """Several processes were launched, but without DeepSpeed there is no engine to join them."""


@dataclass
class Session:
    world: object  # trainer.distributed.World
    use_deepspeed: bool
    warmed: bool = field(default=False)

    def measure(self, cfg, opts: BenchOptions) -> Dict[str, object]:
        """The record of one configuration (complete on rank 0); the first call warms the process up."""
        if not self.warmed:
            bench_config(tiny_twin(cfg), WARM_UP, self.world, self.use_deepspeed)
            self.warmed = True
        record = bench_config(cfg, opts, self.world, self.use_deepspeed)
        if self.world.main and self.use_deepspeed:
            keep_for_compile_auto(cfg, record)
        return record


def keep_for_compile_auto(cfg, record: Dict[str, object]) -> None:
    """This step's time (and, compiled, its compile time) for `trainer.compile=auto` on this machine
    (trainer/compile_choice.py); the trainer's own step, so only DeepSpeed's."""
    from trainer import compile_choice

    fingerprint = compile_choice.step_fingerprint(cfg, record["batch_sets"], record["grad_accum"],
                                                  record["world_size"], record["precision"],
                                                  record["channels_last"], record["device_name"])
    try:
        path = compile_choice.record(fingerprint, bool(record["compile"]), record["step_time_median_s"],
                                     record["compile_s"])
    except OSError as exc:  # a read-only home: the measurement is still printed
        print(f"bench: could not keep the measurement for trainer.compile=auto ({exc})", file=sys.stderr)
        return
    record["compile_measurements"] = str(path)


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


@dataclass(frozen=True)
class BenchOptions:
    """How one configuration is timed: `warmup` untimed optimizer steps, `steps` timed ones, the evaluation
    forward too (`eval`), and `count`: FLOPs, the CPU live-memory pass and the calculator's prediction (the
    timings and allocator peaks are always taken)."""

    warmup: int = 2
    steps: int = 5
    eval: bool = True
    count: bool = True

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.steps < 1:
            raise ConfigError(f"warmup must be >= 0 and steps >= 1, got {self.warmup} and {self.steps}")


WARM_UP = BenchOptions(warmup=0, steps=1, eval=True, count=False)


@dataclass
class Rig:
    """One configuration built as the trainer builds it, with its fixed synthetic batches."""

    cfg: object
    world: object
    use_deepspeed: bool
    plan: object  # trainer.batching.BatchPlan
    fast: object  # trainer.fastpath.FastPath
    model: torch.nn.Module
    module: torch.nn.Module
    engine: object
    n_params: int
    train_step: Callable[[], None]
    eval_step: Callable[[], None]

    def close(self) -> None:
        if self.use_deepspeed:
            self.engine.destroy()
        self.engine = self.module = self.model = self.train_step = self.eval_step = None


def build_rig(cfg, world, use_deepspeed: bool) -> Rig:
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

    return Rig(cfg, world, use_deepspeed, plan, fast, model, module, engine, n_params, train_step, eval_step)


@dataclass
class Measured:
    """What the phases measured (bytes above the base point; None where not taken)."""

    init_peak: int = 0
    live_train: Optional[int] = None
    live_eval: Optional[int] = None
    held_train: Optional[int] = None
    held_eval: Optional[int] = None
    times: List[float] = field(default_factory=list)
    eager_ops: Optional[int] = None  # ATen ops dispatched by one eager step (trainer/measure/launches.py)
    generated_calls: Optional[int] = None  # calls made by the compiled graph's generated code in one step
    first_step: Optional[float] = None  # the configuration's first training step (with trainer.compile: its capture)
    eval_times: List[float] = field(default_factory=list)
    train_flops: Optional[float] = None
    eval_flops: Optional[float] = None
    cpu_live: bool = False


def measure_cpu_live(rig: Rig, mem: PeakMemory, opts: BenchOptions, m: Measured) -> None:
    """Live tensor memory on a CPU: two training steps and an evaluation forward with glibc serving every block
    of 128 KiB or more by mmap, so that freed tensors leave the resident set at once; then glibc's dynamic
    thresholds at their maxima for the timing."""
    m.cpu_live = bool(opts.count and rig.world.device.type == "cpu" and mem.method == "cpu_vmhwm_reset"
                      and set_malloc_thresholds(128 << 10))
    if not m.cpu_live:
        return
    release_free_memory()
    mem.reset_peak()
    rig.train_step()
    rig.train_step()
    m.live_train = mem.peak()
    if opts.eval:
        rig.module.eval()
        release_free_memory()
        mem.reset_peak()
        rig.eval_step()
        m.live_eval = mem.peak()
        rig.module.train()
    set_malloc_thresholds(32 << 20, 64 << 20)


def time_first_step(rig: Rig, m: Measured) -> None:
    """Whichever phase runs the configuration's first training step (the live-memory pass or the warm-up) has it
    timed into `m.first_step`: with compile on, capture and code generation happen there."""
    step = rig.train_step

    def first_then_plain() -> None:
        m.first_step = timed(step, rig.world.device)
        rig.train_step = step

    rig.train_step = first_then_plain


def uncompiled(rig: Rig, fn: Callable, *args):
    """`fn(*args)` with compiled code run eagerly: a counting mode around a compiled step would recompile it (the
    FLOPs are those of the eager step)."""
    with torch.compiler.set_stance("force_eager") if rig.fast.compile else contextlib.nullcontext():
        return fn(*args)


def time_training(rig: Rig, mem: PeakMemory, opts: BenchOptions, m: Measured) -> None:
    device = rig.world.device
    release_free_memory()
    mem.reset_peak()
    for _ in range(opts.warmup):
        rig.train_step()
    m.times = [timed(rig.train_step, device) for _ in range(opts.steps)]
    m.held_train = mem.held()
    m.live_train = m.live_train if m.cpu_live else mem.peak()
    m.train_flops = uncompiled(rig, count_flops, rig.train_step) if opts.count else None
    if opts.count:
        from trainer.measure import launches

        m.eager_ops = launches.eager_ops(rig.train_step)
        if rig.fast.compile and rig.fast.compile_backend == "inductor":
            m.generated_calls = launches.generated_calls(rig.train_step, os.environ["TORCHINDUCTOR_CACHE_DIR"])


def time_evaluation(rig: Rig, mem: PeakMemory, opts: BenchOptions, m: Measured) -> None:
    if not opts.eval:
        return
    device = rig.world.device
    rig.module.eval()
    release_free_memory()
    mem.reset_peak()
    for _ in range(min(opts.warmup, 1)):
        rig.eval_step()
    m.eval_times = [timed(rig.eval_step, device) for _ in range(opts.steps)]
    m.held_eval = mem.held()
    m.live_eval = m.live_eval if m.cpu_live else mem.peak()
    m.eval_flops = uncompiled(rig, count_flops, rig.eval_step) if opts.count else None
    rig.module.train()


def reduce_over_ranks(m: Measured, world) -> None:
    """Memory figures are the largest over ranks."""
    values = [m.live_train, m.live_eval or 0, m.init_peak, m.held_train or 0, m.held_eval or 0]
    peaks = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.is_initialized() and world.world_size > 1:
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    live_train, live_eval, init_peak, held_train, held_eval = (int(v) for v in peaks.tolist())
    m.live_train, m.init_peak, m.held_train = live_train, init_peak, held_train
    m.live_eval = live_eval if m.live_eval is not None else None
    m.held_eval = held_eval if m.held_eval is not None else None


def bench_config(cfg, opts: BenchOptions, world, use_deepspeed: bool) -> Dict[str, object]:
    """Time one configuration in this process; the JSON record (complete on rank 0)."""
    mem = PeakMemory(world.device)
    mem.start()
    rig = build_rig(cfg, world, use_deepspeed)
    m = Measured(init_peak=mem.peak())  # building the model and the engine (DeepSpeed's flattening copies, ...)
    rig.module.train()
    time_first_step(rig, m)
    measure_cpu_live(rig, mem, opts, m)
    time_training(rig, mem, opts, m)
    time_evaluation(rig, mem, opts, m)
    mem.stop()
    reduce_over_ranks(m, world)
    record = make_record(rig, opts, m, mem)
    rig.close()
    del rig
    release_free_memory()
    return record


def make_record(rig: Rig, opts: BenchOptions, m: Measured, mem: PeakMemory) -> Dict[str, object]:
    cfg, world, plan, fast, t = rig.cfg, rig.world, rig.plan, rig.fast, rig.cfg.trainer
    device = world.device
    name = device_name(device)
    images = plan.global_sets * cfg.data.set_size
    eval_images = cfg.data.batch_sets * cfg.data.set_size
    median = statistics.median(m.times)
    eval_median = statistics.median(m.eval_times) if m.eval_times else None
    peak, basis = peak_flops(device, name, fast.precision)
    train_flops = m.train_flops
    achieved = train_flops * world.world_size / median if train_flops else None
    return {
        "model": cfg.model.name, "params": rig.n_params, "image_size": cfg.model.image_size,
        "image_channels": cfg.model.image_channels, "hidden_dim": getattr(cfg.model, "hidden_dim", None),
        "batch_sets": plan.micro_sets, "set_size": cfg.data.set_size,
        "grad_accum": plan.grad_accum, "world_size": world.world_size, "global_images_per_step": images,
        "precision": fast.precision, "precision_setting": t.precision, "channels_last": fast.channels_last,
        "guard_every": fast.guard_every, "compile": fast.compile, "zero_stage": t.zero_stage,
        "offload_optimizer": t.offload_optimizer,
        "activation_checkpointing": cfg.model.activation_checkpointing, "checkpoint_every": cfg.model.checkpoint_every,
        "engine": "deepspeed" if rig.use_deepspeed else "torch",
        "engine_note": None if rig.use_deepspeed else PLAIN_NOTE,
        "device": device.type, "device_name": name, "warmup": opts.warmup, "steps": opts.steps,
        "step_time_median_s": median, "step_time_min_s": min(m.times),
        # the first step, before the warm-up ones: with compile on, capture and code generation (the on-disk
        # cache makes a second process's first step short: trainer/compiled.py)
        "eager_ops_per_step": m.eager_ops, "generated_calls_per_step": m.generated_calls,
        "first_step_s": m.first_step, "compile_s": max(0.0, m.first_step - median) if fast.compile else None,
        "train_img_s": images / median,
        "eval_time_median_s": eval_median,
        "eval_img_s": eval_images * world.world_size / eval_median if eval_median else None,
        "peak_mem_train_bytes": m.live_train, "peak_mem_eval_bytes": m.live_eval, "peak_mem_init_bytes": m.init_peak,
        "peak_held_train_bytes": m.held_train, "peak_held_eval_bytes": m.held_eval,
        # the whole process at its highest during the timed training steps (CPU: VmHWM, what `time -v` calls
        # maximum resident set size; CUDA: the caching allocator's peak reservation incl. what it held before)
        "process_peak_train_bytes": mem.base_total + m.held_train,
        "peak_mem_method": mem.method + ("+mmap_threshold_128k" if m.cpu_live else ""),
        "train_flops_per_step": train_flops * world.world_size if train_flops else None,
        "train_flops_per_image": train_flops * world.world_size / images if train_flops else None,
        "eval_flops_per_image": m.eval_flops / eval_images if m.eval_flops else None,
        "achieved_flops_per_s": achieved,
        "mfu": achieved / (peak * world.world_size) if achieved and peak else None,
        "peak_flops_per_device": peak, "peak_flops_basis": basis,
        "predicted": prediction(cfg, world.world_size, device) if opts.count else None,
        "versions": versions(deepspeed_version() if rig.use_deepspeed else None),
    }
