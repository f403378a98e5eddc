"""Save checkpoints with a real DeepSpeed engine, then get SIGKILLed in the middle of the next save.

Usage: checkpoint_kill.py RUN_DIR MODE   MODE = during_write (killed after the first file of the new
checkpoint) | before_pointer (every file written, killed just before the pointer moves) | prune (4 saves).
"""
import os
import signal
import sys
from pathlib import Path

import torch

from models.config import ModelConfig
from models.registry import build_model
from trainer import distributed
from trainer.checkpoint import Checkpointer
from trainer.config import Config, TrainerConfig
from trainer.engine import build_engine


def main(run_dir: str, mode: str) -> None:
    world = distributed.init()
    cfg = Config(model=ModelConfig(name="ns", hidden_dim=16, ch_enc=4, c_dim=4, z_dim=4, n_res=1),
                 trainer=TrainerConfig(keep_checkpoints=2))
    torch.manual_seed(0)
    engine, _ = build_engine(build_model(cfg.model), cfg, world)
    ckpt = Checkpointer(Path(run_dir) / "checkpoints", keep=2)
    ckpt.save(engine, 1, {"loop": {"step": 1}})
    torch.save({k: v.clone() for k, v in engine.module.state_dict().items()}, Path(run_dir) / "weights_step1.pt")
    with torch.no_grad():
        for p in engine.module.parameters():
            p.add_(1.0)  # the next checkpoint holds different weights
    if mode == "prune":
        for step in (2, 3, 4):
            ckpt.save(engine, step, {"loop": {"step": step}})
        return
    kill = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    if mode == "during_write":
        real_save = torch.save
        calls = []

        def save_then_die(*args, **kwargs):
            real_save(*args, **kwargs)
            calls.append(1)
            kill()

        torch.save = save_then_die
    else:
        os.replace = kill
    ckpt.save(engine, 2, {"loop": {"step": 2}})
    raise SystemExit("not killed")


if __name__ == "__main__":
    main(*sys.argv[1:3])
