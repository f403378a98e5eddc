"""The feature network of the sample-quality job on disk and in MLflow: a package like the generative models'.

    weights.safetensors    the ProtoNet's state dict, fp32
    feature_model.json     the card: format, architecture, the dataset and split it was trained on, the names of
                           its training classes, how it was trained, and its measured few-shot accuracies

Read path as trainer/registry/package.py's: the card is checked first, the weights file is refused by its first
bytes when it is not safetensors (a pickle, a torch.save zip: nothing in it is interpreted), then the net is built
from the installed package and the tensors loaded strictly. Registered in MLflow under its own name (default
`protonet`) as a plain artifact directory of its training run: it is never served, so no pyfunc wrapper.
"""
from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from models.protonet import ProtoNet, ProtoNetConfig
from trainer.registry.package import PackageError, card_object, check_safetensors, cpu_state

FORMAT = "scha-vae-feature-model/1"
WEIGHTS = "weights.safetensors"
CARD = "feature_model.json"
ARTIFACT_PATH = "feature_model"  # inside the training run's artifacts


@dataclass
class FeatureCard:
    net: ProtoNetConfig
    dataset: str
    split: str  # the split whose classes it was trained on: always "train"
    train_classes: List[str]  # names of the classes it saw ("alphabet/character"): the job checks disjointness
    training: Dict[str, Any] = field(default_factory=dict)  # episodes, ways, shots, ... and the wall time
    # measured on real images: "test/20way_1shot", "test/20way_1shot_se", "test/20way_5shot", ... "val/..."
    accuracy: Dict[str, float] = field(default_factory=dict)
    run_id: str = ""
    format: str = FORMAT

    def to_json(self) -> str:
        card = asdict(self)
        card["accuracy"] = {k: (v if math.isfinite(v) else None) for k, v in self.accuracy.items()}
        return json.dumps(card, indent=1, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str, where: str) -> "FeatureCard":
        raw = card_object(text, where, FORMAT, "feature-model card")
        try:
            net = ProtoNetConfig(**raw.pop("net"))
            unknown = set(raw) - {f.name for f in fields(cls)}
            if unknown:
                raise TypeError(f"unknown keys {sorted(unknown)}")
            card = cls(net=net, **raw)
            if card.split != "train" or not all(isinstance(n, str) for n in card.train_classes):
                raise ValueError(f"split {card.split!r} (a feature net is trained on training classes only)")
        except (KeyError, TypeError, ValueError) as exc:
            raise PackageError(f"{where}: invalid feature-model card ({exc})") from exc
        card.accuracy = {k: (math.nan if v is None else float(v)) for k, v in card.accuracy.items()}
        return card


def write_feature_package(directory: Path, net: ProtoNet, card: FeatureCard) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(cpu_state(net.state_dict()), str(directory / WEIGHTS), metadata={"format": FORMAT})
    (directory / CARD).write_text(card.to_json())
    return directory


