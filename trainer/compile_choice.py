"""`trainer.compile=auto`: compile where this machine measured it paying, for this configuration.

Compiling helps some configurations and not others, and costs a first step of seconds to minutes (the paper
SCHA-VAE on a 2-core CPU: 1.3x a step after 230 s cold, 21 s warm; NS and CNS 1.04-1.08x; nothing yet measured on
a GPU: docs/performance.md). So `auto` does not guess. `python -m launch.bench ... trainer.compile=false,true` (and
`make gpu-check`'s compiled rows) record, per device and configuration, the eager step, the compiled step and the
compiled first step's extra time in a small JSON file (`measured_compile.json` beside the inductor cache:
`$XDG_CACHE_HOME/scha-vae/`, or `SCHA_VAE_COMPILE_MEASUREMENTS`); a training run with `auto` compiles when that
record exists and its planned steps repay the compile:

    planned steps x (eager step - compiled step) > compile seconds

and otherwise trains eagerly, saying why in the log (with the bench command that would measure it). The key is
everything that sets the step's speed -- the device (a CPU's model and torch's thread count, a GPU's name), the
torch version, the model's whole config, the micro batch, precision, layout, ZeRO stage, accumulation, world size
and backend -- so a measurement never speaks for a configuration it did not time. The file holds numbers only
(read as JSON and validated, nothing executed); a malformed one is reported and ignored.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional

import torch

from trainer.compiled import default_cache_dir

log = logging.getLogger(__name__)

PATH_ENV = "SCHA_VAE_COMPILE_MEASUREMENTS"
FILE_NAME = "measured_compile.json"
VERSION = 1
FIGURES = ("eager_step_s", "compiled_step_s", "compile_s")


def measurements_path(env=os.environ) -> Path:
    """`SCHA_VAE_COMPILE_MEASUREMENTS`, else beside the inductor cache's default (trainer/compiled.py)."""
    if env.get(PATH_ENV):
        return Path(env[PATH_ENV])
    return default_cache_dir(env).parent / FILE_NAME


def step_fingerprint(cfg, micro_sets: int, grad_accum: int, world_size: int, precision: str, channels_last: bool,
                     device: str) -> Dict[str, object]:
    """What sets the speed of one training step, with precision and layout as resolved (trainer/fastpath.py)."""
    return {"device": device, "torch": torch.__version__, "model": asdict(cfg.model), "micro_sets": micro_sets,
            "set_size": cfg.data.set_size, "grad_accum": grad_accum, "world_size": world_size,
            "precision": precision, "channels_last": bool(channels_last), "zero_stage": cfg.trainer.zero_stage,
            "offload_optimizer": cfg.trainer.offload_optimizer, "backend": cfg.trainer.compile_backend}


def key_of(fingerprint: Dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _valid(entry: object) -> bool:
    return isinstance(entry, dict) and all(
        entry.get(k) is None or (isinstance(entry.get(k), (int, float)) and math.isfinite(entry[k]) and entry[k] >= 0)
        for k in FIGURES)


def read(path: Path) -> Dict[str, dict]:
    """The records by key; empty (with a warning) when the file is missing or not what we write."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("trainer.compile=auto: ignoring %s (%s)", path, exc)
        return {}
    records = data.get("records") if isinstance(data, dict) and data.get("version") == VERSION else None
    if not isinstance(records, dict):
        log.warning("trainer.compile=auto: ignoring %s (not a version-%d measurement file)", path, VERSION)
        return {}
    return {k: v for k, v in records.items() if isinstance(k, str) and _valid(v)}


def record(fingerprint: Dict[str, object], compiled: bool, step_s: float, compile_s: Optional[float],
           path: Optional[Path] = None) -> Path:
    """Add one bench measurement: the eager step, or the compiled step and its compile seconds (the first step's
    time beyond a steady step). Read-modify-write under an exclusive lock, replaced atomically."""
    path = path or measurements_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = read(path)
        entry = records.setdefault(key_of(fingerprint), {"config": fingerprint})
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if compiled:
            entry.update(compiled_step_s=float(step_s), compile_s=float(compile_s or 0.0), compiled_at=stamp)
        else:
            entry.update(eager_step_s=float(step_s), eager_at=stamp)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": VERSION, "records": records}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class CompileChoice:
    on: bool
    reason: str


def decide(fingerprint: Dict[str, object], planned_steps: int, budget_s: float = 0.0,
           path: Optional[Path] = None) -> CompileChoice:
    """`auto`'s answer for a run of `planned_steps` optimizer steps (and at most `budget_s` seconds of training
    where > 0) of this configuration on this device."""
    path = path or measurements_path()
    entry = read(path).get(key_of(fingerprint))
    if not entry or entry.get("eager_step_s") is None or entry.get("compiled_step_s") is None:
        return CompileChoice(False, f"eager: this configuration's compiled and eager steps were not measured on "
                                    f"this device ({fingerprint['device']}); `python -m launch.bench <the run's "
                                    f"overrides> trainer.compile=false,true` measures them (into {path})")
    eager, compiled, cost = entry["eager_step_s"], entry["compiled_step_s"], entry["compile_s"] or 0.0
    measured = f"measured {eager:.3g} s a step eager, {compiled:.3g} s compiled after a {cost:.0f} s compile"
    if compiled >= eager:
        return CompileChoice(False, f"eager: {measured}")
    steps = planned_steps if budget_s <= 0 else min(planned_steps, int(budget_s / eager))
    saved = steps * (eager - compiled)
    verdict = f"{measured}; {steps} planned steps save {saved:.0f} s"
    if saved <= cost:
        return CompileChoice(False, f"eager: {verdict}, not more than the compile")
    return CompileChoice(True, f"compiled: {verdict}")
