"""Checkpoints behind a small interface: save everything needed to resume exactly, find the latest, load it --
at the world size that wrote it or another one -- and consolidate one into a plain fp32 state dict.

Layout of `<dir>/<tag>/` (tag = `step<9 digits>`):
- DeepSpeed's files, each written by the rank that holds the data: `mp_rank_00_model_states.pt` (module,
  client state, and at ZeRO 0 the whole optimizer) from rank 0, and at ZeRO 1/2 one
  `*zero_pp_rank_<r>_mp_rank_00_optim_states.pt` per rank (its partition of the fp32 weights and Adam moments);
- `rng/rank<r>.pt`: every rank's own random streams (torch/CUDA, numpy, python);
- `meta.json`: world size, ZeRO stage, precision and step of the writer;
- `complete.json`: written by rank 0 after every rank finished, the size of every file: a checkpoint without it,
  or with a file of another size, is incomplete or damaged and is never loaded.
The client state (loop and scheduler state, learning rates, the shared training-noise stream, the moving average
of the weights when `trainer.ema_decay` is on) rides in
DeepSpeed's model-states file. `<dir>/latest` names the newest complete checkpoint: it is replaced atomically
only after every rank has written everything. Resuming does not trust it blindly: `resume_candidates` lists the
intact checkpoints newest first, whatever `latest` says (missing, stale, or naming a damaged checkpoint), and a
checkpoint that still fails to load is skipped for the next one, with a warning naming what was skipped.
Writes go through Python file objects, so a full disk surfaces as `RunIOError` naming the file and the OS error
(torch's own writer reports only "unexpected pos").

Another world size: an optimizer state that is partitioned over ranks (ZeRO >= 1, DeepSpeed's bf16 optimizer) is
re-partitioned through DeepSpeed's universal checkpoint format: rank 0 converts `<tag>` once into
`<dir>/universal/<tag>` (`deepspeed.checkpoint.ds_to_universal`), and every rank loads its new partition from
there. Otherwise (ZeRO 0) the checkpoint holds whole tensors and loads at any world size as it is.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from trainer import compat, distributed
from trainer.run.errors import RunIOError

log = logging.getLogger(__name__)

MODEL_STATES = "mp_rank_00_model_states.pt"
COMPLETE = "complete.json"
INTERRUPTED = "incomplete (no complete.json: the save was interrupted)"  # never a finished checkpoint: not damage
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


# What our own loads of DeepSpeed's model-states file and of rng/rank<r>.pt may unpickle besides tensors and
# plain containers (torch.load(weights_only=True) refuses every other global). Found by loading real
# checkpoints at ZeRO 0/1/2, fp32 and bf16: everything comes from numpy's RNG state (`np.random.get_state()` is
# ('MT19937', uint32 ndarray, ...)), saved in rng/rank<r>.pt and in the client state's "rng". `_reconstruct` and
# `ndarray` rebuild the array; `dtype` and numpy 2's per-type dtype class (UInt32DType, which
# torch.serialization.get_unsafe_globals_in_checkpoint does not list: it is created while unpickling) give its
# element type. The array's contents go through the same restricted unpickler. DeepSpeed's optimizer-shard files
# (which also hold LossScaler, ZeroStageEnum, fragment_address) are read by DeepSpeed itself, never through here.
def _numpy_rng_globals() -> list:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    # the file names the function by the module path of the numpy that wrote it (numpy 2 renamed core -> _core)
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), (_reconstruct, "numpy.core.multiarray._reconstruct"),
            (_reconstruct, "numpy._core.multiarray._reconstruct")]


def load_state_file(path: Path) -> Any:
    """torch.load of a checkpoint file we read ourselves: tensors, containers and numpy RNG state only."""
    with torch.serialization.safe_globals(_numpy_rng_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _engine_layout(engine) -> Dict[str, Any]:
    """ZeRO stage, precision, and whether the optimizer state is split over ranks (DeepSpeed's ZeRO optimizer
    and its partitioned bf16 optimizer write one `*zero_pp_rank_<r>*` file per rank)."""
    return {"zero_stage": int(engine.zero_optimization_stage()),
            "precision": "bf16" if engine.bfloat16_enabled() else "fp32",
            "partitioned": bool(getattr(engine, "save_zero_checkpoint", False))}


def model_fingerprint(module) -> Dict[str, Any]:
    """What a checkpoint's weights fit: the parameters' count and a digest of their names and shapes (ZeRO-3's
    partitioned parameters report their whole shape in `ds_shape`)."""
    shapes = [f"{n}:{tuple(getattr(p, 'ds_shape', p.shape))}" for n, p in module.named_parameters()]
    return {"parameters": len(shapes), "shapes_sha256": hashlib.sha256("\n".join(shapes).encode()).hexdigest()}


def _zero_shards(path: Path) -> list:
    return sorted(path.glob("*zero_pp_rank_*_optim_states.pt"))


def _file_sizes(path: Path) -> Dict[str, int]:
    return {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*"))
            if f.is_file() and f.name != COMPLETE}


def _step_of(tag: str) -> int:
    try:
        return int(tag[len("step"):])
    except ValueError:
        return -1


class Checkpointer:
    def __init__(self, directory: Path, keep: int) -> None:
        self.dir = Path(directory)
        self.keep = keep

    def latest_tag(self) -> Optional[str]:
        """What `latest` names, if that checkpoint exists (see `resume_candidates` for what to resume from)."""
        pointer = self.dir / "latest"
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        return tag if (self.dir / tag).is_dir() else None

    def tags(self) -> List[str]:
        """Every checkpoint directory, complete or not, newest (highest step) first."""
        if not self.dir.is_dir():
            return []
        return sorted((p.name for p in self.dir.glob("step*") if p.is_dir() and _step_of(p.name) >= 0),
                      key=_step_of, reverse=True)

    def damage(self, tag: str) -> Optional[str]:
        """Why checkpoint `tag` cannot be resumed from (None: intact as far as its files tell)."""
        path = self.dir / tag
        manifest = path / COMPLETE
        if not manifest.is_file():
            # written before complete.json existed: trusted only where `latest` names it (a completed save)
            if tag == self.latest_tag() and (path / MODEL_STATES).is_file():
                return None
            return INTERRUPTED
        try:
            expected = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError) as exc:
            return f"unreadable {COMPLETE} ({exc})"
        for name, size in expected.items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} is {f.stat().st_size} bytes, {size} were written"
        return None

    def resume_candidates(self) -> Tuple[List[str], List[str]]:
        """(intact checkpoints newest first, warnings about what `latest` and the damaged ones said)."""
        notes, intact = [], []
        latest = self.latest_tag()
        pointer = self.dir / "latest"
        for tag in self.tags():
            why = self.damage(tag)
            if why is None:
                intact.append(tag)
            else:
                notes.append(f"skipping checkpoint {self.dir / tag}: {why}")
        if intact:
            if not pointer.is_file():
                notes.append(f"{pointer} is missing; resuming from the newest intact checkpoint {intact[0]}")
            elif latest is None:
                notes.append(f"{pointer} names {pointer.read_text().strip()!r}, which does not exist; resuming from "
                             f"the newest intact checkpoint {intact[0]}")
            elif latest != intact[0]:
                notes.append(f"{pointer} names {latest}, but {intact[0]} is the newest intact checkpoint; "
                             f"resuming from it")
        return intact, notes

    def newest_intact(self) -> Optional[str]:
        """The checkpoint a resume would take (None: there is none)."""
        intact, _ = self.resume_candidates()
        return intact[0] if intact else None

    # -- save ---------------------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: Dict[str, Any]) -> str:
        tag = f"step{step:09d}"
        w = distributed.world()
        noise = getattr(engine, "shared_noise", None)
        client = {**client_state, "rng": rng_state(),
                  "lr": [group["lr"] for group in engine.optimizer.param_groups],
                  "shared_noise": noise.state_dict() if noise is not None else None}
        path = self.dir / tag
        if w.main and (path / COMPLETE).is_file():  # a step being written again: its old sizes no longer hold
            (path / COMPLETE).unlink()
        _write_through_python(engine)
        try:
            try:
                engine.save_checkpoint(str(self.dir), tag=tag, client_state=client, save_latest=False)
                (path / "rng").mkdir(parents=True, exist_ok=True)
                _save(rng_state(), path / "rng" / f"rank{w.rank}.pt")
                if w.main:
                    meta = {"step": step, "world_size": distributed.world_size(), **_engine_layout(engine),
                            "global_batch": int(engine.train_batch_size()), "model": model_fingerprint(engine.module)}
                    _write_text(path / "meta.json", json.dumps(meta, indent=1))
            except RunIOError:
                raise
            except OSError as exc:
                raise RunIOError("writing checkpoint", getattr(exc, "filename", None) or path, exc) from exc
            distributed.barrier()  # every rank's files are complete
            if w.main:
                _write_text(path / COMPLETE, json.dumps({"step": step, "files": _file_sizes(path)}, indent=1))
        except RunIOError:
            # nothing half-written survives: the partial checkpoint (never complete, never `latest`) is removed,
            # which also gives back the space a full disk needs for the run's other files
            shutil.rmtree(path, ignore_errors=True)
            raise
        if w.main:
            _write_text(self.dir / "latest", tag)
            self._prune(keep_tag=tag)
        return tag

    # -- load ---------------------------------------------------------------------------------------
    def meta(self, tag: str) -> Dict[str, Any]:
        """What wrote `tag` (from meta.json; inferred from the files for checkpoints without one)."""
        path = self.dir / tag
        if (path / "meta.json").is_file():
            return json.loads((path / "meta.json").read_text())
        states = load_state_file(path / MODEL_STATES)
        shards = _zero_shards(path)
        return {"world_size": int(states.get("dp_world_size", 1)),
                "zero_stage": 1 if any(not s.name.startswith("bf16_") for s in shards) else 0,
                "precision": "bf16" if states.get("ds_config", {}).get("bf16", {}).get("enabled") else "fp32",
                "partitioned": bool(shards)}

    def mismatch(self, engine, tag: str) -> Optional[str]:
        """Why checkpoint `tag` cannot hold this engine's model, from its meta.json alone (no tensor is read);
        None when it fits or the checkpoint predates the record."""
        try:
            saved = json.loads((self.dir / tag / "meta.json").read_text()).get("model")
        except (OSError, ValueError):
            return None
        now = model_fingerprint(engine.module)
        if saved and saved != now:
            return (f"its weights are of another model ({saved.get('parameters')} parameter tensors with other names "
                    f"or shapes; this model has {now['parameters']})")
        return None

    def load(self, engine, tag: str) -> Dict[str, Any]:
        w = distributed.world()
        size = distributed.world_size()
        saved, now = self.meta(tag), _engine_layout(engine)
        if saved["partitioned"] != now["partitioned"]:
            raise RuntimeError(
                f"checkpoint {self.dir / tag} was written with ZeRO stage {saved['zero_stage']} in "
                f"{saved['precision']} and this run uses ZeRO stage {now['zero_stage']} in {now['precision']}: one "
                "keeps the whole optimizer state in one file, the other partitions it over ranks. Resume with the "
                "checkpoint's trainer.zero_stage and trainer.precision, or start a new run from its weights "
                "(python -m launch.export)")
        if w.main and saved.get("global_batch", engine.train_batch_size()) != engine.train_batch_size():
            log.warning("checkpoint %s was trained with a global batch of %s sets, this run uses %s: the data "
                        "order and the trajectory change (set trainer.global_batch_sets=%s to continue alike)",
                        tag, saved["global_batch"], engine.train_batch_size(), saved["global_batch"])
        if now["partitioned"] and (saved["world_size"] != size or saved["zero_stage"] != now["zero_stage"]):
            client = self._load_universal(engine, tag, saved)
        else:
            _, client = engine.load_checkpoint(str(self.dir), tag=tag, load_module_strict=True)
        if client is None:
            raise RuntimeError(f"checkpoint {self.dir / tag} could not be loaded")
        for group, lr in zip(engine.optimizer.param_groups, client.pop("lr", [])):
            group["lr"] = lr
        noise_state = client.pop("shared_noise", None)
        noise = getattr(engine, "shared_noise", None)
        if noise is not None and noise_state is not None:
            noise.load_state_dict(noise_state)
        rank0_rng = client.pop("rng")
        own = self.dir / tag / "rng" / f"rank{w.rank}.pt"
        if own.is_file():
            set_rng_state(load_state_file(own))
        elif w.main or saved["world_size"] == size:
            set_rng_state(rank0_rng)
        else:  # a rank that did not exist when the checkpoint was written: a fresh stream of its own
            seed = int.from_bytes(hashlib.sha256(f"{tag}/{w.rank}".encode()).digest()[:4], "little")
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
        return client

    def _load_universal(self, engine, tag: str, saved: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        udir = self.dir / "universal"
        if distributed.world().main and not (udir / tag / "zero").is_dir():
            log.info("checkpoint %s: world size %d, ZeRO %d -> %d, ZeRO %d: converting to a universal checkpoint",
                     tag, saved["world_size"], saved["zero_stage"], distributed.world_size(),
                     engine.zero_optimization_stage())
            to_universal(self.dir / tag, udir / tag)
        distributed.barrier()
        with compat.loading_universal_checkpoint(engine):
            _, client = engine.load_checkpoint(str(udir), tag=tag, load_module_strict=True)
        # the universal format holds parameters and optimizer state only: buffers (BatchNorm running
        # statistics) come from the model states of the original checkpoint
        module = engine.module
        names = {name for name, _ in module.named_buffers()}
        states = load_state_file(self.dir / tag / MODEL_STATES)["module"]
        module.load_state_dict({k: v for k, v in states.items() if k in names}, strict=False)
        return client

    def _prune(self, keep_tag: str) -> None:
        """Keep the `keep` newest checkpoints; never the one just written nor the newest intact one (which
        differ when a run restarted from scratch below older steps or the new one is damaged already)."""
        tags = self.tags()
        newest_intact = next((t for t in tags if self.damage(t) is None), None)
        for old in tags[self.keep:]:
            if old not in (keep_tag, newest_intact):
                shutil.rmtree(self.dir / old, ignore_errors=True)
                shutil.rmtree(self.dir / "universal" / old, ignore_errors=True)


def _write_text(path: Path, text: str) -> None:
    """Atomic small-file write (temp file + rename); failures name the file and the OS error."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise RunIOError("writing", path, exc) from exc


