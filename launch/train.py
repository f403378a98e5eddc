"""`python -m launch.train experiment=<preset> [overrides]` (also under torchrun / deepspeed --no_local_rank).

Exit codes: trainer/exit_codes.py (docs/reliability.md); every refusal happens before any data or process-group work.
"""
from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from launch.app import CONFIG_DIR, exit_codes_of, validated
from trainer import exit_codes

log = logging.getLogger("launch.train")

PREEMPTED_EXIT = exit_codes.PREEMPTED  # kept for importers


_run_dir = None  # set once the config is valid: where a non-retryable stop is recorded for elastic restarts


def stop(code: int, message: str, exc: BaseException | None = None):
    print(message, file=sys.stderr, flush=True)
    if code in exit_codes.FAIL_FAST and _run_dir is not None:
        _record_stop(code, message)
    raise SystemExit(code) from exc


def _record_stop(code: int, message: str) -> None:
    """torchrun restarts workers (--max-restarts) whatever their code: leave the reason for its next attempt,
    which then exits with the same code at once instead of repeating a config error or a divergence."""
    import json
    import os

    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and os.environ.get("RANK", "0") == "0":
        try:
            (_run_dir / "stopped.json").write_text(json.dumps({"run_id": run_id, "code": code, "message": message}))
        except OSError:
            pass  # the stop itself is what matters


def _stopped_before() -> None:
    import json
    import os

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    marker = _run_dir / "stopped.json"
    if attempt == "0" or not marker.is_file():
        return
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return
    if info.get("run_id") == os.environ.get("TORCHELASTIC_RUN_ID"):
        print(f"not retrying (elastic restart {attempt}): an earlier attempt of this job stopped with exit "
              f"{info['code']}: {info['message']}", file=sys.stderr, flush=True)
        raise SystemExit(int(info["code"]))


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(raw: DictConfig) -> None:
    cfg = validated(raw)
    from pathlib import Path

    from data_pipeline.errors import DataError
    from trainer import distributed, rundir
    from trainer.batching import plan_batches
    from trainer.checkpoint import Checkpointer
    from trainer.config import check_trainable
    from trainer.errors import RunDirBusy, RunIOError, RunMismatch, os_error_in
    from trainer.guard import NonFiniteLoss
    from trainer.loop import Trainer

    try:  # from the config and the launcher's environment alone: no data, no process group yet
        check_trainable(cfg)
        plan = plan_batches(cfg, distributed.world().world_size)
    except ValueError as exc:
        stop(exit_codes.CONFIG_ERROR, f"config error: {exc}", exc)
    global _run_dir
    run_dir = _run_dir = Path(cfg.run_dir)
    _stopped_before()
    try:
        if distributed.world().rank == 0:
            rundir.claim(run_dir)
        if cfg.trainer.resume == "auto" and Checkpointer(run_dir / "checkpoints", 1).tags():
            rundir.check_restart(run_dir, _section(cfg, "model"), _section(cfg, "data"))
    except RunDirBusy as exc:
        stop(exit_codes.RUN_DIR_BUSY, f"refused: {exc}", exc)
    except RunMismatch as exc:
        stop(exit_codes.CONFIG_ERROR, f"config error: {exc}", exc)
    except RunIOError as exc:
        stop(exit_codes.IO_ERROR, f"I/O error: {exc}", exc)
    rundir.watch_launcher()
    world = distributed.init(cfg.trainer.collective_timeout_s)
    if world.main:
        log.info("%d process(es), %s, %s; %s", world.world_size, world.device.type, world.backend, plan.describe())
    try:
        result = Trainer(cfg, world).fit()
    except DataError as exc:
        stop(exit_codes.CONFIG_ERROR, f"data error: {exc}", exc)
    except NonFiniteLoss as exc:
        stop(exit_codes.DIVERGED, f"training stopped: {exc}", exc)
    except RunIOError as exc:
        stop(exit_codes.IO_ERROR, f"I/O error: {exc}; the previous checkpoint stays current", exc)
    except Exception as exc:
        if distributed.is_collective_failure(exc):
            silent = distributed.unresponsive_ranks()
            who = (f"rank(s) {', '.join(map(str, silent))} did not answer (stalled or dead)" if silent
                   else "a peer was lost")
            stop(exit_codes.COLLECTIVE_FAILED,
                 f"collective failed on rank {world.rank}: {who}; trainer.collective_timeout_s="
                 f"{cfg.trainer.collective_timeout_s:g} ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})",
                 exc)
        os_error = os_error_in(exc)
        if os_error is not None and getattr(os_error, "errno", None) is not None:
            stop(exit_codes.IO_ERROR, f"I/O error: {RunIOError('writing', os_error.filename or run_dir, os_error)}",
                 exc)
        raise
    finally:
        distributed.shutdown()
    if result.preempted:
        stop(exit_codes.PREEMPTED, f"preempted: checkpoint written at step {result.state.step}; rerun to resume")


def _section(cfg, name: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(getattr(cfg, name)))


if __name__ == "__main__":
    from trainer.distributed import hydra_rank_overrides

    sys.argv += hydra_rank_overrides()  # ranks > 0 leave rank 0's .hydra/ and log alone
    exit_codes_of(main)
