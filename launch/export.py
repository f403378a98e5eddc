"""`python -m launch.export <run_dir> [--tag step000000042] [--out model.pt]`: a checkpoint -> plain fp32 state dict.

Works for checkpoints of any world size, ZeRO stage and precision (trainer/checkpoint.py). The file holds only
`{name: tensor}` (fp32 parameters, buffers as saved) and loads with
`build_model(cfg.model).load_state_dict(torch.load(path))`, `cfg` being the run's `config.yaml`; the export is
checked exactly that way before it is written when the run directory has its config.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="run directory (or its checkpoints/ directory)")
    parser.add_argument("--tag", help="checkpoint tag (default: the latest)")
    parser.add_argument("--out", type=Path, help="output file (default: <run_dir>/export/<tag>.pt)")
    args = parser.parse_args(argv)

    import torch
    from omegaconf import OmegaConf

    from models.registry import build_model
    from trainer.checkpoint import Checkpointer, consolidated_state_dict
    from trainer.config import load_config

    run_dir = args.run_dir.parent if args.run_dir.name == "checkpoints" else args.run_dir
    ckpt_dir = run_dir / "checkpoints"
    tag = args.tag or Checkpointer(ckpt_dir, keep=1).latest_tag()
    if tag is None:
        print(f"export error: no checkpoint under {ckpt_dir}", file=sys.stderr)
        return 2
    try:
        state = consolidated_state_dict(ckpt_dir, tag)
    except FileNotFoundError as exc:
        print(f"export error: {exc}", file=sys.stderr)
        return 2
    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        cfg = load_config(OmegaConf.load(config_file))
        build_model(cfg.model).load_state_dict(state, strict=True)  # complete and the right shapes
    out = args.out or run_dir / "export" / f"{tag}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    n = sum(v.numel() for v in state.values() if v.is_floating_point())
    print(f"{out}: {len(state)} tensors, {n:,} floats (fp32), checkpoint {ckpt_dir / tag}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
