"""Run under `torchrun --nproc_per_node=N`: every rank streams two epochs of the train split with each reader and
writes the class of every set it yielded, and the classes it read, to OUT/rank{r}.json (tests/test_data_stream.py).

    torchrun --standalone --nproc_per_node=2 tests/scripts/stream_ranks.py SHARDS_DIR OUT_DIR
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data_pipeline.config import DataConfig  # noqa: E402
from data_pipeline.loaders import make_set_loader  # noqa: E402


def main(shards_dir: str, out: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    result = {"rank": rank, "world_size": world}
    for reader in ("torch", "dali"):
        cfg = DataConfig(name="celeba", shards_dir=shards_dir, raw_dir="unused", download=False, image_size=16,
                         image_channels=3, image_format="png", binarize="none", augment=False, batch_sets=4,
                         sampling="stream", reader=reader, num_workers=2 if reader == "torch" else 0)
        loader = make_set_loader(cfg, "train", rank, world)
        epochs = {}
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            classes = []
            for x in loader:
                assert x.shape == (4, 5, 3, 16, 16), x.shape
                classes += loader.last_batch_classes.tolist()
            epochs[epoch] = {"len": len(loader), "sets": classes, "read": loader.class_indices}
        result[reader] = epochs
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
