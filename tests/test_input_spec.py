"""One description of how a model's inputs are prepared (data_pipeline/input_spec.py), used by the shards, the
card, launch.generate and the server: a crop-trained CelebA model's card records the crop, and a user's image is
cropped as its training images were."""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from data_pipeline.celeba import load_image
from data_pipeline.config import DataConfig
from data_pipeline.input_spec import InputSpec
from data_pipeline.user_images import prepare_image
from models.config import ModelConfig
from trainer.registry.package import ModelCard


def celeba(center_crop: int):
    model = ModelConfig(name="ns", image_channels=3, image_size=64, likelihood="discretized_mix_logistic")
    return model, DataConfig(name="celeba", center_crop=center_crop, binarize="none")


def aligned_image(seed: int = 0) -> Image.Image:
    """A 178 x 218 RGB image, the size of img_align_celeba's, with structure a crop can tell apart."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8))


def test_the_card_records_the_crop_and_reads_back():
    model, data = celeba(140)
    spec = InputSpec.of(model, data)
    assert (spec.center_crop, spec.channels, spec.size, spec.ink, spec.binarize) == (140, 3, 64, "none", False)
    card = ModelCard(model, spec, "NS", 1)
    assert ModelCard.from_json(card.to_json(), "card").inputs == spec
    old = json.loads(card.to_json())
    del old["inputs"]["center_crop"]  # a card written before the crop was recorded
    assert ModelCard.from_json(json.dumps(old), "old card").inputs.center_crop == 0


def test_a_users_image_is_cropped_like_the_training_images():
    img = aligned_image()
    png = io.BytesIO()
    img.save(png, format="PNG")
    for crop in (0, 140):
        spec = InputSpec.of(*celeba(crop))
        shard = load_image(png.getvalue(), 64, crop)  # what prepare wrote into the shards (uint8)
        user = prepare_image(img, spec)  # what generate and serve give the model
        assert np.array_equal(np.round(user * 255).astype(np.uint8), shard), crop
    uncropped = prepare_image(img, InputSpec.of(*celeba(0)))
    assert not np.array_equal(uncropped, prepare_image(img, InputSpec.of(*celeba(140))))
    # a user's image of another size: the same fraction of its short side
    big = img.resize((356, 436))
    assert prepare_image(big, InputSpec.of(*celeba(140))).shape == (3, 64, 64)
