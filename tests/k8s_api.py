"""Rendered objects against the real API definitions: built-in kinds against the `kubernetes` client's models,
Kubeflow Trainer kinds against the `kubeflow-trainer-api` models (Trainer v2.3.0; setup.py pins both).

Those models ignore keys they do not know when deserialising, so deserialising alone checks nothing: `api_errors`
walks every key of the object through the model tree and reports a key the model does not have, a value of the
wrong JSON type, and (Trainer models, which mark them) a required field that is missing. Two points where the
client's model types are narrower than what the API server accepts are widened, and only there: a
resource.Quantity (the client types it `str`, the server also takes a JSON number: `nvidia.com/gpu: 8`), and an
IntOrString (the client types it `object`; here it must be an int or a string)."""
from __future__ import annotations

import re
import typing
from functools import lru_cache
from typing import Any, List

TRAINER_GROUP = "trainer.kubeflow.org"
TRAINER_KINDS = {"TrainJob": "TrainerV1alpha1TrainJob", "TrainingRuntime": "TrainerV1alpha1TrainingRuntime",
                 "ClusterTrainingRuntime": "TrainerV1alpha1ClusterTrainingRuntime"}
# (model, attribute) that are resource.Quantity in the Kubernetes API (the client types them `str`)
QUANTITY = {("V1ResourceRequirements", "limits"), ("V1ResourceRequirements", "requests"),
            ("V1VolumeResourceRequirements", "limits"), ("V1VolumeResourceRequirements", "requests"),
            ("V1EmptyDirVolumeSource", "size_limit"), ("V1ResourceQuotaSpec", "hard"),
            ("V1LimitRangeItem", "max"), ("V1LimitRangeItem", "min"), ("V1LimitRangeItem", "default"),
            ("V1LimitRangeItem", "default_request")}


def api_errors(obj: dict) -> List[str]:
    """Every unknown field, wrong type or (Trainer) missing required field of `obj`, as `path: problem`."""
    api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    where = f"{kind}/{obj.get('metadata', {}).get('name', '?')}"
    if api_version.startswith(TRAINER_GROUP + "/"):
        if api_version != f"{TRAINER_GROUP}/v1alpha1" or kind not in TRAINER_KINDS:
            return [f"{where}: {api_version} {kind} is not a Kubeflow Trainer v2.3 kind"]
        from kubeflow_trainer_api import models

        cls = getattr(models, TRAINER_KINDS[kind])
        errors: List[str] = []
        _walk_trainer(obj, cls, where, errors)
        return errors
    cls = core_model(api_version, kind)
    if cls is None:
        return [f"{where}: {api_version} {kind} is not a kind of the kubernetes client"]
    errors = []
    _walk_core(obj, cls.__name__, where, errors)
    return errors


# ----------------------------------------------------------------------------------------------------
# built-in kinds: the kubernetes client's models (openapi_types / attribute_map)


@lru_cache(maxsize=None)
def core_model(api_version: str, kind: str):
    """The client's model class of apiVersion/kind, if its API group serves that kind (a `create_` method)."""
    import kubernetes.client as kc

    group, _, version = api_version.rpartition("/")
    cls = getattr(kc, f"{version.capitalize()}{kind}", None)
    api = getattr(kc, f"{group.split('.')[0].capitalize() if group else 'Core'}{version.capitalize()}Api", None)
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", kind).lower()
    if cls is None or api is None or not (hasattr(api, f"create_namespaced_{snake}") or hasattr(api, f"create_{snake}")):
        return None
    return cls


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _walk_core(value, typ: str, path: str, errors: List[str]) -> None:
    import kubernetes.client as kc

    if typ.startswith("list["):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _walk_core(item, typ[5:-1], f"{path}[{i}]", errors)
    elif typ.startswith("dict("):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a map, got {type(value).__name__}")
            return
        inner = typ[typ.index(",") + 1:-1].strip()
        for k, v in value.items():
            _walk_core(v, inner, f"{path}.{k}", errors)
    elif typ == "quantity":
        if not (isinstance(value, (str, float)) or _is_int(value)):
            errors.append(f"{path}: a quantity is a string or a number, got {type(value).__name__}")
    elif typ == "object":  # IntOrString in every place the manifests use one
        if not (isinstance(value, (str, dict)) or _is_int(value)):
            errors.append(f"{path}: expected an int or a string, got {type(value).__name__}")
    elif typ in ("str", "datetime", "date"):
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {type(value).__name__} {value!r}")
    elif typ == "int":
        if not _is_int(value):
            errors.append(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
    elif typ == "float":
        if not (_is_int(value) or isinstance(value, float)):
            errors.append(f"{path}: expected a number, got {type(value).__name__} {value!r}")
    elif typ == "bool":
        if not isinstance(value, bool):
            errors.append(f"{path}: expected a boolean, got {type(value).__name__} {value!r}")
    else:
        cls = getattr(kc, typ)
        if not isinstance(value, dict):
            errors.append(f"{path}: expected an object ({typ}), got {type(value).__name__}")
            return
        by_key = {json_key: attr for attr, json_key in cls.attribute_map.items()}
        for k, v in value.items():
            attr = by_key.get(k)
            if attr is None:
                errors.append(f"{path}.{k}: unknown field ({typ} has {sorted(by_key)})")
                continue
            inner = cls.openapi_types[attr]
            if (typ, attr) in QUANTITY:
                inner = "dict(str, quantity)" if inner.startswith("dict(") else "quantity"
            _walk_core(v, inner, f"{path}.{k}", errors)


# ----------------------------------------------------------------------------------------------------
# Trainer kinds: the kubeflow-trainer-api pydantic models (fields by alias, strict types, oneOf wrappers)


@lru_cache(maxsize=None)
def _adapter(ann):
    from pydantic import TypeAdapter

    return TypeAdapter(ann)


def _walk_trainer(value, ann, path: str, errors: List[str]) -> None:
    from pydantic import BaseModel, ValidationError

    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Union:
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return
        if len(options) == 1:
            _walk_trainer(value, options[0], path, errors)
            return
    if origin in (list, List):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _walk_trainer(item, args[0], f"{path}[{i}]", errors)
        return
    if origin in (dict, typing.Dict):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a map, got {type(value).__name__}")
            return
        for k, v in value.items():
            _walk_trainer(v, args[1], f"{path}.{k}", errors)
        return
    if ann is Any:
        return
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        if "actual_instance" in ann.model_fields:  # a oneOf wrapper (Quantity: float | str, IntOrString: int | str)
            try:
                ann(value)
            except (ValidationError, ValueError) as exc:
                errors.append(f"{path}: {ann.__name__} refuses {value!r}: {str(exc).splitlines()[0]}")
            return
        if not isinstance(value, dict):
            errors.append(f"{path}: expected an object ({ann.__name__}), got {type(value).__name__}")
            return
        fields = {(f.alias or name): f for name, f in ann.model_fields.items()}
        for k, v in value.items():
            if k not in fields:
                errors.append(f"{path}.{k}: unknown field ({ann.__name__} has {sorted(fields)})")
                continue
            _walk_trainer(v, fields[k].annotation, f"{path}.{k}", errors)
        for key, f in fields.items():
            if f.is_required() and key not in value:
                errors.append(f"{path}.{key}: required field missing ({ann.__name__})")
        return
    try:  # a leaf: StrictStr, StrictInt, StrictBool, datetime, ...
        _adapter(ann).validate_python(value)
    except ValidationError as exc:
        errors.append(f"{path}: {value!r} is not {getattr(ann, '__name__', ann)}: {exc.errors()[0]['msg']}")
