"""`python -m launch.plan model=<name> world_size=N device_memory_gb=G [trainer.zero_stage=..] [data.batch_sets=..]
[trainer.precision=..] [trainer.offload_optimizer=..] [model.activation_checkpointing=..] [device=cuda|cpu]
[bandwidth_gb_s=B] [format=table|json] [...any Hydra override]`

Predicts, before a job is submitted, the per-rank memory of training the configuration on N ranks (parameters,
gradients, optimizer state, DeepSpeed buffers, activations; host memory under optimizer offload), whether it
fits in G GiB, the bytes each rank communicates per optimizer step and the time that takes at B GB/s, and the
FLOPs per image; then, for every ZeRO stage x activation checkpointing (x offload), the largest micro batch that
fits and the gradient accumulation that keeps the configured global batch. `device=cpu` predicts resident
memory on a CPU host instead (what `launch.bench` measures there). The method: trainer/measure/planning.py and
docs/scaling.md.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Tuple

from launch.app import cli, composed, split_options
from trainer.run.errors import ConfigError

PLAN_KEYS = {"world_size": "1", "device_memory_gb": "80", "device": "cuda", "bandwidth_gb_s": None, "format": "table"}


HELP = """
python -m launch.plan model=<name> world_size=N device_memory_gb=G [trainer.zero_stage=..] [data.batch_sets=..]
                      [device=cuda|cpu] [bandwidth_gb_s=B] [format=table|json]

Predicts, before a job is submitted, per-rank memory, whether it fits, communication per step and FLOPs, and the
largest micro batch for every ZeRO stage x activation checkpointing.

Example:
  python -m launch.plan model=schavae_l world_size=8 device_memory_gb=80
