"""End-to-end training on real Omniglot shards: learning, exact resume, MLflow tracking and the registry."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, run_module
from trainer.metrics import read_step_records


def smoke_args(run_dir: Path, raw: Path, shards: Path, *extra: str) -> list[str]:
    return [
        "experiment=smoke", f"run_dir={run_dir}", f"data.raw_dir={raw}", f"data.shards_dir={shards}",
        "data.download=false", f"tracking.root={run_dir.parent / 'mlruns'}", *extra,
    ]


def epochs(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "epochs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, omniglot_raw, omniglot_ns_shards) -> Path:
    """A 3-epoch smoke run (18 steps) tracked in its own embedded MLflow store."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    proc = run_module("launch.train", *smoke_args(run_dir, omniglot_raw, omniglot_ns_shards, "trainer.epochs=3",
                                                 "tracking.model_name=smoke-ns"), cwd=ROOT)
    (run_dir / "console.txt").write_text(proc.stdout + proc.stderr)  # what the user saw
    return run_dir


def test_the_log_reads_as_a_person_would(trained):
    err = (trained / "console.txt").read_text()
    assert "epoch 1/3: validation ELBO" in err and "nats/image (best" in err and "val vlb" not in err
    assert "epoch 3/3" in err and "epoch 0" not in err  # the bar counts as the log does
    assert "best validation ELBO" in err and "at epoch" in err
    assert "checkpoint step000000018 [" in err and "models:/smoke-ns/3" in err and "last" in err
    # MLflow's own chatter goes to the run's mlflow.log, not into the training output
    for noise in ("Downloading artifacts", "Type hint", "type hints", "Successfully registered",
                  "Validating input example", "View run"):
        assert noise not in err, noise
    assert "Validating input example" in (trained / "mlflow.log").read_text()


def test_pictures_of_the_run(trained):
    from PIL import Image

    figures = trained / "figures"
    assert sorted(p.name for p in figures.iterdir()) == [
        "learning_curve.png", "samples_epoch001.png", "samples_epoch002.png", "samples_epoch003.png"]
    with Image.open(figures / "samples_epoch003.png") as img:  # 3 panels: sets, reconstructions, samples
        assert img.size == (960, 360) and len(set(img.convert("L").getdata())) > 16
    with Image.open(figures / "learning_curve.png") as img:
        assert img.size == (640, 420)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{trained.parent / 'mlruns' / 'mlflow.db'}")
    run_id = json.loads((trained / "mlflow_run.json").read_text())["run_id"]
    logged = {a.path for a in client.list_artifacts(run_id, "figures")} | {a.path for a in client.list_artifacts(run_id)}
    assert {"figures/samples_epoch001.png", "figures/learning_curve.png", "train.log"} <= logged, logged


def test_training_reduces_validation_loss(trained):
    records = epochs(trained)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    val = [-r["val/vlb"] for r in records]  # validation loss = -ELBO per image, nats
    assert val[-1] < val[0] - 5.0, val
    steps = read_step_records(trained / "metrics.jsonl")
    assert sorted(steps) == list(range(18))
    assert all(r["img_per_s"] > 0 for r in steps.values())