def read_feature_package(directory: Path, device: torch.device | str = "cpu") -> Tuple[ProtoNet, FeatureCard]:
    """The net (eval mode, on `device`) and its card; PackageError naming the file otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    card_file, weights = directory / CARD, directory / WEIGHTS
    if not card_file.is_file():
        raise PackageError(f"{card_file} is missing: {directory} is not a feature-model package")
    card = FeatureCard.from_json(card_file.read_text(), str(card_file))
    if not weights.is_file():
        raise PackageError(f"{weights} is missing")
    check_safetensors(weights)  # a pickle is refused here, before anything reads it
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise PackageError(f"{weights}: unreadable safetensors file ({exc})") from exc
    with torch.device("meta"):  # no random init drawn from the global RNG; every tensor is the file's
        net = ProtoNet(card.net)
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise PackageError(f"{weights} does not fit the ProtoNet of {card_file}: "
                           f"{str(exc).splitlines()[0][:400]}") from exc
    return net.to(device).eval(), card


def download_feature_package(uri: str) -> Path:
    """The package directory behind `uri`: models:/<name>@<alias>, models:/<name>/<version>, runs:/..., or a
    local directory. Only files are copied."""
    local = uri.startswith("file://") or ("://" not in uri and not uri.startswith(("models:/", "runs:/")))
    if local:
        root = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
        if not root.exists():
            raise FileNotFoundError(f"feature model {uri!r}: {root} does not exist")
    else:
        import mlflow

        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri,
                                                        dst_path=tempfile.mkdtemp(prefix="feature-model-")))
    for candidate in (root, root / ARTIFACT_PATH):
        if (candidate / CARD).is_file():
            return candidate
    pickled = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in (".pth", ".pkl", ".pt"))
    raise PackageError(f"feature model {uri!r} holds no {CARD}" + (
        f" (it holds pickled files {pickled[:3]}, which are never loaded)" if pickled else "")
        + ": train one with `python -m launch.train_features`")


def register_feature_package(directory: Path, run_id: str, model_name: str, aliases=("champion",)) -> str:
    """Log the package as artifacts of run `run_id` and register them as a new version of `model_name`."""
    import mlflow

    client = mlflow.MlflowClient()
    client.log_artifacts(run_id, str(directory), ARTIFACT_PATH)
    try:
        client.get_registered_model(model_name)
    except Exception:
        client.create_registered_model(
            model_name, description="Prototypical network (feature space of eval=sample_quality), trained by "
                                    "`python -m launch.train_features` on the training classes only.")
    source = f"{client.get_run(run_id).info.artifact_uri}/{ARTIFACT_PATH}"
    mv = client.create_model_version(model_name, source=source, run_id=run_id)
    card = FeatureCard.from_json((Path(directory) / CARD).read_text(), str(directory))
    client.set_model_version_tag(model_name, mv.version, "dataset", card.dataset)
    client.set_model_version_tag(model_name, mv.version, "kind", "feature_model")
    for key, value in card.accuracy.items():
        if math.isfinite(value):
            client.set_model_version_tag(model_name, mv.version, f"accuracy.{key}", f"{value:.4f}")
    for alias in aliases:
        client.set_registered_model_alias(model_name, alias, mv.version)
    return str(mv.version)


def load_feature_model(cfg, device: torch.device | str = "cpu") -> Tuple[ProtoNet, FeatureCard, str]:
    """The net and card behind `eval.feature_model` (a trainer.config.Config), from the job's MLflow store or a
    local directory. EvalError (ModelNotFound for a missing name / alias / version) names what is wrong: a
    pickled file, a card of another kind, a net trained on another dataset than `data.name`."""
    from trainer.evaluation.common import EvalError
    from trainer.registry.resolve import resolve_model, with_store
    from trainer.run.errors import ModelNotFound

    uri = cfg.eval.feature_model
    if not uri:
        raise EvalError("eval.feature_model is required: train one with `python -m launch.train_features` "
                        "(registered as models:/protonet@champion)")
    what = f"eval.feature_model {uri!r}"
    try:
        if uri.startswith(("models:/", "runs:/")):
            with_store(cfg.tracking, what, lambda: resolve_model(uri))
            package = with_store(cfg.tracking, what, lambda: download_feature_package(uri))
        else:  # a local directory: nothing to retry
            package = download_feature_package(uri)
        net, card = read_feature_package(package, device)
    except ModelNotFound as exc:
        raise ModelNotFound(f"eval.feature_model: {exc}; train one with `python -m launch.train_features`") from exc
    except (PackageError, FileNotFoundError) as exc:
        raise EvalError(f"{what}: {exc}") from exc
    if card.dataset != cfg.data.name:
        raise EvalError(f"{what} was trained on {card.dataset!r}, not data={cfg.data.name}: train one on "
                        f"`python -m launch.train_features data={cfg.data.name}`")
    if (card.net.image_channels, card.net.image_size) != (cfg.data.image_channels, cfg.data.image_size):
        raise EvalError(f"{what} takes {card.net.image_channels}x{card.net.image_size} px images, the data are "
                        f"{cfg.data.image_channels}x{cfg.data.image_size}")
    return net, card, uri
