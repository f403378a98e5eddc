"""`python -m launch.bench model=<name> [data.batch_sets=..] [data.set_size=..] [trainer.precision=..]
[trainer.zero_stage=..] [device=auto|cpu|cuda] [warmup=N] [steps=N] [eval=true|false] [threads=auto|N]
[...any Hydra override]`

Times the training step the trainer runs (trainer/loop.py: DeepSpeed engine forward, the alpha-weighted loss,
backward, the all-reduced non-finite guard, the engine's step with its clipping and gradient clamp; a whole
optimizer step of `trainer.grad_accum` micro batches) and the evaluation forward (trainer/evaluation/elbo.py), on a
fixed synthetic batch of the configured shape, after `warmup` untimed steps, synchronising the device around
every timed step. Prints one JSON line per configuration; comma-separated values sweep
(`model=schavae_s,schavae_m trainer.zero_stage=0,3` prints four lines; each configuration runs in a process of
its own). Also runs under torchrun (rank 0 prints; memory is the largest over ranks; img/s counts the global
batch; a sweep then runs in the one process).

Memory, in bytes above what the process held before the model was built (after an untimed warm-up step of a
tiny model, so that library code and one-time buffers are not counted):
- `peak_mem_train_bytes` / `peak_mem_eval_bytes`: live tensors at their peak -- what trainer/planning.py
  predicts. GPU: `torch.cuda.max_memory_allocated` over the timed steps. CPU: the kernel's peak resident set
  (VmHWM, reset through /proc/self/clear_refs) over two training steps and one evaluation forward run before
  the timed ones, with glibc serving every block of 128 KiB or more by mmap so that freed tensors leave the
  resident set at once (where /proc/self/clear_refs cannot be written: RSS sampled every millisecond during the
  timed steps). The timed steps then run with glibc's thresholds fixed at their dynamic maxima (32 MiB mmap,
  64 MiB trim).
- `peak_held_train_bytes` / `peak_held_eval_bytes`: what the allocator held during the timed steps -- the CUDA
  caching allocator's reserved bytes, or the CPU resident set (glibc keeps freed heap memory).
- `peak_mem_init_bytes`: building the model and the engine.
`peak_mem_method` names the method. Also: FLOPs of one step and of one evaluation forward
(torch.utils.flop_counter, as executed: with activation checkpointing the recomputed forward counts), achieved
FLOP/s, MFU (only where the device's peak is known, else null), the calculator's prediction for the same
configuration (`predicted`), library versions and the device name. Without an importable DeepSpeed the same
step runs in plain torch (Adam with the same clamp, bf16 by autocast) and `engine` says so.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

from launch.app import CONFIG_DIR, split_options  # noqa: F401  (sets OMP_NUM_THREADS, registers the schema)

BENCH_DEFAULTS = {"device": "auto", "warmup": "2", "steps": "5", "eval": "true", "threads": "auto"}

# Dense peak FLOP/s by device-name substring (first match): bf16 tensor cores, TF32 tensor cores, fp32 CUDA cores.
PEAK_FLOPS = (
    ("H200", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 66.9e12}),
    ("H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51.2e12}),
    ("H100 NVL", {"bf16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 66.9e12}),
    ("A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
)


class ConfigError(ValueError):
    pass


# -- command line -----------------------------------------------------------------------------------------------
def parse_argv(argv: List[str]) -> Tuple[Dict[str, str], List[List[str]]]:
    """Bench options and the list of Hydra override lists (the cartesian product of comma sweeps)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    opts, rest = split_options(argv, BENCH_DEFAULTS)
    if opts["device"] not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {opts['device']!r}")
    for key in ("warmup", "steps"):
        if not opts[key].isdigit() or (key == "steps" and int(opts[key]) < 1):
            raise ConfigError(f"{key} must be an integer >= {1 if key == 'steps' else 0}, got {opts[key]!r}")
    if opts["threads"] != "auto" and (not opts["threads"].isdigit() or int(opts["threads"]) < 1):
        raise ConfigError(f"threads must be auto or an integer >= 1, got {opts['threads']!r}")
    if opts["eval"] not in ("true", "false"):
        raise ConfigError(f"eval must be true or false, got {opts['eval']!r}")
    choices = []
    for o in OverridesParser.create().parse_overrides(rest):
        key = o.get_key_element()
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        choices.append([f"{key}={v}" for v in values])
    return opts, [list(c) for c in itertools.product(*choices)]


