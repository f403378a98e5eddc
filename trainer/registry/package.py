"""The registered (and exported) model on disk: tensors as safetensors plus the model card as JSON, nothing else.

    weights.safetensors   {state-dict name: tensor}, floats in fp32
    model.json            the card: format, the typed model config, how inputs were prepared, provenance, metrics

`read_package` builds the model from the installed package (`models.registry`) and loads the tensors strictly.
A package read from a tracking store is data, never code, and nothing it says is trusted before it is checked
(docs/reliability.md, "Trust boundaries"), in this order, each refusal one line naming the file and the field:
1. the card: every field of its declared type, the model a name of the zoo, every size and count within
   `LIMITS` (the largest the project's presets and ladder use, with a margin), `inputs` consistent with `model`;
2. the weights file: refused by its first bytes unless it is safetensors (a pickle, a `torch.save` zip);
3. every tensor's name, shape and dtype in the safetensors header against the model built on the meta device
   (no memory, no random init) before any tensor is read;
4. the tensors themselves: all finite.
"""
from __future__ import annotations

import json
import math
import struct
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from data_pipeline.input_spec import MAX_SET_SIZE, InputSpec
from models.config import ModelConfig
from trainer.run.errors import Refused

FORMAT = "scha-vae-model/1"
WEIGHTS = "weights.safetensors"
CARD = "model.json"

# The largest value a card may give each size and count of its model: the largest the project's own presets
# and ladder use (configs/model/*.yaml, models/ladder.py: W_h 512, d_c = d_z 32, L 3, 3 layers per residual
# block, 64 encoder channels, 10 mixture components, depth 8 (xl), 9 blocks per resolution group, 7 groups),
# with a margin of 2x or more. A card beyond them is refused before anything is built.
LIMITS: Dict[str, int] = {"hidden_dim": 1024, "c_dim": 128, "z_dim": 128, "n_stochastic": 32, "n_res": 8,
                          "ch_enc": 256, "n_mixtures": 32, "depth": 16, "checkpoint_every": 64}
MAX_GROUPS, MAX_BLOCKS = 12, 24  # per resolution string (model.str_enc / str_gen / str_dec): groups, blocks a group
MAX_PARAMS = 1_000_000_000  # the largest rung (xl LAG) has 375 M
MAX_CROP = 218  # CelebA's aligned images are 178 x 218


class PackageError(Refused):
    """A model package is missing, not ours, or not safe to load; the message names the file and why."""

    label = "model error"


def _type_errors(cls: type, raw: Mapping[str, Any], prefix: str) -> List[str]:
    """The fields of `raw` whose JSON value is not of `cls`'s declared type (a bool is no int, 1e9 no int)."""
    hints = typing.get_type_hints(cls)
    bad = []
    for key, value in raw.items():
        want = hints.get(key)
        if want is None:
            continue  # unknown keys are reported by the constructor
        allowed = typing.get_args(want) if typing.get_origin(want) is typing.Union else (want,)
        ok = any(value is None if t is type(None) else
                 (isinstance(value, t) and not (t in (int, float) and isinstance(value, bool))
                  or (t is float and isinstance(value, int) and not isinstance(value, bool)))
                 for t in allowed)
        if not ok:
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            bad.append(f"{prefix}.{key} = {shown} is not {names}")
    return bad


def check_card(card: "ModelCard", where: str) -> None:
    """Refuse a card whose model is not of the zoo, whose sizes exceed LIMITS, or whose inputs do not fit it."""
    from models.layers_multiscale import parse_resolution_string
    from models.registry import ZOO

    m, i = card.model, card.inputs

    def refuse(field_name: str, problem: str) -> None:
        raise PackageError(f"{where}: {field_name} {problem}")

    if m.name not in ZOO:
        shown = m.name if len(m.name) <= 60 else m.name[:57] + "..."
        refuse("model.name", f"{shown!r} is not a model of the installed zoo (python -m models lists them)")
    for key, limit in LIMITS.items():
        if getattr(m, key) > limit:
            refuse(f"model.{key}", f"= {getattr(m, key)} exceeds the limit of {limit} on model cards")
    for key in ("str_enc", "str_gen", "str_dec"):
        text = getattr(m, key)
        if text is None:
            continue
        if len(text) > 200:
            refuse(f"model.{key}", f"is {len(text)} characters long (a resolution string is at most 200)")
        try:
            groups = parse_resolution_string(text, f"model.{key}")
        except ValueError as exc:
            refuse(f"model.{key}", f"is not a resolution string ({exc})")
        if len(groups) > MAX_GROUPS or max(n for _, n in groups) > MAX_BLOCKS or max(r for r, _ in groups) > 64:
            refuse(f"model.{key}", f"= {text!r} exceeds the limits on model cards ({MAX_GROUPS} groups, "
                                   f"{MAX_BLOCKS} blocks a group, resolutions up to 64)")
    if i.size != m.image_size:
        refuse("inputs.size", f"= {i.size} differs from model.image_size = {m.image_size}")
    if i.channels != m.image_channels:
        refuse("inputs.channels", f"= {i.channels} differs from model.image_channels = {m.image_channels}")
    if i.ink not in ("high", "none"):
        refuse("inputs.ink", f"= {i.ink!r} is not 'high' or 'none'")
    if i.binarize and m.likelihood != "bernoulli":
        refuse("inputs.binarize", f"is true but model.likelihood = {m.likelihood!r} (only Bernoulli models binarise)")
    for key in ("train_set_size", "max_set_size"):
        if not 1 <= getattr(i, key) <= MAX_SET_SIZE:
            refuse(f"inputs.{key}", f"= {getattr(i, key)} is outside 1..{MAX_SET_SIZE}")
    if not 0 <= i.center_crop <= MAX_CROP:
        refuse("inputs.center_crop", f"= {i.center_crop} is outside 0..{MAX_CROP}")


