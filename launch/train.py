"""`python -m launch.train experiment=<preset> [overrides]` (also under torchrun / deepspeed --no_local_rank)."""
from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from launch.app import CONFIG_DIR, validated

log = logging.getLogger("launch.train")

PREEMPTED_EXIT = 143  # 128 + SIGTERM: checkpoint written, the next start resumes (trainer.resume=auto)


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(raw: DictConfig) -> None:
    cfg = validated(raw)
    from data_pipeline.errors import DataError
    from trainer import distributed
    from trainer.batching import plan_batches
    from trainer.guard import NonFiniteLoss
    from trainer.loop import Trainer

    try:  # from the launcher's environment alone: a bad combination fails before any process-group work
        plan = plan_batches(cfg, distributed.world().world_size)
    except ValueError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    world = distributed.init()
    if world.main:
        log.info("%d process(es), %s, %s; %s", world.world_size, world.device.type, world.backend, plan.describe())
    try:
        result = Trainer(cfg, world).fit()
    except DataError as exc:
        print(f"data error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    except NonFiniteLoss as exc:
        print(f"training stopped: {exc}", file=sys.stderr)
        raise SystemExit(3) from exc
    finally:
        distributed.shutdown()
    if result.preempted:
        print(f"preempted: checkpoint written at step {result.state.step}; rerun to resume", file=sys.stderr)
        raise SystemExit(PREEMPTED_EXIT)


if __name__ == "__main__":
    from trainer.distributed import hydra_rank_overrides

    sys.argv += hydra_rank_overrides()  # ranks > 0 leave rank 0's .hydra/ and log alone
    main()