# -- memory -----------------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vmhwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def release_free_memory() -> None:
    """Collect garbage and hand free heap pages back to the OS (glibc), so RSS reflects live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def set_malloc_thresholds(mmap: int, trim: Optional[int] = None) -> bool:
    """Fix glibc's mmap threshold (blocks of at least `mmap` bytes are served by mmap and unmapped when freed) and
    optionally its trim threshold; this ends glibc's dynamic adjustment of both for the process. False where
    unavailable (not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(-3, mmap))  # M_MMAP_THRESHOLD
        if trim is not None:
            ok = ok and bool(libc.mallopt(-1, trim))  # M_TRIM_THRESHOLD
        return ok
    except (OSError, AttributeError):
        return False


def fixed_mmap_threshold() -> bool:
    """Blocks of 128 KiB or more by mmap from now on: the peak resident set then follows live tensor bytes."""
    return set_malloc_thresholds(128 << 10)


class PeakMemory:
    """Peak memory of the process above a base point (`start`), by device.

    cuda: `torch.cuda.max_memory_allocated` minus the allocated bytes at `start` (tensors only; no allocator
    cache, no CUDA context). cpu: the peak resident set size VmHWM, reset at `start` by writing "5" to
    /proc/self/clear_refs (Linux), minus the RSS at `start`; without that, the largest RSS seen by a thread
    sampling /proc/self/statm every millisecond (can miss spikes shorter than that).
    """

    def __init__(self, device) -> None:
        self.device = device
        self.base = self.base_reserved = self.base_total = 0
        self._sampler: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._max = 0
        if device.type == "cuda":
            self.method = "cuda_max_memory_allocated"
        elif self._can_reset_hwm():
            self.method = "cpu_vmhwm_reset"
        else:
            self.method = "cpu_rss_sampled_1ms"

    @staticmethod
    def _can_reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            _vmhwm_bytes()
            return True
        except OSError:
            return False

    def start(self) -> None:
        import torch

        release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.base_reserved = self.base_total = torch.cuda.memory_reserved(self.device)
        else:
            self.base = self.base_total = _rss_bytes()
        self.reset_peak()

    def reset_peak(self) -> None:
        """Start a new peak (the base stays)."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method == "cpu_vmhwm_reset":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            self.stop()
            self._max = _rss_bytes()
            self._stop.clear()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._max = max(self._max, _rss_bytes())

    def stop(self) -> None:
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self._sampler = None

    def held(self) -> int:
        """What the allocator held at its highest since the last reset, above the base: the CUDA caching
        allocator's reserved bytes; on a CPU the resident set (the same as `peak`)."""
        import torch

        if self.device.type == "cuda":
            return max(0, torch.cuda.max_memory_reserved(self.device) - self.base_reserved)
        return self.peak()

    def peak(self) -> int:
        """Bytes above the base at the highest point since the last reset."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            top = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "cpu_vmhwm_reset":
            top = _vmhwm_bytes()
        else:
            top = max(self._max, _rss_bytes())
        return max(0, top - self.base)


# -- environment ------------------------------------------------------------------------------------------------
def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} cpus, {torch.get_num_threads()} torch threads)"


def versions(deepspeed_version: Optional[str]) -> Dict[str, Optional[str]]:
    import torch

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed_version,
            "cuda": torch.version.cuda, "cudnn": str(cudnn) if cudnn else None}


def peak_flops(device, name: str, precision: str) -> Tuple[Optional[float], Optional[str]]:
    """The device's dense peak for the precision the step computes in, with its basis (None where unknown)."""
    import torch

    if device.type != "cuda":
        return None, None
    for key, peaks in PEAK_FLOPS:
        if key in name:
            if precision == "bf16":
                return peaks["bf16"], "bf16 tensor"
            if torch.backends.cudnn.allow_tf32:  # convolutions (most of the work) run in TF32 by default
                return peaks["tf32"], "tf32 tensor (cudnn.allow_tf32)"
            return peaks["fp32"], "fp32"
    return None, None


