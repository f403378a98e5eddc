"""The registered (and exported) model on disk: tensors as safetensors plus the model card as JSON, nothing else.

    weights.safetensors   {state-dict name: tensor}, floats in fp32
    model.json            the card: format, the typed model config, how inputs were prepared, provenance, metrics

`read_package` builds the model from the installed package (`models.registry`) and loads the tensors strictly.
A weights file that is not safetensors (a pickle, a `torch.save` zip) is refused by its first bytes, before
anything in it is interpreted: a package read from a tracking store is data, never code (docs/reliability.md,
"Trust boundaries").
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from data_pipeline.input_spec import InputSpec
from models.config import ModelConfig
from trainer.run.errors import Refused

FORMAT = "scha-vae-model/1"
WEIGHTS = "weights.safetensors"
CARD = "model.json"
class PackageError(Refused):
    """A model package is missing, not ours, or not safe to load; the message names the file and why."""

    label = "model error"


@dataclass
class ModelCard:
    model: ModelConfig
    inputs: InputSpec
    paper_name: str
    n_params: int
    checkpoint: Dict[str, Any] = field(default_factory=dict)  # tag, step, epoch
    metrics: Dict[str, float] = field(default_factory=dict)  # e.g. val/vlb, test/vlb (nats per image)
    training_run_id: str = ""
    format: str = FORMAT

    def to_json(self) -> str:
        card = asdict(self)
        card["metrics"] = {k: (v if math.isfinite(v) else None) for k, v in self.metrics.items()}
        return json.dumps(card, indent=2, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str, where: str) -> "ModelCard":
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise PackageError(f"{where}: not JSON ({exc})") from exc
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise PackageError(f"{where}: format {got!r}, expected {FORMAT!r} (not a scha-vae model card)")
        try:
            model = ModelConfig(**raw.pop("model"))
            inputs = InputSpec(**raw.pop("inputs"))
            known = {f.name for f in fields(cls)} - {"model", "inputs"}
            unknown = set(raw) - known
            if unknown:
                raise TypeError(f"unknown keys {sorted(unknown)}")
            card = cls(model=model, inputs=inputs, **raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise PackageError(f"{where}: invalid model card ({exc})") from exc
        card.metrics = {k: (math.nan if v is None else float(v)) for k, v in card.metrics.items()}
        return card


def cpu_state(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Contiguous CPU copies, floats as fp32 (what the package stores)."""
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous().clone()
            for k, v in state.items()}


def write_package(directory: Path, state: Mapping[str, torch.Tensor], card: ModelCard) -> Dict[str, Path]:
    """Write weights.safetensors and model.json into `directory`; return {"weights": path, "card": path}."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights, card_file = directory / WEIGHTS, directory / CARD
    save_file(cpu_state(state), str(weights), metadata={"format": FORMAT})
    card_file.write_text(card.to_json())
    return {"weights": weights, "card": card_file}


def check_safetensors(path: Path) -> None:
    """Refuse by content anything that is not a safetensors file (8-byte header length, then a JSON header)."""
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= path.stat().st_size:
        return
    if head[:1] == b"\x80":
        kind = "a Python pickle"
    elif head[:2] == b"PK":
        kind = "a zip archive (torch.save format, which holds a pickle)"
    else:
        kind = "not a safetensors file"
    raise PackageError(f"{path}: {kind}; refusing to load it (model weights must be safetensors; nothing "
                           f"in the file was executed)")


def read_card(directory: Path) -> ModelCard:
    path = Path(directory) / CARD
    if not path.is_file():
        raise PackageError(f"{path} is missing: {directory} is not a scha-vae model package")
    return ModelCard.from_json(path.read_text(), str(path))


def read_package(directory: Path, device: torch.device | str = "cpu") -> Tuple[nn.Module, ModelCard]:
    """The model (eval mode, on `device`) and its card, built from the installed package."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from models.registry import build_model

    directory = Path(directory)
    card = read_card(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise PackageError(f"{weights} is missing")
    check_safetensors(weights)
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise PackageError(f"{weights}: unreadable safetensors file ({exc})") from exc
    # built on the meta device: no memory for the random init and no draw from the global RNG; the
    # weights are then assigned, so every tensor is one of the file's
    with torch.device("meta"):
        model = build_model(card.model)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise PackageError(f"{weights} does not fit model {card.model.name!r} of {directory / CARD}: "
                           f"{str(exc).splitlines()[0][:400]}") from exc
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise PackageError(f"{weights} leaves tensors unset: {leftover[:5]}")
    return model.to(device).eval(), card


def find_package(root: Path) -> Optional[Path]:
    """The directory under `root` (a downloaded MLflow model, or a package itself) that holds model.json."""
    root = Path(root)
    for candidate in (root, root / "artifacts"):
        if (candidate / CARD).is_file():
            return candidate
    return None
