"""The served model (`mlflow models serve -m models:/<name>@<alias>`): a set of images in, new members and the
set's per-image ELBO out. MLflow loads it as a "models from code" pyfunc: trainer/serving/model_code.py, stored with
the model, only imports this module of the installed package; the weights are the package's safetensors file.

Request (signature of trainer/registry/mlflow_model.py): `{"inputs": <(S, C, H, W) floats in [0, 1], ink = 1>,
"params": {"samples": N, "mode": "conditional" | "refined", "iterations": 10, "seed": 0}}`.
Response: `{"predictions": {"samples": <(N, C, H, W)>, "elbo": <(S,)>}}`. Bad values are answered with HTTP 400
and a message (docs/serving.md).
"""
from __future__ import annotations

import threading
from pathlib import Path

import mlflow
import numpy as np
import torch

from trainer import compat


def _bad_request(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


with compat.without_pythonmodel_hint_warning():  # defined where MLflow checks it
    class FewShotGenerator(mlflow.pyfunc.PythonModel):
        def load_context(self, context) -> None:
            from trainer.registry.package import read_package

            self.package = Path(context.artifacts["weights"]).parent
            self.model, self.card = read_package(self.package)
            self._per_image = {}  # set size -> forward FLOPs per image (the cost of a request, generation.py)
            self._pool = None
            self._pool_lock = threading.Lock()

        def start_workers(self):
            """The generation processes (trainer/serving/workers.py), started once; launch.serve starts them
            before it listens, `mlflow models serve` at the first request."""
            from trainer.serving.workers import GenerationPool, pool_settings

            with self._pool_lock:
                if self._pool is None:
                    self._pool = GenerationPool(self.package, **pool_settings())
            return self._pool

        # no type hints: MLflow reads them as a schema it does not support and warns at every log and load
        def predict(self, context, model_input, params=None):
            import os

            from trainer.serving.generation import (MAX_REQUEST_FLOPS, GenerationError, check_cost, check_request,
                                                    flops_per_image)
            from trainer.serving.workers import request_timeout_s

            p = {"samples": 8, "mode": "conditional", "iterations": 10, "seed": 0, **(params or {})}
            x = self._check_images(model_input)
            try:
                samples, iterations, seed = int(p["samples"]), int(p["iterations"]), int(p["seed"])
            except (TypeError, ValueError) as exc:
                raise _bad_request(f"samples, iterations and seed must be integers ({exc})") from exc
            mode = str(p["mode"])
            limit = float(os.environ.get("SCHA_SERVE_MAX_REQUEST_FLOPS", MAX_REQUEST_FLOPS))
            try:
                check_request(self.model, samples, mode, iterations)
                s = x.shape[0]
                if s not in self._per_image:
                    self._per_image[s] = flops_per_image(self.model, x)
                check_cost(self._per_image[s], s, samples, mode, iterations, limit)
                out, elbo = self.start_workers().run(
                    {"x": x.numpy(), "samples": samples, "mode": mode, "iterations": iterations, "seed": seed},
                    request_timeout_s())
            except GenerationError as exc:
                raise _bad_request(str(exc)) from exc
            return {"samples": out.astype(np.float32), "elbo": elbo.astype(np.float32)}

        def _check_images(self, model_input) -> torch.Tensor:
            spec = self.card.inputs
            if isinstance(model_input, dict):
                model_input = model_input.get("images")
            try:
                x = np.asarray(model_input, dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise _bad_request(f"inputs must be an array of images, got {type(model_input).__name__}") from exc
            want = (spec.channels, spec.size, spec.size)
            if x.ndim != 4 or x.shape[1:] != want:
                raise _bad_request(f"images must have shape (S, {', '.join(map(str, want))}) for this model, got "
                                   f"{tuple(x.shape)}")
            if not 1 <= x.shape[0] <= spec.max_set_size:
                raise _bad_request(f"a set of 1..{spec.max_set_size} images, got {x.shape[0]}")
            if not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0:
                raise _bad_request("pixel values must be finite and in [0, 1] (ink = 1)")
            return torch.from_numpy(x)