def _deepspeed_version() -> Optional[str]:
    try:
        import deepspeed
    except ImportError:
        return None
    return deepspeed.__version__


# -- one configuration ------------------------------------------------------------------------------------------
def synthetic_batch(cfg, sets: int, generator):
    """A fixed (sets, S, C, H, W) batch in [0, 1] with the configured likelihood's pixel values."""
    import torch

    m, s = cfg.model, cfg.data.set_size
    shape = (sets, s, m.image_channels, m.image_size, m.image_size)
    if m.likelihood == "bernoulli":
        return torch.bernoulli(torch.full(shape, 0.3), generator=generator)
    return torch.randint(0, 256, shape, generator=generator).float() / 255.0


def _timed(fn: Callable[[], None], device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _count_flops(fn: Callable[[], None]) -> Optional[int]:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            fn()
        return int(counter.get_total_flops())
    except Exception:  # a counting failure must not lose the timings
        return None


def warm_up_process(cfg, world, use_deepspeed: bool) -> None:
    """One untimed step of a tiny SCHA-VAE with the configuration's trainer settings and image shape, before
    anything is measured: the libraries' lazily loaded code and one-time buffers then stay out of the first
    configuration's memory figures."""
    from dataclasses import replace

    tiny = replace(cfg.model, name="schavae", hidden_dim=16, c_dim=4, z_dim=4, depth=1, aggregation="mean",
                   activation_checkpointing="none", checkpoint_every=1, str_enc=None, str_gen="1-1", str_dec=None)
    res = 64 if cfg.model.image_size == 64 else 32
    strings = {32: ("32-1,16-1,8-1,4-1,2-1,1-1", "32-1,16-1,8-1,4-1,2-1,1-1"),
               64: ("64-1,32-1,16-1,8-1,4-1,2-1,1-1", "64-1,32-1,16-1,8-1,4-1,2-1,1-1")}[res]
    tiny = replace(tiny, str_enc=strings[0], str_dec=strings[1])
    small = replace(cfg, model=tiny, data=replace(cfg.data, batch_sets=1),
                    trainer=replace(cfg.trainer, global_batch_sets=0, grad_accum=1))
    bench_config(small, {"warmup": "0", "steps": "1", "eval": "true"}, world, use_deepspeed, count=False)


def bench_config(cfg, opts: Dict[str, str], world, use_deepspeed: bool, count: bool = True) -> Dict[str, object]:
    """Time one configuration in this process; the JSON record (complete on rank 0)."""
    import torch
    import torch.distributed as dist

    from dataclasses import replace

    from models.objective import elbo_terms
    from models.registry import build_model, count_parameters
    from trainer.batching import plan_batches
    from trainer.fastpath import autocast_context, resolve
    from trainer.guard import NonFiniteGuard
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
    note = None
    if use_deepspeed:
        from trainer.engine import build_engine

        engine, optimizer = build_engine(model, cfg, world)
        module = engine.module
    else:
        engine = PlainEngine(model.to(device), cfg, plan.grad_accum, fast, device)
        module, optimizer = engine.module, engine.optimizer
        note = ("deepspeed is not importable: the same step in plain torch (torch.optim.Adam with the same gradient "
                "clamp and clipping, bf16 by autocast over fp32 weights, no ZeRO)")
    step = TrainingStep(engine, optimizer, guard)
    counter = itertools.count()

    def train_step() -> None:  # one optimizer step: trainer.grad_accum micro batches, as in trainer/loop.py
        for x in micro:
            step(x, t.alpha, next(counter))

    init_peak = mem.peak()  # building the model and the engine (DeepSpeed's flattening copies, ...)
    warmup, steps = int(opts["warmup"]), int(opts["steps"])

    def eval_step() -> None:  # trainer/evaluation/elbo.py, one batch, as trainer/loop.py runs it
        with torch.no_grad(), autocast_context(fast, device.type):
            e = elbo_terms(module(eval_x))
            torch.stack([e.vlb, e.logpx, e.kl_z, e.kl_c]).double()

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
        if opts["eval"] == "true":
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
    times = [_timed(train_step, device) for _ in range(steps)]
    held_train = mem.held()
    live_train = live_train if cpu_live else mem.peak()
    train_flops = _count_flops(train_step) if count else None

    eval_times: List[float] = []
    held_eval = eval_flops = None
    if opts["eval"] == "true":
        module.eval()
        release_free_memory()
        mem.reset_peak()
        for _ in range(min(warmup, 1)):
            eval_step()
        eval_times = [_timed(eval_step, device) for _ in range(steps)]
        held_eval = mem.held()
        live_eval = live_eval if cpu_live else mem.peak()
        eval_flops = _count_flops(eval_step) if count else None
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
    median = statistics.median(times)
    peak, basis = peak_flops(device, name, fast.precision)
    achieved = train_flops * world.world_size / median if train_flops else None
    record: Dict[str, object] = {
        "model": cfg.model.name, "params": n_params, "image_size": cfg.model.image_size,
        "image_channels": cfg.model.image_channels, "batch_sets": plan.micro_sets, "set_size": cfg.data.set_size,
        "grad_accum": plan.grad_accum, "world_size": world.world_size, "global_images_per_step": images,
        "precision": fast.precision, "precision_setting": t.precision, "channels_last": fast.channels_last,
        "guard_every": fast.guard_every, "compile": fast.compile, "zero_stage": t.zero_stage,
        "offload_optimizer": t.offload_optimizer,
        "activation_checkpointing": cfg.model.activation_checkpointing, "checkpoint_every": cfg.model.checkpoint_every,
        "engine": "deepspeed" if use_deepspeed else "torch", "engine_note": note,
        "device": device.type, "device_name": name, "warmup": warmup, "steps": steps,
        "step_time_median_s": median, "step_time_min_s": min(times),
        "train_img_s": images / median,
        "eval_time_median_s": statistics.median(eval_times) if eval_times else None,
        "eval_img_s": (cfg.data.batch_sets * cfg.data.set_size * world.world_size / statistics.median(eval_times)
                       if eval_times else None),
        "peak_mem_train_bytes": live_train, "peak_mem_eval_bytes": live_eval, "peak_mem_init_bytes": init_peak,
        "peak_held_train_bytes": held_train, "peak_held_eval_bytes": held_eval,
        # the whole process at its highest during the timed training steps (CPU: VmHWM, what `time -v` calls
        # maximum resident set size; CUDA: the caching allocator's peak reservation incl. what it held before)
        "process_peak_train_bytes": mem.base_total + held_train,
        "peak_mem_method": mem.method + ("+mmap_threshold_128k" if cpu_live else ""),
        "train_flops_per_step": train_flops * world.world_size if train_flops else None,
        "train_flops_per_image": train_flops * world.world_size / images if train_flops else None,
        "eval_flops_per_image": (eval_flops / (cfg.data.batch_sets * cfg.data.set_size) if eval_flops else None),
        "achieved_flops_per_s": achieved,
        "mfu": achieved / (peak * world.world_size) if achieved and peak else None,
        "peak_flops_per_device": peak, "peak_flops_basis": basis,
        "predicted": _prediction(cfg, world.world_size, device) if count else None,
        "versions": versions(_deepspeed_version() if use_deepspeed else None),
    }
    del module, model
    if use_deepspeed:
        engine.destroy()
        del engine
    release_free_memory()
    return record


class PlainEngine:
    """The DeepSpeed engine's training-step interface in plain torch, for hosts without DeepSpeed: Adam with the
    same gradient clamp, global-norm clipping, accumulation, and bf16 by autocast over fp32 weights."""

    def __init__(self, module, cfg, grad_accum: int, fast, device) -> None:
        import torch

        from trainer.engine import add_gradient_clamp, apply_fast_path
        from trainer.fastpath import autocast_context

        self.module, self.t, self.grad_accum, self.micro = module, cfg.trainer, grad_accum, 0
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=self.t.lr, weight_decay=self.t.weight_decay,
                                          fused=device.type == "cuda")
        if self.t.grad_clamp > 0:
            add_gradient_clamp(self.optimizer, self.t.grad_clamp)
        apply_fast_path(module, fast, device.type)
        self.autocast = lambda: autocast_context(fast, device.type)

    def __call__(self, x):
        with self.autocast():
            return self.module(x.float())

    def backward(self, loss) -> None:
        (loss / self.grad_accum).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro + 1) % self.grad_accum == 0

    def step(self) -> None:
        import torch

        if self.is_gradient_accumulation_boundary():
            if self.t.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.t.grad_clip_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro += 1

    # trainer/guard.py's discard_gradients
    def bfloat16_enabled(self) -> bool:
        return False

    zero_optimization = fp16_enabled = bfloat16_enabled

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.micro = 0


