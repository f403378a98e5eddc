"""`python -m launch.generate model_uri=models:/<name>@<alias> images=<folder or files> [samples=16]
[mode=conditional|refined] [iterations=10] [seed=0] [out=generated] [...any Hydra override, e.g. tracking.uri=...]`

Few-shot generation from a user's own images: the PNG / JPEG files (any size; `images=` is a folder or files
separated by commas) are prepared as the model's training data was (data_pipeline/user_images.py), the model
(safetensors + model card from the registry, built from the installed package) generates `samples` new members
of that set, and `out/` receives `sample_000.png`, ..., `grid.png` (the given images, as the model sees them, on
the top row, the samples below) and `generation.json` (files, per-image ELBO of the given set, settings).
Greyscale models with ink draw it dark on white in the PNGs, as in the Omniglot originals.
Every check of the files and the request runs before the model is built: the model card first (it bounds the
set), then the number of files, then each file's dimensions from its header, and only then any decoding.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List

from launch.app import cli, composed, split_options

DEFAULTS = {"images": "", "samples": "16", "mode": "conditional", "iterations": "10", "seed": "0", "out": "generated"}


HELP = """
python -m launch.generate model_uri=<uri> images=<folder or files> [samples=16] [mode=conditional|refined]
                          [iterations=10] [seed=0] [out=generated] [key=value ...]

Draws new members of the concept shown by a few of your own images (PNG/JPEG of any size, prepared as the
model's training data was): out/ gets sample_*.png, grid.png (your images on the top row) and generation.json.

Main options:
  model_uri=<uri>            models:/<name>@champion, models:/<name>/<version>, or an exported package dir
  images=<folder|a.png,b.png>  at most the model's set limit (20)
  mode=refined iterations=N  refine the context through the model's own samples
Example:
  python -m launch.generate model_uri=models:/demo@champion images=runs/demo/test_character out=runs/demo/generated
Docs: README.md (Few-shot generation), docs/serving.md.
"""

def generate_from(argv: List[str]) -> int:
    from trainer.run.errors import ConfigError

    opts, overrides = split_options(argv, DEFAULTS)
    try:
        samples, iterations, seed = int(opts["samples"]), int(opts["iterations"]), int(opts["seed"])
    except ValueError as exc:
        raise ConfigError(f"samples, iterations and seed must be integers, got {opts}") from exc

    from data_pipeline.user_images import list_images, load_set
    from trainer.registry.package import read_card, read_package
    from trainer.registry.resolve import fetch_package, is_local, open_model
    from trainer.registry.store import describe_store
    from trainer.serving.generation import MODES

    cfg = composed(overrides)
    if opts["mode"] not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {opts['mode']!r}")
    files = list_images([p for p in opts["images"].split(",") if p])
    info = open_model(cfg)
    package = fetch_package(cfg)
    spec = read_card(package).inputs
    x = load_set(files, spec, seed)

    import torch

    from trainer import distributed, threads
    from trainer.serving.generation import check_request, generate, set_elbo

    device = distributed.world().device
    model, card = read_package(package, device)
    check_request(model, samples, opts["mode"], iterations)
    # said once the model and the request passed their checks: a refusal stays one line
    print(threads.apply(cfg.trainer.threads, device.type, announce=False), file=sys.stderr)
    if not is_local(cfg.model_uri):
        print(f"MLflow store {describe_store(cfg.tracking)}", file=sys.stderr)
    print(f"{card.paper_name} ({cfg.model_uri}, trained on {spec.dataset}): {len(files)} given images -> "
          f"{samples} {opts['mode']} samples", file=sys.stderr)
    torch.manual_seed(seed)
    x = x.to(device)
    out_images = generate(model, x, samples, opts["mode"], iterations, progress=True).cpu()
    elbo = set_elbo(model, x).cpu()
    written = write_outputs(Path(opts["out"]), x.cpu(), out_images, spec.ink == "high")
    summary = {**info, "given": [str(f) for f in files], "mode": opts["mode"], "samples": samples,
               "iterations": iterations if opts["mode"] == "refined" else None, "seed": seed,
               "elbo_per_image": [round(float(v), 4) for v in elbo], "preparation": asdict(spec), **written}
    (Path(opts["out"]) / "generation.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    print(f"grid: {written['grid']}", file=sys.stderr)
    return 0


main = cli(generate_from, HELP)


def write_outputs(out: Path, given, samples, ink_high: bool, scale: int = 3) -> dict:
    """Each sample as a PNG and one grid (given images on the top row), upscaled `scale`x for viewing."""
    import torch
    from torchvision.utils import make_grid, save_image

    out.mkdir(parents=True, exist_ok=True)
    view = (lambda t: 1.0 - t) if ink_high else (lambda t: t)  # dark ink on white, as users draw it
    files = []
    for i, img in enumerate(samples):
        path = out / f"sample_{i:03d}.png"
        save_image(view(img), path)
        files.append(str(path))
    cols = max(given.shape[0], min(samples.shape[0], 10))
    blank = torch.zeros((cols - given.shape[0],) + tuple(given.shape[1:]))  # pads the top row (shown blank)
    rows = torch.cat([view(given), view(blank), view(samples)])
    grid = make_grid(rows, nrow=cols, padding=2, pad_value=0.5)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    save_image(grid, out / "grid.png")
    return {"grid": str(out / "grid.png"), "sample_files": files}


if __name__ == "__main__":
    raise SystemExit(main())
