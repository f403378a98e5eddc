"""Which system metrics a process samples and under which name (the real-server check of the metrics themselves is
tests/test_mlflow_server.py::test_mlflow_tracking_uri_alone_sends_training_evaluation_and_generation_to_the_server)."""
from __future__ import annotations

import pytest

from trainer.config import TrackingConfig
from trainer.registry import system_metrics


@pytest.mark.parametrize("env, name", [
    ({}, None),  # one process
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "0"}, None),  # one node of 4 processes
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"}, "node1"),  # torchrun, second node
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "NODE_RANK": "1"}, "node1"),  # deepspeed hostfile
])
def test_each_node_of_a_multi_node_job_is_named(monkeypatch, env, name):
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert system_metrics.node_name() == name


@pytest.mark.parametrize("cfg, variable, wanted", [
    (TrackingConfig(), None, True),
    (TrackingConfig(system_metrics=False), None, False),
    (TrackingConfig(), "false", False),  # MLflow's own switch
    (TrackingConfig(enabled=False), None, False),
])
def test_on_by_default_with_two_switches(monkeypatch, cfg, variable, wanted):
    monkeypatch.delenv(system_metrics.ENV_SWITCH, raising=False)
    if variable is not None:
        monkeypatch.setenv(system_metrics.ENV_SWITCH, variable)
    assert system_metrics.wanted(cfg) is wanted


def test_the_interval_must_be_positive():
    from trainer.run.errors import ConfigError

    with pytest.raises(ConfigError, match="system_metrics_interval_s"):
        TrackingConfig(system_metrics_interval_s=0)
