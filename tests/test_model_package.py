"""The registered model's on-disk form (trainer/registry/package.py), registration without side effects on training,
and a user's images prepared as the training data (data_pipeline/user_images.py)."""
from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.errors import DataError
from data_pipeline.input_spec import InputSpec
from data_pipeline.user_images import check_images, list_images, open_images, prepare_set
from models.registry import PAPER_MODELS, ZOO, build_model, count_parameters, paper_config
from trainer.registry.package import (CARD, WEIGHTS, ModelCard, PackageError, read_card, read_package,
                                   write_package)

OMNIGLOT = InputSpec("omniglot_ns", 1, 28, "high", True, 5)


def card_for(cfg) -> ModelCard:
    return ModelCard(cfg, OMNIGLOT, ZOO[cfg.name].paper_name, 1, {"tag": "step000000001", "step": 1, "epoch": 1},
                     {"val/vlb": -100.0, "test/vlb": float("nan")})


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_package_round_trip_builds_the_same_model_without_touching_the_rng(tmp_path, name):
    torch.manual_seed(0)
    model = build_model(paper_config(name)).eval()
    write_package(tmp_path, model.state_dict(), card_for(model.cfg))
    before = torch.random.get_rng_state()
    loaded, card = read_package(tmp_path)
    assert torch.equal(before, torch.random.get_rng_state())  # built on the meta device: no random init
    assert card.model == model.cfg and card.paper_name == ZOO[name].paper_name
    assert card.metrics["val/vlb"] == -100.0 and np.isnan(card.metrics["test/vlb"])
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.bernoulli(torch.full((2, 5, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    want = model(x).logpx
    torch.manual_seed(2)
    assert torch.allclose(loaded(x).logpx, want, rtol=1e-5, atol=1e-3)
    assert count_parameters(loaded) == count_parameters(model)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickles_and_torch_zips_are_refused_by_content_and_never_run(tmp_path):
    cfg = paper_config("ns", hidden_dim=32)
    write_package(tmp_path, build_model(cfg).state_dict(), card_for(cfg))
    marker = tmp_path / "payload_ran"
    (tmp_path / WEIGHTS).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(PackageError, match="a Python pickle; refusing to load it"):
        read_package(tmp_path)
    torch.save({"w": torch.zeros(2)}, tmp_path / WEIGHTS)
    with pytest.raises(PackageError, match="zip archive"):
        read_package(tmp_path)
    (tmp_path / WEIGHTS).write_bytes(b"\x00" * 64)
    with pytest.raises(PackageError, match="not a safetensors file"):
        read_package(tmp_path)
    assert not marker.exists()


def test_cards_are_validated(tmp_path):
    cfg = paper_config("ns", hidden_dim=32)
    write_package(tmp_path, build_model(cfg).state_dict(), card_for(cfg))
    text = (tmp_path / CARD).read_text()
    (tmp_path / CARD).write_text(text.replace('"paper_name"', '"code_to_run": "x", "paper_name"'))
    with pytest.raises(PackageError, match="unknown keys \\['code_to_run'\\]"):
        read_card(tmp_path)
    (tmp_path / CARD).write_text(text.replace("scha-vae-model/1", "other/1"))
    with pytest.raises(PackageError, match="not a scha-vae model card"):
        read_card(tmp_path)
    (tmp_path / CARD).write_text(text.replace('"hidden_dim": 32', '"hidden_dim": 64'))
    with pytest.raises(PackageError, match="does not fit model 'ns'"):
        read_package(tmp_path)


def test_registering_draws_no_random_number_and_touches_no_tensor(tmp_path, omniglot_ns_shards):
    """The whole registration (package written, MLflow model logged and registered) on a real sqlite store."""
    from data_pipeline.config import DataConfig
    from trainer.config import TrackingConfig
    from trainer.registry.mlflow_model import checkpoint_card, example_set
    from trainer.registry.tracking import Tracker

    cfg = paper_config("ns", hidden_dim=32, c_dim=8, z_dim=8)
    model = build_model(cfg)
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    class RunConfig:  # the fields checkpoint_card reads
        model = cfg
        data = DataConfig(shards_dir=str(omniglot_ns_shards), download=False)

    tracker = Tracker(TrackingConfig(root=str(tmp_path / "mlruns")), tmp_path, enabled=True)
    tracker.start("unit", {"a": 1}, tmp_path / "config.yaml")
    card = checkpoint_card(RunConfig, count_parameters(model), "step000000003", 3, 1, {"val/vlb": -99.0})
    rng = torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    future = tracker.register_model(model.state_dict(), card, "unit", ("champion",), "step000000003",
                                    example_set(RunConfig.data, card))
    assert future.result(timeout=300) == "1"
    tracker.end()
    assert torch.equal(rng[0], torch.random.get_rng_state())
    assert np.array_equal(rng[1], np.random.get_state()[1]) and rng[2] == random.getstate()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert not list((tmp_path / "to_register").iterdir())


# ------------------------------------------------------------------------------------------------ user images
GREY = InputSpec("omniglot_ns", channels=1, size=28, ink="high", binarize=False, train_set_size=5, max_set_size=20)


def test_user_images_are_prepared_like_the_omniglot_shards(tmp_path, omniglot_raw):
    import zipfile

    from data_pipeline.omniglot import decode_png

    with zipfile.ZipFile(omniglot_raw / "images_evaluation.zip") as z:
        name = next(n for n in sorted(z.namelist()) if n.endswith(".png"))
        png = z.read(name)
    (tmp_path / "a.png").write_bytes(png)  # black ink on white, 105x105
    Image.fromarray(255 - np.asarray(Image.open(tmp_path / "a.png").convert("L"))).save(tmp_path / "b.png")
    files = list_images([tmp_path])
    x = prepare_set(open_images(files), GREY)
    want = decode_png(png, 28).astype(np.float32) / 255.0  # the shards' preparation
    assert x.shape == (2, 1, 28, 28)
    assert np.array_equal(x[0, 0].numpy(), want)
    assert np.array_equal(x[1, 0].numpy(), want)  # white-on-black input: not inverted again
    binary = prepare_set(open_images(files), InputSpec("omniglot_ns", 1, 28, "high", True, 5, 20), seed=3)
    assert set(binary.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(binary, prepare_set(open_images(files), InputSpec("omniglot_ns", 1, 28, "high", True, 5, 20), seed=3))


def test_user_image_checks(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no PNG or JPEG"):
        list_images([tmp_path / "empty"])
    with pytest.raises(DataError, match="no such file"):
        list_images([tmp_path / "missing.png"])
    (tmp_path / "bad.png").write_text("text")
    with pytest.raises(DataError, match="bad.png: not a readable PNG"):
        open_images([tmp_path / "bad.png"])
    Image.new("RGB", (50, 20), (10, 200, 10)).save(tmp_path / "green.jpg")
    Image.new("L", (20, 50), 255).save(tmp_path / "grey.png")
    rgba = Image.new("RGBA", (30, 30), (0, 0, 0, 0))
    rgba.putpixel((15, 15), (0, 0, 0, 255))
    rgba.save(tmp_path / "drawing.png")
    green, grey, drawing = open_images([tmp_path / "green.jpg", tmp_path / "grey.png", tmp_path / "drawing.png"])
    with pytest.raises(DataError, match="green.jpg is a colour image"):
        check_images([tmp_path / "green.jpg"], [green], GREY)
    rgb = InputSpec("celeba", channels=3, size=64, ink="none", binarize=False, train_set_size=5, max_set_size=20)
    with pytest.raises(DataError, match="grey.png is a greyscale image"):
        check_images([tmp_path / "grey.png"], [grey], rgb)
    with pytest.raises(DataError, match="3 images given; the model conditions on at most 2"):
        check_images([tmp_path] * 3, [grey] * 3, InputSpec("omniglot_ns", 1, 28, "high", False, 5, 2))
    check_images([tmp_path / "drawing.png"], [drawing], GREY)  # transparency is paper, not colour
    ink = prepare_set([drawing], GREY)
    assert ink.shape == (1, 1, 28, 28) and 0 < float(ink.sum()) < 2  # one dark pixel -> a little ink
    assert prepare_set([green], rgb).shape == (1, 3, 64, 64)
