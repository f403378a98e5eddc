"""A registered model put to use: few-shot generation from a user's set (`generation`, behind `launch.generate`
and the server), the MLflow pyfunc that `mlflow models serve` runs (`pyfunc`), and the code file stored with every
registered version (`model_code`).

`from trainer.serving import FewShotGenerator` is what every registered version's stored code runs, so the name
stays importable from here; it is resolved on first use so that `launch.generate` does not import MLflow.
"""


def __getattr__(name: str):
    if name == "FewShotGenerator":
        from trainer.serving.pyfunc import FewShotGenerator

        return FewShotGenerator
    raise AttributeError(f"module 'trainer.serving' has no attribute {name!r}")
