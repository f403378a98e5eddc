"""`python -m launch.bench model=<name> [data.batch_sets=..] [data.set_size=..] [trainer.precision=..]
[trainer.zero_stage=..] [device=auto|cpu|cuda] [warmup=N] [steps=N] [eval=true|false] [threads=auto|N]
[...any Hydra override]`

Times the training step the trainer runs (trainer/step.py: DeepSpeed engine forward, the alpha-weighted loss,
backward, the all-reduced non-finite guard, the engine's step with its clipping and gradient clamp; a whole
optimizer step of `trainer.grad_accum` micro batches) and the evaluation forward (trainer/evaluation/elbo.py), on a
fixed synthetic batch of the configured shape, after `warmup` untimed steps, synchronising the device around
every timed step. Prints one JSON line per configuration; comma-separated values sweep
(`model=schavae_s,schavae_m trainer.zero_stage=0,3` prints four lines; each configuration runs in a process of
its own). Also runs under torchrun (rank 0 prints; memory is the largest over ranks; img/s counts the global
batch; a sweep then runs in the one process).

Memory, in bytes above what the process held before the model was built (after an untimed warm-up step of a
tiny model, so that library code and one-time buffers are not counted; the probes: trainer/measure/memory.py):
- `peak_mem_train_bytes` / `peak_mem_eval_bytes`: live tensors at their peak -- what trainer/measure/planning.py
  predicts. GPU: `torch.cuda.max_memory_allocated` over the timed steps. CPU: the peak resident set (VmHWM) over
  two training steps and one evaluation forward run before the timed ones, with glibc serving every block of
  128 KiB or more by mmap (where /proc/self/clear_refs cannot be written: RSS sampled every millisecond during
  the timed steps). The timed steps then run with glibc's thresholds fixed at their dynamic maxima.
- `peak_held_train_bytes` / `peak_held_eval_bytes`: what the allocator held during the timed steps -- the CUDA
  caching allocator's reserved bytes, or the CPU resident set (glibc keeps freed heap memory).
- `peak_mem_init_bytes`: building the model and the engine.
`peak_mem_method` names the method. Also: FLOPs of one step and of one evaluation forward
(torch.utils.flop_counter, as executed), achieved FLOP/s, MFU (only where the device's peak is known, else null),
the calculator's prediction for the same configuration (`predicted`), library versions and the device name.
Without an importable DeepSpeed the same step runs in plain torch (trainer/measure/plain.py) and `engine` says so.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
from typing import Dict, List, Tuple

from launch.app import cli, composed, split_options
from trainer.run.errors import ConfigError

BENCH_DEFAULTS = {"device": "auto", "warmup": "2", "steps": "5", "eval": "true", "threads": "auto"}


HELP = """
python -m launch.bench model=<name> [data.batch_sets=N] [data.set_size=N] [trainer.precision=..]
                       [trainer.zero_stage=..] [device=auto|cpu|cuda] [warmup=2] [steps=5] [eval=true|false]

Times the training step and the evaluation forward of a configuration on a fixed synthetic batch; one JSON
line per configuration (img/s, step time, peak memory, FLOPs, MFU). Comma-separated values sweep.

Example:
  python -m launch.bench model=schavae data.batch_sets=16 data.set_size=5 steps=3
Docs: docs/performance.md.
"""

def parse_argv(argv: List[str]) -> Tuple[Dict[str, str], List[List[str]]]:
    """Bench options and the list of Hydra override lists (the cartesian product of comma sweeps)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

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
    try:
        parsed = OverridesParser.create().parse_overrides(rest)
    except HydraException as exc:
        raise ConfigError(str(exc)) from exc
    for o in parsed:
        key = o.get_key_element()
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        choices.append([f"{key}={v}" for v in values])
    return opts, [list(c) for c in itertools.product(*choices)]


def bench(argv: List[str]) -> int:
    opts, sweeps = parse_argv(argv)
    if opts["device"] == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before any CUDA call: the process sees no GPU
    import torch

    from trainer import distributed
    from trainer.batching import plan_batches
    from trainer.measure.bench import BenchOptions, cpu_threads, session

    torch.set_num_threads(cpu_threads(opts["threads"]))
    if opts["device"] == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no GPU")
    timing = BenchOptions(warmup=int(opts["warmup"]), steps=int(opts["steps"]), eval=opts["eval"] == "true")
    configs = []
    for overrides in sweeps:
        try:
            cfg = composed(overrides)
            plan_batches(cfg, distributed.world().world_size)
        except ConfigError as exc:
            raise ConfigError(f"({' '.join(overrides)}): {exc}") from exc
        configs.append(cfg)
    if len(configs) > 1 and not distributed.launched():
        return _run_each([f"{k}={v}" for k, v in opts.items()], sweeps)
    out = sys.stdout  # the JSON lines only: library logs and prints go to stderr
    with contextlib.redirect_stdout(sys.stderr):
        with session() as s:
            for cfg in configs:
                record = s.measure(cfg, timing)
                if s.world.main:
                    print(json.dumps(record), file=out, flush=True)
    return 0


main = cli(bench, HELP)


def _run_each(opts: List[str], sweeps: List[List[str]]) -> int:
    """One process per configuration (fresh allocator and DeepSpeed state); their JSON lines relayed in order."""
    status = 0
    for overrides in sweeps:
        proc = subprocess.run([sys.executable, "-m", "launch.bench", *opts, *overrides], stdout=subprocess.PIPE,
                              text=True)
        sys.stdout.write(proc.stdout)
        sys.stdout.flush()
        status = status or proc.returncode
    return status


if __name__ == "__main__":
    raise SystemExit(main())