def test_run_is_tracked_and_registered(trained):
    import mlflow
    from mlflow import MlflowClient

    from models.ns import NeuralStatistician

    mlflow.set_tracking_uri(f"sqlite:///{trained.parent / 'mlruns' / 'mlflow.db'}")
    client = MlflowClient()
    run_id = json.loads((trained / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "ns" and run.data.params["trainer.epochs"] == "3"
    assert len(client.get_metric_history(run_id, "train/loss")) == 18
    assert len(client.get_metric_history(run_id, "val/vlb")) == 3
    champion = client.get_model_version_by_alias("smoke-ns", "champion")
    latest = client.get_model_version_by_alias("smoke-ns", "last")
    assert champion.run_id == run_id and latest.run_id == run_id
    versions = client.search_model_versions("name='smoke-ns'")
    assert len(versions) == 3  # one per epoch-end checkpoint
    assert str(latest.version) == str(max(int(v.version) for v in versions))
    assert latest.tags["checkpoint"] == "step000000018"
    from trainer.registry.resolve import download_package
    from trainer.registry.package import read_package

    model, card = read_package(download_package("models:/smoke-ns@champion"))
    assert isinstance(model, NeuralStatistician) and model.cfg.hidden_dim == 32
    assert card.checkpoint["tag"] == champion.tags["checkpoint"]


def test_evaluation_job_reads_the_registered_model(trained, omniglot_raw, omniglot_ns_shards):
    run_module("launch.evaluate", "eval=elbo", "model_uri=models:/smoke-ns@champion", "eval.set_sizes=[5]",
               f"data.raw_dir={omniglot_raw}", f"data.shards_dir={omniglot_ns_shards}", f"run_dir={trained}",
               f"tracking.root={trained.parent / 'mlruns'}", cwd=ROOT)
    result = json.loads((trained / "eval_elbo.json").read_text())
    assert result["model_name"] == "smoke-ns" and result["model_version"]
    (row,) = result["rows"]
    assert row["set_size"] == 5 and row["vlb"] < 0 and row["kl_c"] >= 0


def test_resume_reproduces_the_uninterrupted_losses(tmp_path, omniglot_raw, omniglot_ns_shards):
    full, split = tmp_path / "full" / "run", tmp_path / "split" / "run"
    common = ("trainer.epochs=2", "tracking.enabled=false", "trainer.eval_test=false")
    run_module("launch.train", *smoke_args(full, omniglot_raw, omniglot_ns_shards, *common), cwd=ROOT)
    run_module("launch.train", *smoke_args(split, omniglot_raw, omniglot_ns_shards, *common,
                                           "trainer.max_steps=4"), cwd=ROOT)
    assert (split / "checkpoints" / "latest").read_text().strip() == "step000000004"
    assert not (split / "epochs.jsonl").exists()  # stopped inside the first epoch
    run_module("launch.train", *smoke_args(split, omniglot_raw, omniglot_ns_shards, *common,
                                           "trainer.resume=auto"), cwd=ROOT)
    a, b = read_step_records(full / "metrics.jsonl"), read_step_records(split / "metrics.jsonl")
    assert sorted(a) == sorted(b) == list(range(12))
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6, abs=1e-6), step
    assert epochs(split)[-1]["val/vlb"] == pytest.approx(epochs(full)[-1]["val/vlb"], rel=1e-6)


def test_missing_raw_data_fails_fast_naming_the_files(tmp_path):
    proc = run_module("launch.train", *smoke_args(tmp_path / "run", tmp_path / "no-raw", tmp_path / "shards"),
                      cwd=ROOT, check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "images_background.zip" in proc.stderr and str(tmp_path / "no-raw") in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_corrupt_shard_fails_fast_naming_the_shard(tmp_path, omniglot_raw, omniglot_ns_shards):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(omniglot_ns_shards, shards)
    victim = shards / "omniglot_ns" / "train-000003.tar"
    victim.write_bytes(victim.read_bytes()[:5000])  # truncated
    proc = run_module("launch.train", *smoke_args(tmp_path / "run", omniglot_raw, shards), cwd=ROOT, check=False,
                      timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "train-000003.tar" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_budget_ends_the_run_after_the_epoch_that_spent_it_and_holds_on_restart(tmp_path, omniglot_raw,
                                                                                   omniglot_ns_shards):
    # a budget every epoch overruns: the run ends, checkpointed, after its first epoch of three
    run_dir = tmp_path / "run"
    argv = smoke_args(run_dir, omniglot_raw, omniglot_ns_shards, "trainer.epochs=3", "tracking.enabled=false",
                      "trainer.eval_test=false", "trainer.checkpoint_every_epochs=2", "trainer.budget_minutes=1e-6")
    proc = run_module("launch.train", *argv, cwd=ROOT)
    said = proc.stdout + proc.stderr
    assert "trainer.budget_minutes=1e-06: 1 epochs took" in said and "the run ends here" in said
    (record,) = epochs(run_dir)
    assert record["epoch"] == 1 and record["elapsed_min"] > 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step000000006"
    run_module("launch.train", *argv, cwd=ROOT)  # resumed: the budget is still spent
    assert len(epochs(run_dir)) == 1 and (run_dir / "checkpoints" / "latest").read_text().strip() == "step000000006"
