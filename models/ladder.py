"""The SCHA-VAE size ladder: presets s, m, l, xl (each also with LAG aggregation) for 28x28 binary data and
64x64 RGB, grown along one rule (docs/scaling.md).

Rung k = 0, 1, 2, 3 (s, m, l, xl) multiplies the parameter count and the FLOPs per image by ~4 each time,
half through depth and half through width:
- depth: every block count of the resolution strings doubles (`ModelConfig.depth = 2^k`): encoder blocks
  per resolution, stochastic layers per resolution (L = 18 * 2^k context and sample layers), decoder blocks;
- width: W_h grows by sqrt(2), rounded to a multiple of 64: W_h = 64 * round(2^(1 + k/2)) = 128, 192, 256, 384
  (bottleneck width W_h / 4; attention, prior and posterior heads follow W_h);
- the resolutions and the latent sizes stay: d_c = d_z = 32, latents at 1, 2, 4, 8; the strings are the
  reference script's for 28x28 (via 32x32) and `DEFAULT_STRINGS_64` for 64x64 (one more 64x64 group in front
  of the encoder and at the end of the decoder, same block counts).
Parameters ~ W_h^2 x blocks: s is exactly the paper configuration (4.76 M), then ~20 M, ~70 M and ~310 M
(LAG: 5.7, 24, 84, 375 M); `python -m models` prints the exact counts.

64x64 RGB uses the discretized mixture of logistics likelihood (10 components, as the reference's CelebA
"mixlog" scripts); the presets are the same `model=schavae_<size>[_lag]` with
`model.image_size=64 model.image_channels=3 model.likelihood=discretized_mix_logistic` (the strings left unset
pick the 64-pixel defaults). `python -m models` lists both shapes (the 64x64 ones as `<name>_rgb64`).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict, Tuple

from models.config import ModelConfig

SIZES: Tuple[str, ...] = ("s", "m", "l", "xl")
LATENT_DIM = 32

RGB64 = dict(image_size=64, image_channels=3, likelihood="discretized_mix_logistic", n_mixtures=10)


def rung(size: str) -> int:
    """s, m, l, xl -> 0, 1, 2, 3."""
    if size not in SIZES:
        raise ValueError(f"ladder size must be one of {SIZES}, got {size!r}")
    return SIZES.index(size)


def width(size: str) -> int:
    """W_h = 64 * round(2^(1 + k/2)): 128, 192, 256, 384."""
    return 64 * round(2 ** (1 + rung(size) / 2))


def depth(size: str) -> int:
    """Block-count multiplier 2^k: 1, 2, 4, 8."""
    return 2 ** rung(size)


def preset_name(size: str, lag: bool = False, rgb64: bool = False) -> str:
    return f"schavae_{size}" + ("_lag" if lag else "") + ("_rgb64" if rgb64 else "")


def ladder_config(size: str, lag: bool = False, rgb64: bool = False) -> ModelConfig:
    """The ModelConfig of one rung (resolution strings left unset: the defaults for the image size, times
    `depth`)."""
    cfg = ModelConfig(
        name=preset_name(size, lag, rgb64), hidden_dim=width(size), depth=depth(size), c_dim=LATENT_DIM, z_dim=LATENT_DIM,
        aggregation="lag" if lag else "mean",
    )
    return replace(cfg, **RGB64) if rgb64 else cfg


def paper_name(size: str, lag: bool = False, rgb64: bool = False) -> str:
    return f"SCHA-VAE{'-LAG' if lag else ''} {size}" + (" 64px RGB" if rgb64 else "")


def ladder_presets() -> Dict[str, Tuple[str, ModelConfig]]:
    """name -> (paper name, config) for every rung, aggregation and image shape, in listing order."""
    return {
        preset_name(size, lag, rgb64): (paper_name(size, lag, rgb64), ladder_config(size, lag, rgb64))
        for rgb64 in (False, True) for size in SIZES for lag in (False, True)
    }
