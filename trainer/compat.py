"""Every use of a library's private or undocumented API, in one place, each checked against the pinned version
in CHECKED_AGAINST (setup.py pins the same). tests/test_compat.py exercises each one against the installed
library, so an upgrade that moves or changes one of them fails there, by name, instead of deep in a run.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Callable, Dict, Iterator

CHECKED_AGAINST: Dict[str, str] = {"deepspeed": "0.19.8", "torch": "2.14.1", "mlflow": "3.17.2"}


# ------------------------------------------------------------------------------------------------ DeepSpeed
def skip_shm_comm_build() -> None:
    """DeepSpeed JIT-compiles its shared-memory comm op (~1 min) on first CPU use; gloo suffices for us.
    `deepspeed.comm.torch` is shadowed by the torch package in `import deepspeed.comm.torch as m`."""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def route_checkpoint_writes(engine, save: Callable[[object, str, bool], None]) -> None:
    """Make the engine's checkpoint engine write through `save(state, path, use_zip)` (the same bytes, through a
    Python file object, so a failed write's OS error names its file); DeepSpeed offers no hook for it."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None or getattr(ce, "_writes_through_python", False):
        return
    use_zip = getattr(ce, "zipfile_serialization", True)
    ce.save = lambda state_dict, path: save(state_dict, path, use_zip)
    ce._writes_through_python = True


@contextlib.contextmanager
def loading_universal_checkpoint(engine) -> Iterator[None]:
    """DeepSpeed reads `load_universal_checkpoint` from its config object while loading, and only there; a
    universal load at another world size or ZeRO stage switches it on for one `load_checkpoint`."""
    config = engine._config
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = False


# ------------------------------------------------------------------------------------------------ torch
def default_store():
    """The process group's rendezvous store (a roll call after a failed collective: who still answers)."""
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


# ------------------------------------------------------------------------------------------------ MLflow
@contextlib.contextmanager
def without_pythonmodel_hint_warning() -> Iterator[None]:
    """MLflow checks every PythonModel subclass's `predict` for type hints when the class is defined and warns when
    there are none, under its own `warnings.catch_warnings()` (so no filter of ours applies); ours has none on
    purpose (a signature describes the model). The warning is dropped while such a class is defined."""
    import warnings

    show = warnings.showwarning
    warnings.showwarning = lambda message, *args, **kwargs: (
        None if "type hints to the `predict` method" in str(message) else show(message, *args, **kwargs))
    try:
        yield
    finally:
        warnings.showwarning = show


class PyfuncWithoutServingCheck:
    """mlflow.pyfunc as the flavor of `Model.log`, with its serving-input check off. That check loads the model
    and runs a prediction in the logging thread, drawing from the training process's global RNG (so a run
    would no longer reproduce itself after a resume); `Model.log` reads the switch from its keyword arguments
    but pyfunc's save_model refuses it, hence this pass-through (the serving test runs the real server)."""

    __name__ = "mlflow.pyfunc"

    @staticmethod
    def save_model(validate_serving_input: bool = True, **kwargs):
        import mlflow

        return mlflow.pyfunc.save_model(**kwargs)
