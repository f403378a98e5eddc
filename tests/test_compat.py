"""trainer/compat.py against the installed libraries: each private API we lean on still exists and behaves as
we use it; an upgrade that changes one fails here, by name."""
from __future__ import annotations

import inspect
from importlib import metadata

import pytest
import torch

from trainer import compat


def test_the_installed_libraries_are_the_versions_compat_was_checked_against():
    installed = {name: metadata.version(name) for name in compat.CHECKED_AGAINST}
    assert installed == compat.CHECKED_AGAINST, (
        "a library changed under trainer/compat.py: recheck each use there against it, then update CHECKED_AGAINST")


def test_deepspeed_shm_comm_build_is_the_hook_we_replace():
    import importlib

    module = importlib.import_module("deepspeed.comm.torch")
    assert callable(module.build_shm_op)  # DeepSpeed still calls this name before building the op
    source = inspect.getsource(module)
    assert "build_shm_op()" in source
    compat.skip_shm_comm_build()
    assert module.build_shm_op() is None


def test_deepspeed_checkpoint_engine_writes_through_save_and_reads_its_flags():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.config import DeepSpeedConfig

    assert list(inspect.signature(TorchCheckpointEngine.save).parameters) == ["self", "state_dict", "path"]
    assert "zipfile_serialization" in inspect.getsource(TorchCheckpointEngine)
    assert "self.load_universal_checkpoint" in inspect.getsource(DeepSpeedConfig)

    written = []

    class Engine:
        checkpoint_engine = TorchCheckpointEngine()

    engine = Engine()
    use_zip = engine.checkpoint_engine.zipfile_serialization  # what DeepSpeed's own save would pass to torch.save
    compat.route_checkpoint_writes(engine, lambda state, path, use_zip: written.append((state, path, use_zip)))
    compat.route_checkpoint_writes(engine, lambda *a: pytest.fail("routed twice"))
    engine.checkpoint_engine.save({"a": 1}, "/x/y.pt")
    assert written == [({"a": 1}, "/x/y.pt", use_zip)]


def test_universal_checkpoint_switch_is_set_only_while_loading():
    class Config:
        load_universal_checkpoint = False

    engine = type("Engine", (), {"_config": Config()})()
    with compat.loading_universal_checkpoint(engine):
        assert engine._config.load_universal_checkpoint is True
    assert engine._config.load_universal_checkpoint is False


def test_torch_default_store_is_the_process_groups_store(tmp_path):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        compat.default_store().set("k", "v")
        assert compat.default_store().get("k") == b"v"
    finally:
        dist.destroy_process_group()


def test_mlflow_pyfunc_still_refuses_the_switch_that_model_log_passes():
    import mlflow
    from mlflow.models import Model

    assert "validate_serving_input" not in inspect.signature(mlflow.pyfunc.save_model).parameters
    assert "validate_serving_input" in inspect.getsource(Model.log)
    assert callable(compat.PyfuncWithoutServingCheck.save_model)
    assert torch.__version__.startswith(compat.CHECKED_AGAINST["torch"])
