"""Everything that talks to MLflow or reads a registered model: the tracker of a training run (`tracking`), the
model package and its card (`package`: safetensors weights + a JSON card, read by refusing first), the MLflow
side of a registered version (`mlflow_model`: logged model, signature, descriptions, evaluation tags), and
resolving a model URI to a package on disk (`resolve`)."""
