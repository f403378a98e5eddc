"""How the images a model was trained on were prepared, as its card records it (trainer/registry/package.py):
training data, `launch.generate` and the served model prepare images by this one description."""
from __future__ import annotations

from dataclasses import dataclass

# the largest set the evaluation protocol conditions on (SPEC 7: set sizes up to 20)
MAX_CONTEXT = 20
# the largest set size a run may train or test on (data.set_size, data.set_size_test) and a model card may
# declare (inputs.max_set_size): the presets use at most 20, an Omniglot character has 20 images
MAX_SET_SIZE = 50


@dataclass
class InputSpec:
    dataset: str
    channels: int  # 1: greyscale, 3: RGB
    size: int  # square side in pixels
    ink: str  # "high": strokes are 1 on a 0 background (Omniglot as stored); "none": natural images
    binarize: bool  # Bernoulli models saw every pixel drawn Bernoulli(intensity)
    train_set_size: int
    max_set_size: int = MAX_CONTEXT
    # RGB (CelebA): side of the centred square cut from the 178 x 218 aligned images before resizing (0: the
    # largest square, data.center_crop); cards written before it was recorded read as 0, what they were given
    center_crop: int = 0

    @classmethod
    def of(cls, model, data) -> "InputSpec":
        """The spec of a model (models.config.ModelConfig) trained on `data` (data_pipeline.config.DataConfig)."""
        return cls(dataset=data.name, channels=model.image_channels, size=model.image_size,
                   ink="none" if data.name == "celeba" else "high",
                   binarize=model.likelihood == "bernoulli" and data.binarize == "dynamic",
                   train_set_size=data.set_size, max_set_size=max(MAX_CONTEXT, data.set_size, data.set_size_test),
                   center_crop=data.center_crop if data.name == "celeba" else 0)