def _prediction(cfg, world_size: int, device) -> Optional[Dict[str, object]]:
    """The calculator's per-rank memory for this configuration (None if it cannot say)."""
    try:
        from trainer.planning import flops_per_image, plan_memory

        p = plan_memory(cfg, world_size, device_type=device.type)
        flops = flops_per_image(cfg)
    except Exception as exc:  # the measurement stands without it
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"peak_train_bytes": p.train_peak, "peak_eval_bytes": p.eval_peak,
            "model_states_bytes": p.model_states, "activations_bytes": p.activations,
            "flops_per_image_train": flops["train"], "flops_per_image_eval": flops["eval"]}


# -- entry point ------------------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts, sweeps = parse_argv(argv)
    except Exception as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if opts["device"] == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before any CUDA call: the process sees no GPU
    import torch
    from hydra import compose, initialize_config_dir

    from trainer import distributed
    from trainer.batching import plan_batches
    from trainer.config import load_config

    torch.set_num_threads(cpu_threads(opts["threads"]))
    if opts["device"] == "cuda" and not torch.cuda.is_available():
        print("config error: device=cuda but torch sees no GPU", file=sys.stderr)
        return 2
    configs = []
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        for overrides in sweeps:
            try:
                cfg = load_config(compose("config", overrides=overrides))
                plan_batches(cfg, distributed.world().world_size)
            except Exception as exc:
                print(f"config error ({' '.join(overrides)}): {exc}", file=sys.stderr)
                return 2
            configs.append(cfg)
    if len(configs) > 1 and "RANK" not in os.environ:
        return _run_each(argv_opts(opts), sweeps)
    out = sys.stdout  # the JSON lines only: library logs and prints go to stderr
    with contextlib.redirect_stdout(sys.stderr):
        use_deepspeed = _deepspeed_version() is not None  # (DeepSpeed's logger binds to stderr here)
        if use_deepspeed:
            world = distributed.init()
        else:
            world = distributed.world()
            if world.world_size > 1:
                print("config error: without DeepSpeed the bench runs one process only", file=sys.stderr)
                return 2
        try:
            warm_up_process(configs[0], world, use_deepspeed)
            for cfg in configs:
                record = bench_config(cfg, opts, world, use_deepspeed)
                if world.main:
                    print(json.dumps(record), file=out, flush=True)
        finally:
            if use_deepspeed:
                distributed.shutdown()
    return 0


def cpu_threads(setting: str) -> int:
    """Intra-op threads: `auto` = this process's share of the machine's cores (all of them for one process; the
    entry points' default of 1 thread suits data workers and tests, not a speed measurement)."""
    if setting != "auto":
        return int(setting)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local)


def argv_opts(opts: Dict[str, str]) -> List[str]:
    return [f"{k}={v}" for k, v in opts.items()]


def _run_each(opts: List[str], sweeps: List[List[str]]) -> int:
    """One process per configuration (fresh allocator and DeepSpeed state); their JSON lines relayed in order."""
    import subprocess

    status = 0
    for overrides in sweeps:
        proc = subprocess.run([sys.executable, "-m", "launch.bench", *opts, *overrides], stdout=subprocess.PIPE,
                              text=True)
        sys.stdout.write(proc.stdout)
        sys.stdout.flush()
        status = status or proc.returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
