"""Which MLflow store a command uses, as MLflow users expect: tracking.uri given explicitly, then
MLFLOW_TRACKING_URI, then the local store; and MLflow's own export of the URI does not leak into later choices."""
from __future__ import annotations

import os

from trainer.config import TrackingConfig
from trainer.registry import store


def test_explicit_then_the_variable_then_the_local_default(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert store.store_choice(TrackingConfig(uri="http://given:5000")) == ("http://given:5000", "tracking.uri")
    assert store.describe_store(TrackingConfig()) == "http://tracking.example:5000 (from MLFLOW_TRACKING_URI)"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri, why = store.store_choice(TrackingConfig(root=str(tmp_path / "mlruns")))
    assert uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db" and why == store.LOCAL_DEFAULT
    assert not (tmp_path / "mlruns").exists()  # choosing creates nothing; tracking_uri() does, for the sqlite file
    store.tracking_uri(TrackingConfig(root=str(tmp_path / "mlruns")))
    assert (tmp_path / "mlruns").is_dir()


def test_pointing_mlflow_at_a_store_keeps_the_users_variable(monkeypatch, tmp_path):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store.point_mlflow_at(f"sqlite:///{tmp_path}/a.db")
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/a.db" and "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://users:5000")
    store.point_mlflow_at(f"sqlite:///{tmp_path}/b.db")
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://users:5000"
    mlflow.set_tracking_uri(None)


def test_run_links_open_the_training_view_on_a_server_only():
    assert store.run_link("http://127.0.0.1:5000/", "3", "abc") == \
        "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert store.run_link("sqlite:///mlruns/mlflow.db", "3", "abc") == ""


def test_the_summary_shows_each_alias_where_it_points_now(tmp_path):
    from concurrent.futures import Future

    from trainer.run.summary import Registration, RunSummary

    def version(n: int) -> Future:
        f = Future()
        f.set_result(str(n))
        return f

    regs = [Registration("step000000400", ("champion",), version(4)),
            Registration("step000000500", ("champion", "last"), version(5))]
    lines = RunSummary(tmp_path, 5, 5, -120.0, 5, "demo", registrations=regs,
                       link="http://h:5000/#/experiments/1/runs/r?workflowType=machine_learning").lines()
    assert "checkpoint step000000400: models:/demo/4" in lines
    assert "checkpoint step000000500 [champion, last]: models:/demo/5" in lines
    assert sum("champion" in line for line in lines) == 1
    assert "MLflow run http://h:5000/#/experiments/1/runs/r?workflowType=machine_learning" in lines
