"""`python -m launch.train experiment=<preset> [overrides]` (also under torchrun / deepspeed --no_local_rank).

Exit codes: trainer/run/exit_codes.py (docs/reliability.md); every refusal happens before any data or process-group work.
"""
from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from launch.app import CONFIG_DIR, exit_codes_of, validated
from trainer.run import exit_codes
from trainer.run.exits import exit_with

HELP = """
python -m launch.train experiment=<preset> [key=value ...]

Trains one model of the zoo on prepared shards with DeepSpeed, checkpoints it, tracks it in MLflow and registers
each checkpoint as a model version (aliases `last` and `champion` = best validation ELBO).

Main options (any config key can be overridden; `configs/` holds them all):
  experiment=<preset>        a file of configs/experiment/ (smoke, demo, omniglot_ns_schavae, ...)
  name=<run name>            run_dir defaults to runs/<name>; a rerun of the same run_dir resumes
  trainer.epochs=N           trainer.zero_stage=0..3   trainer.precision=auto|fp32|bf16
  data.raw_dir=DIR           data.shards_dir=DIR      tracking.uri=http://host:5000 (default: local sqlite)
  data.shards_dir=s3://<bucket>/<prefix>  data.cache_dir=DIR   shards in object storage (docs/data.md)
Example:
  python -m launch.train experiment=smoke data.raw_dir=../shared/data/omniglot
Also under `python -m launch.torchrun --nproc_per_node=N -m launch.train ...`.
Docs: README.md (Training, Launching), docs/reliability.md (exit codes), docs/scaling.md.
"""

log = logging.getLogger("launch.train")

_run_dir = None  # set once the config is valid: where a non-retryable stop is recorded for elastic restarts


def _record_stop(code: int, message: str) -> None:
    """torchrun restarts workers (--max-restarts) whatever their code: leave the reason of a non-retryable stop
    for its next attempt, which then exits with the same code at once instead of repeating a config error or
    a divergence."""
    import json
    import os

    from trainer import distributed

    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if code in exit_codes.FAIL_FAST and _run_dir is not None and run_id and distributed.is_main():
        try:
            (_run_dir / "stopped.json").write_text(json.dumps({"run_id": run_id, "code": code, "message": message}))
        except OSError:
            pass  # the stop itself is what matters


def _stopped_before() -> int:
    import json
    import os

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    marker = _run_dir / "stopped.json"
    if attempt == "0" or not marker.is_file():
        return exit_codes.OK
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return exit_codes.OK
    if info.get("run_id") != os.environ.get("TORCHELASTIC_RUN_ID"):
        return exit_codes.OK
    print(f"not retrying (elastic restart {attempt}): an earlier attempt of this job stopped with exit "
          f"{info['code']}: {info['message']}", file=sys.stderr, flush=True)
    return int(info["code"])


def train(raw: DictConfig) -> int:
    from pathlib import Path

    from trainer import distributed
    from trainer.batching import plan_batches
    from trainer.checkpoint import Checkpointer
    from trainer.config import check_trainable
    from trainer.loop import Trainer
    from trainer.run import rundir

    cfg = validated(raw)
    # from the config and the launcher's environment alone: no data, no process group yet
    check_trainable(cfg)
    plan = plan_batches(cfg, distributed.world().world_size)
    global _run_dir
    run_dir = _run_dir = Path(cfg.run_dir)
    earlier = _stopped_before()
    if earlier:
        return earlier
    if distributed.world().rank == 0:
        rundir.claim(run_dir)
    if cfg.trainer.resume == "auto" and Checkpointer(run_dir / "checkpoints", 1).tags():
        rundir.check_restart(run_dir, _section(cfg, "model"), _section(cfg, "data"))
    rundir.watch_launcher()
    world = distributed.init(cfg.trainer.collective_timeout_s)
    if world.main:
        log.info("%d process(es), %s, %s; %s", world.world_size, world.device.type, world.backend, plan.describe())
    try:
        result = Trainer(cfg, world).fit()
    except Exception as exc:
        raise _as_run_failure(exc, cfg, world.rank, run_dir)
    finally:
        distributed.shutdown()
    if result.preempted:
        print(f"preempted: checkpoint written at step {result.state.step}; rerun to resume", file=sys.stderr,
              flush=True)
        return exit_codes.PREEMPTED
    return exit_codes.OK


def _as_run_failure(exc: Exception, cfg, rank: int, run_dir) -> Exception:
    """A lost peer as CollectiveFailed naming the silent ranks, an OS error from a write as RunIOError naming
    its file; anything else as it is."""
    from trainer import distributed
    from trainer.run.errors import CollectiveFailed, RunIOError, os_error_in

    if isinstance(exc, RunIOError):
        return exc
    if distributed.is_collective_failure(exc):
        silent = distributed.unresponsive_ranks()
        who = (f"rank(s) {', '.join(map(str, silent))} did not answer (stalled or dead)" if silent
               else "a peer was lost")
        failure = CollectiveFailed(f"on rank {rank}: {who}; trainer.collective_timeout_s="
                                   f"{cfg.trainer.collective_timeout_s:g} ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:300]})")
        failure.__cause__ = exc
        return failure
    os_error = os_error_in(exc)
    if os_error is not None and getattr(os_error, "errno", None) is not None:
        failure = RunIOError("writing", os_error.filename or run_dir, os_error)
        failure.__cause__ = exc
        return failure
    return exc


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(raw: DictConfig) -> None:
    exit_with(lambda: train(raw), on_failure=_record_stop)


def _writable(cfg) -> None:
    """A read-only run directory or checkpoints/ exits 4 naming the path and the OS error, before Hydra writes
    its config copies there (which would fail with a traceback) and before any training work."""
    from pathlib import Path

    from trainer.run import rundir

    rundir.check_writable(Path(cfg.run_dir))


def _section(cfg, name: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(getattr(cfg, name)))


if __name__ == "__main__":
    from trainer.distributed import hydra_rank_overrides

    sys.argv += hydra_rank_overrides()  # ranks > 0 leave rank 0's .hydra/ and log alone
    exit_codes_of(main, HELP, preflight=_writable)
