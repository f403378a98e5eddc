"""The model zoo: config name -> class, paper name and the paper (reference script) configuration."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import Dict

from torch import nn

from models.config import ModelConfig
from models.ladder import ladder_presets


@dataclass(frozen=True)
class ZooEntry:
    target: str  # "module:Class"
    paper_name: str
    paper_config: ModelConfig
    ladder: bool = False  # a scaled-up SCHA-VAE preset of models/ladder.py (not a paper model)


def _entry(target: str, paper: str, **kw) -> ZooEntry:
    return ZooEntry(target, paper, ModelConfig(**kw))


_MULTISCALE = dict(str_enc="32-9,16-6,8-6,4-6,2-3,1-3", str_gen="8-6,4-6,2-3,1-3", str_dec="32-9,16-6,8-6")

ZOO: Dict[str, ZooEntry] = {
    "vae": _entry("models.vae:VAE", "VAE", name="vae", hidden_dim=512),
    "ns": _entry("models.ns:NeuralStatistician", "NS", name="ns", hidden_dim=512),
    "ns_lag": _entry("models.ns:NeuralStatistician", "NS-LAG", name="ns_lag", hidden_dim=512, aggregation="lag"),
    "cns": _entry("models.cns:ConvNeuralStatistician", "CNS", name="cns", hidden_dim=256),
    "cns_lag": _entry("models.cns:ConvNeuralStatistician", "CNS-LAG", name="cns_lag", hidden_dim=256, aggregation="lag"),
    "hfsgm": _entry("models.hfsgm:HFSGM", "HFSGM", name="hfsgm", hidden_dim=128),
    "hfsgm_lag": _entry("models.hfsgm:HFSGMLAG", "HFSGM-LAG", name="hfsgm_lag", hidden_dim=128, aggregation="lag"),
    "chfsgm": _entry("models.chfsgm:CHFSGM", "CHFSGM", name="chfsgm", hidden_dim=128),
    "chfsgm_lag": _entry("models.chfsgm:CHFSGM", "CHFSGM-LAG", name="chfsgm_lag", hidden_dim=128, aggregation="lag"),
    "schavae": _entry("models.schavae:SCHAVAE", "SCHA-VAE", name="schavae", hidden_dim=128, **_MULTISCALE),
    "schavae_lag": _entry(
        "models.schavae:SCHAVAE", "SCHA-VAE-LAG", name="schavae_lag", hidden_dim=128, aggregation="lag", **_MULTISCALE
    ),
}

# the scaled-up SCHA-VAE size ladder (models/ladder.py; docs/scaling.md)
ZOO.update(
    (name, ZooEntry("models.schavae:SCHAVAE", paper, cfg, ladder=True)) for name, (paper, cfg) in ladder_presets().items()
)
PAPER_MODELS = [name for name, entry in ZOO.items() if not entry.ladder]  # the paper's zoo, in listing order


def model_class(name: str) -> type:
    if name not in ZOO:
        raise ValueError(f"unknown model {name!r}; the zoo has: {', '.join(ZOO)}")
    module, cls = ZOO[name].target.split(":")
    return getattr(importlib.import_module(module), cls)


def build_model(cfg: ModelConfig) -> nn.Module:
    return model_class(cfg.name)(cfg)


def paper_config(name: str, **overrides) -> ModelConfig:
    model_class(name)  # validates the name
    return replace(ZOO[name].paper_config, **overrides)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
