"""`python -m launch.extract_set [data=omniglot_ns] [split=test] [index=0] [images=5] [out=<dir>] [...Hydra overrides]`

Writes the first `images` images of one class of a prepared split as PNG files (greyscale datasets: dark ink on
white, as the Omniglot originals), for trying `launch.generate` on a class the model never trained on; `index`
counts the split's classes in manifest order. Prints the folder.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List

from launch.app import cli, composed, split_options
from trainer.run.errors import ConfigError

DEFAULTS = {"split": "test", "index": "0", "images": "5", "out": ""}


HELP = """
python -m launch.extract_set [data=omniglot_ns] [split=test] [index=0] [images=5] [out=<dir>] [key=value ...]

Writes the first images of one class of a prepared split as PNGs (dark ink on white), to try launch.generate on
a character the model never trained on. Prints the folder.

Example:
  python -m launch.extract_set split=test index=0 images=5 out=runs/demo/test_character
Docs: README.md (Few-shot generation).
"""

def extract(argv: List[str]) -> int:
    opts, overrides = split_options(argv, DEFAULTS)
    from PIL import Image

    from data_pipeline.shard_source import source_of
    from data_pipeline.shards import SPLITS

    cfg = composed(overrides)
    try:
        index, count = int(opts["index"]), int(opts["images"])
    except ValueError as exc:
        raise ConfigError(f"index and images must be integers, got {opts['index']!r}, {opts['images']!r}") from exc
    if opts["split"] not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {opts['split']!r}")
    source = source_of(cfg.data)
    shards = source.verify(cfg.data.name, [opts["split"]], check_sha256=False)["splits"][opts["split"]]["shards"]
    remaining = index
    for shard in shards:
        if remaining < shard["records"]:
            record = next(r for i, r in enumerate(source.records(shard["file"])) if i == remaining)
            break
        remaining -= shard["records"]
    else:
        raise ConfigError(f"split {opts['split']} of {cfg.data.name} has {index - remaining} classes, "
                          f"index={index} is past its end")
    out = Path(opts["out"] or f"{cfg.run_dir}/{opts['split']}_class_{record.class_index}")
    out.mkdir(parents=True, exist_ok=True)
    ink = cfg.data.name != "celeba"
    for i, img in enumerate(record.images[:count]):  # uint8 (C, H, W), 255 = full ink
        pixels = 255 - img if ink else img
        Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)).save(out / f"{i:02d}.png")
    print(f"{record.name} ({opts['split']} class {record.class_index}): {min(count, len(record.images))} images "
          f"in {out}", file=sys.stderr)
    print(out)
    return 0


main = cli(extract, HELP)


if __name__ == "__main__":
    raise SystemExit(main())
