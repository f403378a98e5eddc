"""`python -m launch.export <run_dir> [--tag step000000042] [--out DIR]`: a checkpoint -> a model package.

Works for checkpoints of any world size, ZeRO stage and precision (trainer/checkpoint.py). The package is the
format registered models have (trainer/registry/package.py): `DIR/weights.safetensors` (fp32 parameters, buffers
as saved) and `DIR/model.json` (the model card: the typed model config from the run's `config.yaml`, parameter
count, checkpoint tag/step/epoch, and the checkpoint's val/test ELBO from `epochs.jsonl` when that step was
evaluated). Default DIR: `<run_dir>/export/<tag>/`. Nothing in it is pickled: load it with
`trainer.registry.package.read_package(DIR)`, or evaluate it with `python -m launch.evaluate model_uri=DIR`. The
package is read back that way, and compared tensor by tensor with the checkpoint, before success is reported.
A run with `trainer.ema_decay` exports the moving average of its weights (what it validated and registered);
`--trained-weights` exports the weights as trained.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Dict, Tuple

os.environ.setdefault("OMP_NUM_THREADS", "1")

from trainer.run.errors import Refused  # noqa: E402
from trainer.run.exits import run  # noqa: E402


def _step_epoch(ckpt_dir: Path, tag: str) -> Tuple[int, int]:
    """(step, epoch) from the loop state the checkpoint carries; the tag's step (epoch -1) if it has none."""
    from trainer.checkpoint import MODEL_STATES, load_state_file

    loop = load_state_file(ckpt_dir / tag / MODEL_STATES).get("loop") or {}
    if "step" in loop:
        return int(loop["step"]), int(loop.get("epoch", -1))
    digits = tag[len("step"):]
    return (int(digits) if digits.isdigit() else -1), -1


def _epoch_metrics(run_dir: Path, step: int) -> Dict[str, float]:
    """val/ and test/ metrics of the epoch that ended at `step` (the last such record: a resumed run may have
    evaluated that step again); empty when the checkpoint is not an end-of-epoch one or the file is absent."""
    path = run_dir / "epochs.jsonl"
    found: Dict[str, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            if record.get("step") == step:
                found = {k: float(v) for k, v in record.items()
                         if k.startswith(("val/", "test/")) and isinstance(v, (int, float))}
    return found


def _run_id(run_dir: Path) -> str:
    try:
        return str(json.loads((run_dir / "mlflow_run.json").read_text()).get("run_id", ""))
    except (OSError, ValueError):
        return ""


class ExportError(Refused):
    label = "export error"


def export(args: argparse.Namespace) -> None:
    import torch
    from omegaconf import OmegaConf

    from models.registry import build_model, count_parameters
    from trainer.checkpoint import Checkpointer, consolidated_state_dict
    from trainer.config import load_config
    from trainer.registry.mlflow_model import checkpoint_card
    from trainer.registry.package import read_package, write_package

    run_dir = args.run_dir.parent if args.run_dir.name == "checkpoints" else args.run_dir
    ckpt_dir = run_dir / "checkpoints"
    tag = args.tag or Checkpointer(ckpt_dir, keep=1).newest_intact()  # what a resume would take
    if tag is None:
        raise ExportError(f"no intact checkpoint under {ckpt_dir}")
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():  # the card's model config comes from it; without it the weights are anonymous
        raise ExportError(f"{config_file} is missing (the package records the run's model config)")
    out = args.out or run_dir / "export" / tag
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    try:
        state = consolidated_state_dict(ckpt_dir, tag, averaged=not args.trained_weights)
        step, epoch = _step_epoch(ckpt_dir, tag)
    except FileNotFoundError as exc:
        raise ExportError(str(exc)) from exc
    cfg = load_config(OmegaConf.load(config_file))
    with torch.device("meta"):  # only counted: no memory for a random init
        n_params = count_parameters(build_model(cfg.model))
    card = checkpoint_card(cfg, n_params, tag, step, epoch, _epoch_metrics(run_dir, step), _run_id(run_dir))
    write_package(out, state, card)
    model, _ = read_package(out)  # a package we just wrote that does not read back is our bug: exit 1
    loaded = model.state_dict()
    differ = [k for k, v in state.items() if not torch.equal(loaded[k], v.float() if v.is_floating_point() else v)]
    if differ:
        raise RuntimeError(f"{out} reads back different tensors than {ckpt_dir / tag}: {differ[:5]}")
    n = sum(v.numel() for v in state.values() if v.is_floating_point())
    vlb = card.metrics.get("val/vlb")
    print(f"{out}: {len(state)} tensors, {n:,} floats (fp32), {card.paper_name} ({cfg.model.name}), checkpoint "
          f"{ckpt_dir / tag} (step {step}, epoch {epoch})" + (f", val ELBO {vlb:.3f}" if vlb is not None else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.export", description=__doc__.split("\n")[0].split(": ", 1)[-1],
        epilog="Example: python -m launch.export runs/demo --out runs/demo/package\n"
               "Then: python -m launch.evaluate eval=elbo model_uri=runs/demo/package. Docs: README.md (model package).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="run directory (or its checkpoints/ directory)")
    parser.add_argument("--tag", help="checkpoint tag (default: the newest intact one, as a resume takes)")
    parser.add_argument("--out", type=Path, help="output directory (default: <run_dir>/export/<tag>/)")
    parser.add_argument("--trained-weights", action="store_true",
                        help="a run with trainer.ema_decay: export the weights as trained, not their moving average "
                             "(the card's metrics are still the average's)")
    args = parser.parse_args(argv)
    return run(lambda: export(args))


if __name__ == "__main__":
    raise SystemExit(main())