def _save(obj, path: Path, use_zip: bool = True) -> None:
    """torch.save through a Python file object: the OS error of a failed write reaches us intact."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f, _use_new_zipfile_serialization=use_zip)
    except OSError as exc:
        raise RunIOError("writing checkpoint file", path, exc) from exc
    except RuntimeError as exc:  # torch's writer wraps the OSError of the file object it writes to
        cause = exc.__context__ if isinstance(exc.__context__, OSError) else None
        if cause is None:
            raise
        raise RunIOError("writing checkpoint file", path, cause) from exc


def _write_through_python(engine) -> None:
    """Route DeepSpeed's checkpoint writes through `_save` (same bytes, errors that name the file)."""
    compat.route_checkpoint_writes(engine, _save)


def to_universal(src: Path, dst: Path) -> None:
    """DeepSpeed's universal checkpoint of `src` at `dst` (in a subprocess: it runs worker pools)."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"converting {src} to a universal checkpoint failed ({' '.join(cmd)}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def consolidated_state_dict(directory: Path, tag: Optional[str] = None,
                            averaged: bool = True) -> Dict[str, torch.Tensor]:
    """The model's plain fp32 state dict from checkpoint `tag` (default: latest) of `directory`, at whatever
    world size, ZeRO stage and precision it was written: parameters from the fp32 master copy when the
    optimizer state is partitioned, buffers from the model states. Loads into `build_model(cfg.model)`.
    A checkpoint of a run with `trainer.ema_decay` carries the moving average of the weights (trainer/ema.py):
    those parameters are returned unless `averaged=False`."""
    directory = Path(directory)
    if tag is None:
        tag = Checkpointer(directory, keep=1).newest_intact()
    if tag is None or not (directory / tag).is_dir():
        raise FileNotFoundError(f"no checkpoint {tag or '(latest)'} under {directory}")
    model_states = directory / tag / MODEL_STATES  # ZeRO-3 writes one per rank under other names (no average)
    states = load_state_file(model_states) if model_states.is_file() else {}
    if _zero_shards(directory / tag):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
    else:
        sd = states["module"]
    ema = states.get("ema") if averaged else None
    if ema:
        unknown = sorted(set(ema["weights"]) - set(sd))
        if unknown:
            raise RuntimeError(f"checkpoint {directory / tag}: averaged weights of parameters the model lacks "
                               f"({', '.join(unknown[:3])})")
        sd = {**sd, **ema["weights"]}
    return {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone() for k, v in sd.items()}