Docs: docs/scaling.md.
"""

def parse_argv(argv: List[str]) -> Tuple[Dict[str, Optional[str]], List[str]]:
    opts, rest = split_options(argv, PLAN_KEYS)
    try:
        if int(opts["world_size"]) < 1 or float(opts["device_memory_gb"]) <= 0:
            raise ValueError
        if opts["bandwidth_gb_s"] is not None and float(opts["bandwidth_gb_s"]) <= 0:
            raise ValueError
    except ValueError:
        raise ConfigError("world_size must be an integer >= 1, device_memory_gb and bandwidth_gb_s positive numbers "
                         f"(got {opts['world_size']!r}, {opts['device_memory_gb']!r}, {opts['bandwidth_gb_s']!r})")
    if opts["device"] not in ("cuda", "cpu"):
        raise ConfigError(f"device must be cuda or cpu, got {opts['device']!r}")
    if opts["format"] not in ("table", "json"):
        raise ConfigError(f"format must be table or json, got {opts['format']!r}")
    return opts, rest


def make_report(cfg, opts: Dict[str, Optional[str]]) -> Dict[str, object]:
    from models.registry import ZOO
    from trainer.batching import plan_batches
    from trainer.measure.planning import (DEFAULT_BANDWIDTH_GB_S, GB, meta_model, activation_model, compute_dtype,
                                  flops_per_image, options, param_inventory, plan_memory, resolved_for)

    world_size = int(opts["world_size"])
    device_bytes = int(float(opts["device_memory_gb"]) * GB)
    bandwidth = float(opts["bandwidth_gb_s"] or DEFAULT_BANDWIDTH_GB_S)
    cfg = resolved_for(cfg, opts["device"])
    batches = plan_batches(cfg, world_size)
    inv = param_inventory(cfg)
    dtype = compute_dtype(cfg)
    model = meta_model(cfg, dtype)  # one meta build for this configuration's activations and FLOPs
    act = activation_model(cfg, model)
    plan = plan_memory(cfg, world_size, opts["device"], act, inv)
    flops = flops_per_image(cfg, model)
    mode = cfg.model.activation_checkpointing
    known = {"none": act} if mode == "none" else ({"blocks": act} if cfg.model.checkpoint_every == 1 else {})
    del model
    images = batches.global_sets * cfg.data.set_size
    return {
        "model": cfg.model.name, "paper_name": ZOO[cfg.model.name].paper_name if cfg.model.name in ZOO else None,
        "params": inv.total, "zero3_persistent_params": inv.persistent,
        "world_size": world_size, "device": opts["device"], "device_memory_bytes": device_bytes,
        "global_sets": batches.global_sets, "micro_sets": batches.micro_sets, "grad_accum": batches.grad_accum,
        "set_size": cfg.data.set_size, "activation_checkpointing": cfg.model.activation_checkpointing,
        "checkpoint_every": cfg.model.checkpoint_every,
        "memory": plan.as_dict(), "fits": plan.train_peak <= device_bytes,
        "flops_per_image": flops, "train_flops_per_step": flops["train"] * images,
        "comm_bytes_per_step": plan.comm_bytes_per_step, "bandwidth_gb_s": bandwidth,
        "comm_seconds_per_step": plan.comm_bytes_per_step / (bandwidth * 1e9),
        "options": options(cfg, world_size, device_bytes, batches.global_sets, opts["device"], inventory=inv,
                           activations=known),
    }


def _gib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 1024**3:7.2f}"


def print_table(r: Dict[str, object]) -> None:
    m = r["memory"]
    print(f"{r['model']} ({r['paper_name']}): {r['params']:,} parameters "
          f"({r['zero3_persistent_params']:,} in tensors small enough to stay whole under ZeRO-3)")
    print(f"FLOPs per image: training step {r['flops_per_image']['train'] / 1e9:.2f} G, "
          f"evaluation forward {r['flops_per_image']['eval'] / 1e9:.2f} G")
    print(f"{r['world_size']} rank(s), global batch {r['global_sets']} sets of {r['set_size']} = {r['micro_sets']} per rank "
          f"x {r['grad_accum']} accumulation step(s) x {r['world_size']}; ZeRO {m['zero_stage']}, {m['precision']}, "
          f"offload {m['offload_optimizer']}, activation checkpointing {r['activation_checkpointing']}"
          + (f" (every {r['checkpoint_every']})" if r["activation_checkpointing"] != "none" else ""))
    print(f"per-rank {r['device']} memory (GiB): params {_gib(m['params'])}  grads {_gib(m['grads'])}  "
          f"optimizer {_gib(m['optimizer'])}  buffers {_gib(m['buffers'])}  activations {_gib(m['activations'])}")
    print(f"  training peak {_gib(m['train_peak'])} of {_gib(r['device_memory_bytes'])} -> "
          f"{'fits' if r['fits'] else 'DOES NOT FIT'}; evaluation peak {_gib(m['eval_peak'])}; "
          f"host (offloaded) {_gib(m['host'])}")
    print(f"communication per rank and optimizer step: {r['comm_bytes_per_step'] / 1e9:.3f} GB "
          f"(~{r['comm_seconds_per_step'] * 1e3:.1f} ms at {r['bandwidth_gb_s']:g} GB/s)")
    for note in m["notes"]:
        print(f"note: {note}")
    print("\noptions for this world size and global batch:")
    print(f"{'ZeRO':>4} {'checkpointing':>13} {'offload':>7} {'max micro sets':>14} {'micro x accum':>14}")
    for o in r["options"]:
        fit = f"{o['micro_sets']} x {o['grad_accum']}" if o["grad_accum"] else "-"
        print(f"{o['zero_stage']:>4} {o['activation_checkpointing']:>13} {o['offload_optimizer']:>7} "
              f"{o['max_micro_sets']:>14} {fit:>14}")


def plan(argv: List[str]) -> int:
    from trainer.batching import plan_batches

    opts, overrides = parse_argv(argv)
    cfg = composed(overrides)
    plan_batches(cfg, int(opts["world_size"]))
    report = make_report(cfg, opts)
    if opts["format"] == "json":
        print(json.dumps(report))
    else:
        print_table(report)
    return 0


main = cli(plan, HELP)


if __name__ == "__main__":
    raise SystemExit(main())
