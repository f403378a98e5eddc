"""torchrun worker of tests/test_ladder_zero3.py: train through the real Trainer (Hydra overrides from the command
line, e.g. model=schavae_l trainer.zero_stage=3), then score a fixed batch with the trained, still sharded model.

Usage: torchrun --nproc_per_node=2 tests/scripts/ladder_zero3.py OUT_DIR override... -> OUT_DIR/result.json
{"vlb": ELBO per image of OUT_DIR/batch.pt in eval mode with torch.manual_seed(SEED), "step": ..., "world_size": ...}
"""
import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from launch.app import CONFIG_DIR
from models.objective import elbo_terms
from trainer import distributed
from trainer.config import load_config
from trainer.loop import Trainer

SEED = 1234  # the latent draws of the scoring pass


def fixed_batch(cfg) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    shape = (2, 3, cfg.model.image_channels, cfg.model.image_size, cfg.model.image_size)
    return torch.bernoulli(torch.full(shape, 0.3), generator=g)


def main(out: str, *overrides: str) -> None:
    world = distributed.init()
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = load_config(compose("config", overrides=list(overrides)))
    trainer = Trainer(cfg, world)
    result = trainer.fit()
    model = trainer.engine.module
    model.eval()
    x = fixed_batch(cfg)
    torch.manual_seed(SEED)
    with torch.no_grad():  # every rank runs it: ZeRO-3 gathers the weights with collectives
        vlb = elbo_terms(model(x)).vlb.item()
    if world.main:
        torch.save(x, Path(out) / "batch.pt")
        (Path(out) / "result.json").write_text(json.dumps(
            {"vlb": vlb, "step": result.state.step, "world_size": world.world_size}))
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