def card_object(text: str, where: str, expected_format: str, kind: str) -> Dict[str, Any]:
    """A card file's JSON object, refused (PackageError naming `where`) unless it is one with `expected_format`."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise PackageError(f"{where}: not JSON ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("format") != expected_format:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise PackageError(f"{where}: format {got!r}, expected {expected_format!r} (not a {kind})")
    return raw


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
        raw = card_object(text, where, FORMAT, "scha-vae model card")
        bad = [f"{key} is not an object" for key in ("model", "inputs") if not isinstance(raw.get(key), dict)]
        bad += _type_errors(ModelConfig, raw.get("model") or {}, "model") if not bad else []
        bad += _type_errors(InputSpec, raw.get("inputs") or {}, "inputs") if not bad else []
        if bad:
            raise PackageError(f"{where}: invalid model card ({'; '.join(bad[:3])})")
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
        try:
            card.metrics = {str(k): (math.nan if v is None else float(v)) for k, v in dict(card.metrics).items()}
        except (TypeError, ValueError) as exc:
            raise PackageError(f"{where}: invalid model card (metrics: {exc})") from exc
        check_card(card, where)
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


def _header(weights: Path) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """{name: (shape, dtype)} of a safetensors file, from its header alone (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            out = {}
            for name in f.keys():
                part = f.get_slice(name)
                out[name] = (tuple(part.get_shape()), str(part.get_dtype()))
            return out
    except (SafetensorError, OSError, ValueError) as exc:
        raise PackageError(f"{weights}: unreadable safetensors file ({exc})") from exc


_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL", torch.uint8: "U8"}


def check_tensors(model: nn.Module, name: str, weights: Path, card_file: Path) -> None:
    """Every tensor of the file's header must be one of the (meta-device) model's, with its shape and dtype."""
    want = {k: (tuple(v.shape), _DTYPES.get(v.dtype, str(v.dtype))) for k, v in model.state_dict().items()}
    have = _header(weights)

    def short(names) -> str:
        names = sorted(names)
        shown = ", ".join(repr(n if len(n) <= 60 else n[:57] + "...") for n in names[:3])
        return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    what = f"{weights} does not fit model {name!r} of {card_file}"
    if set(have) - set(want):
        raise PackageError(f"{what}: unexpected tensors {short(set(have) - set(want))}")
    if set(want) - set(have):
        raise PackageError(f"{what}: missing tensors {short(set(want) - set(have))}")
    for name, (shape, dtype) in want.items():
        got_shape, got_dtype = have[name]
        if got_shape != shape:
            raise PackageError(f"{what}: tensor {name!r} has shape {list(got_shape)}, the model's is {list(shape)}")
        if got_dtype != dtype:
            raise PackageError(f"{what}: tensor {name!r} is {got_dtype}, the model's is {dtype} (packages store "
                               f"floats as F32)")


def read_package(directory: Path, device: torch.device | str = "cpu") -> Tuple[nn.Module, ModelCard]:
    """The model (eval mode, on `device`) and its card, built from the installed package after every check
    of the module docstring."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from models.registry import build_model

    directory = Path(directory)
    card = read_card(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise PackageError(f"{weights} is missing")
    check_safetensors(weights)
    # built on the meta device: no memory for the random init and no draw from the global RNG; the card's
    # sizes are bounded (check_card), so building it is too
    try:
        with torch.device("meta"):
            model = build_model(card.model)
    except ValueError as exc:  # a combination of fields only the model's constructor rejects
        raise PackageError(f"{directory / CARD}: model {card.model.name!r} cannot be built ({exc})") from exc
    n_params = sum(p.numel() for p in model.parameters())
    if n_params > MAX_PARAMS:
        raise PackageError(f"{directory / CARD}: model has {n_params:,} parameters, above the limit of "
                           f"{MAX_PARAMS:,} on model cards")
    check_tensors(model, card.model.name, weights, directory / CARD)
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise PackageError(f"{weights}: unreadable safetensors file ({exc})") from exc
    non_finite = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if non_finite:
        raise PackageError(f"{weights}: {len(non_finite)} of {len(state)} tensors hold NaN or infinite values "
                           f"(first: {', '.join(non_finite[:3])}); refusing a model that cannot compute")
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
