"""trainer/run/rundir.py in-process: a restart's config against the run's saved one (check_restart)."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from trainer.run.errors import RunMismatch
from trainer.run.rundir import MAY_CHANGE, check_restart

MODEL = {"name": "ns", "hidden_dim": 32, "activation_checkpointing": "none"}
DATA = {"name": "omniglot_ns", "set_size": 5, "shards_dir": "/a", "batch_sets": 16}


@pytest.fixture
def run_dir(tmp_path):
    OmegaConf.save(OmegaConf.create({"model": MODEL, "data": DATA, "trainer": {"epochs": 3}}), tmp_path / "config.yaml")
    return tmp_path


def test_the_same_config_and_the_keys_that_may_change_are_accepted(run_dir):
    check_restart(run_dir, dict(MODEL), dict(DATA))
    moved = {**DATA, "shards_dir": "/elsewhere", "batch_sets": 8}  # more ranks, data on another volume
    check_restart(run_dir, {**MODEL, "activation_checkpointing": "blocks"}, moved)
    assert {"shards_dir", "batch_sets"} <= MAY_CHANGE["data"]


def test_a_changed_model_or_data_key_is_refused_naming_each(run_dir):
    with pytest.raises(RunMismatch) as err:
        check_restart(run_dir, {**MODEL, "hidden_dim": 16}, {**DATA, "set_size": 4, "augment": True})
    text = str(err.value)
    assert "model.hidden_dim: run has 32, this start 16" in text
    assert "data.set_size: run has 5, this start 4" in text
    assert "data.augment: run has None, this start True" in text  # a key the run did not have counts too
    assert "trainer.resume=never" in text and str(run_dir / "config.yaml") in text


def test_a_run_without_a_saved_config_has_nothing_to_compare(tmp_path):
    check_restart(tmp_path, {"hidden_dim": 1}, {})
