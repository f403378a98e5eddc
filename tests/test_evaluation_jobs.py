"""Every evaluation job on a smoke model read from the registry: tables and non-empty PNG figures in MLflow, in a
run tagged with the model version and nested under the training run; the marginal NLL acceptance checks; and
fail-fast errors for a missing model, alias, store, Omniglot shards or MNIST files."""
from __future__ import annotations

import json
from dataclasses import replace
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import ROOT, SHARED_DATA, run_module
from launch.app import CONFIG_DIR
from trainer.config import load_config
from trainer.evaluation import jobs
from trainer.evaluation.common import EvalError
from trainer.run.errors import Refused
from trainer.registry.mlflow_model import MAX_VERSION_TAGS

MNIST = SHARED_DATA / "mnist"
MODEL = "eval-smoke"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, omniglot_raw, omniglot_ns_shards):
    """One NS-LAG smoke model (1 epoch of 4 batches), trained once for the module into its own sqlite store."""
    root = tmp_path_factory.mktemp("eval_smoke")
    run_dir = root / "train"
    run_module("launch.train", "experiment=smoke", "model.name=ns_lag", "model.aggregation=lag", "trainer.epochs=1",
               "data.limit_batches=4", f"run_dir={run_dir}", f"data.raw_dir={omniglot_raw}",
               f"data.shards_dir={omniglot_ns_shards}", "data.download=false", f"tracking.root={root / 'mlruns'}",
               f"tracking.model_name={MODEL}", cwd=ROOT)
    training_run = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    return SimpleNamespace(root=root, raw=omniglot_raw, shards=omniglot_ns_shards, store=root / "mlruns",
                           training_run=training_run, uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")


def config(smoke, out: Path, job: str, *overrides: str):
    args = [f"eval={job}", f"model_uri=models:/{MODEL}@champion", f"run_dir={out}", f"data.raw_dir={smoke.raw}",
            f"data.shards_dir={smoke.shards}", f"tracking.root={smoke.store}", f"eval.mnist_dir={MNIST}",
            "eval.batch_sets=4", "eval.max_batches=1", *overrides]
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return load_config(compose("config", overrides=args))


def evaluate(smoke, tmp_path, job, *overrides):
    cfg = config(smoke, tmp_path, job, *overrides)
    rows = jobs.run_job(cfg, torch.device("cpu"))
    summary = json.loads((tmp_path / f"eval_{job}.json").read_text())
    assert summary["rows"] == json.loads(json.dumps(summary["rows"]))  # strict JSON (NaN written as null)
    return rows, summary


def check_logged(smoke, summary, job, figures, tmp_path):
    """The eval run: tags naming the model version and training run, nested under it, with table and figures."""
    import mlflow
    from matplotlib.image import imread
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=smoke.uri)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    run = client.get_run(summary["eval_run_id"])
    tags = run.data.tags
    assert tags["model_name"] == MODEL and tags["model_version"] == str(champion.version)
    assert tags["training_run_id"] == smoke.training_run == champion.run_id
    assert tags["mlflow.parentRunId"] == smoke.training_run and tags["eval_job"] == job
    assert run.data.params["eval.job"] == job and run.info.status == "FINISHED"
    version_tags = client.get_model_version(MODEL, str(champion.version)).tags
    assert len(version_tags) <= MAX_VERSION_TAGS and f"eval.{job}" not in version_tags  # headlines only
    artifacts = {a.path: a.file_size for a in client.list_artifacts(run.info.run_id)}
    assert artifacts.get(f"{job}.json", 0) > 0 and artifacts.get(f"{job}.csv", 0) > 0
    for name in figures:
        assert name in artifacts, (name, sorted(artifacts))
        local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=name,
                                                    dst_path=str(tmp_path / "dl"), tracking_uri=smoke.uri)
        data = Path(local).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        assert imread(local).std() > 0.01, f"{name} is blank"
    table = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path=f"{job}.json", dst_path=str(tmp_path / "dl"),
        tracking_uri=smoke.uri)).read_text())
    assert table == summary["rows"]
    return run


def test_marginal_nll_is_below_the_nelbo_and_tightens_with_k(smoke, tmp_path):
    rows, summary = evaluate(smoke, tmp_path, "marginal", "eval.set_sizes=[2]", "eval.batch_sets=2",
                             "eval.importance_samples=1000", "eval.k_values=[1,10,100]", "eval.chunk=500")
    (row,) = rows
    assert row["importance_samples"] == 1000 and row["sets"] == 2 and row["set_size"] == 2
    assert row["nll"] <= row["nelbo"], row
    assert row["nll_se"] > 0 and row["kl_c"] >= 0 and row["kl_z"] >= 0
    by_k = json.loads((tmp_path / "eval_marginal" / "marginal_by_k.json").read_text())
    assert [r["k"] for r in by_k] == [1, 10, 100, 1000]
    nll = [r["nll"] for r in by_k]
    assert all(a >= b for a, b in zip(nll, nll[1:])), nll
    assert nll[-1] == row["nll"] and nll[0] == pytest.approx(row["neg_log_w_mean"])
    run = check_logged(smoke, summary, "marginal", ["nll_vs_k.png"], tmp_path)
    assert run.data.metrics["eval/marginal/nll_S2"] == pytest.approx(row["nll"])  # each metric once


def test_elbo_terms_per_set_size(smoke, tmp_path):
    rows, summary = evaluate(smoke, tmp_path, "elbo", "eval.set_sizes=[2,5]")
    assert [r["set_size"] for r in rows] == [2, 5]
    for r in rows:
        assert r["vlb"] == pytest.approx(r["logpx"] - r["kl_z"] - r["kl_c"], rel=1e-5)
        assert r["kl_z"] == pytest.approx(sum(r[f"kl_z_layer{i}"] for i in range(3)), rel=1e-5)
    check_logged(smoke, summary, "elbo", [], tmp_path)


def test_cardinality_covers_train_and_test_at_every_set_size(smoke, tmp_path):
    rows, summary = evaluate(smoke, tmp_path, "cardinality")
    assert [(r["split"], r["set_size"]) for r in rows] == [(s, n) for s in ("train", "test") for n in (1, 2, 5, 10, 20)]
    for r in rows:
        assert r["vlb"] == pytest.approx(r["logpx"] - r["kl_z"] - r["kl_c"], rel=1e-5)
        assert r["vlb"] < 0
    check_logged(smoke, summary, "cardinality", ["elbo_vs_set_size.png"], tmp_path)


def test_kl_layer_reports_every_layer(smoke, tmp_path):
    rows, summary = evaluate(smoke, tmp_path, "kl_layer")
    assert [(r["latent"], r["layer"]) for r in rows] == [("z", 0), ("z", 1), ("z", 2), ("c", 0)]  # NS: 3 z, 1 c
    assert all(r["kl"] >= 0 and r["set_size"] == 5 for r in rows)
    check_logged(smoke, summary, "kl_layer", ["kl_per_layer.png"], tmp_path)


def test_transfer_to_mnist_double_and_triple(smoke, tmp_path):
    rows, summary = evaluate(smoke, tmp_path, "transfer", "eval.importance_samples=10", "eval.batch_sets=2")
    assert [(r["dataset"], r["set_size"]) for r in rows] == [
        (d, s) for d in ("mnist", "doublemnist", "triplemnist") for s in (2, 5, 10, 20)]
    for r in rows:
        assert r["sets"] == 2 and r["importance_samples"] == 10
        assert 0 < r["nll"] < 2000 and np.isfinite(r["nelbo"])
    check_logged(smoke, summary, "transfer", ["transfer.png"], tmp_path)


def test_fewshot_accuracy_interval_and_confusion(smoke, tmp_path):
    rows, summary = evaluate(smoke, tmp_path, "fewshot", "eval.queries=30", "eval.episodes=3", "eval.batch_sets=10")
    assert [r["rule"] for r in rows] == ["kl", "elbo_gain"]
    for r in rows:
        assert (r["ways"], r["shots"], r["queries"], r["episodes"]) == (10, 5, 30, 3)
        assert r["ci95_low"] <= r["accuracy"] <= r["ci95_high"] and r["accuracy"] == r["correct"] / 30
        assert len(r["episode_accuracies"]) == 3
        confusion = json.loads((tmp_path / "eval_fewshot" / f"confusion_{r['rule']}.json").read_text())
        matrix = np.array(confusion["matrix"])
        assert matrix.shape == (10, 10) and matrix.sum() == 30 and np.trace(matrix) == r["correct"]
    preds = json.loads((tmp_path / "eval_fewshot" / "fewshot_predictions.json").read_text())
    assert len(preds) == 30 and len({p["query"] for p in preds}) == 30
    check_logged(smoke, summary, "fewshot", ["confusion.png"], tmp_path)


def test_samples_for_omniglot_and_mnist_sets(smoke, tmp_path):
    rows, summary = evaluate(smoke, tmp_path, "samples", "eval.num_sets=3", "eval.refine_iterations=2")
    kinds = ["input sets", "reconstructions", "conditional", "refined (2 it.)", "unconditional"]
    assert [(r["source"], r["kind"]) for r in rows] == [(s, k) for s in ("omniglot", "mnist") for k in kinds]
    assert all(r["status"] == "ok" and 0 <= r["mean_intensity"] <= 1 for r in rows)
    check_logged(smoke, summary, "samples", ["samples_omniglot.png", "samples_mnist.png", "refine_omniglot.png",
                                              "refine_mnist.png"], tmp_path)


def test_attention_weights_per_head_and_member(smoke, tmp_path):
    rows, summary = evaluate(smoke, tmp_path, "attention", "eval.num_sets=3")
    assert len(rows) == 3 * 4 * 5  # sets x heads x members, one attentive layer in NS-LAG
    for i in range(3):
        for h in range(4):
            assert sum(r["weight"] for r in rows if r["set"] == i and r["head"] == h) == pytest.approx(1.0, abs=1e-5)
    check_logged(smoke, summary, "attention", ["attention.png"], tmp_path)


# ------------------------------------------------------------------------------------------------ fail fast
@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a job gets as far as loading the model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the missing piece was reported")

    monkeypatch.setattr(jobs, "read_package", refuse)
    monkeypatch.setattr(jobs, "fetch_package", refuse)


@pytest.mark.parametrize("job, override, needles", [
    ("marginal", "model_uri=models:/no-such-model@champion", ["no registered model 'no-such-model'", MODEL]),
    ("marginal", f"model_uri=models:/{MODEL}@nope", ["no alias 'nope'", "champion", "last"]),
    ("marginal", f"model_uri=models:/{MODEL}/999", ["no version '999'"]),
    ("marginal", "model_uri=", ["model_uri is required"]),
    ("transfer", "eval.mnist_dir={tmp}/mnist", ["MNIST is not available", "{tmp}/mnist/t10k-images-idx3-ubyte.gz"]),
    ("fewshot", "eval.mnist_dir={tmp}/mnist", ["{tmp}/mnist/train-images-idx3-ubyte.gz"]),
    ("kl_layer", "data.shards_dir={tmp}/shards", ["omniglot_ns is not prepared", "{tmp}/shards/omniglot_ns",
                                                  "python -m launch.prepare data=omniglot_ns"]),
    ("elbo", "tracking.root={tmp}/mlruns", ["no MLflow store at {tmp}/mlruns/mlflow.db"]),
])
def test_missing_pieces_fail_before_loading(smoke, tmp_path, no_loading, job, override, needles):
    cfg = config(smoke, tmp_path / "out", job, override.format(tmp=tmp_path))
    with pytest.raises(Refused) as err:  # a missing model, store or dataset: each its own exit code
        jobs.run_job(cfg, torch.device("cpu"))
    for needle in needles:
        assert needle.format(tmp=tmp_path) in str(err.value), str(err.value)
    assert not (tmp_path / "out" / f"eval_{job}.json").exists()
    assert not (tmp_path / "mlruns").exists()  # a missing store is reported, never created


def test_cli_reports_a_missing_model_at_once(smoke, tmp_path):
    start = time.monotonic()
    proc = run_module("launch.evaluate", "eval=marginal", "model_uri=models:/no-such-model@champion",
                      f"run_dir={tmp_path}", f"data.shards_dir={tmp_path / 'no-shards'}",
                      f"tracking.root={smoke.store}", cwd=ROOT, check=False)
    assert proc.returncode == 9, proc.stderr[-3000:]  # trainer/run/exit_codes.py MODEL_NOT_FOUND
    assert "model error: model_uri 'models:/no-such-model@champion': no registered model" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - start < 120  # no data read, no model loaded (it is the interpreter start-up)


def test_another_dataset_is_refused_unless_allowed(smoke, tmp_path, no_loading):
    """omniglot_back_eval splits the characters differently from omniglot_ns: its test split holds characters
    the model trained on. Refused from the version's tag, before any data or the model is touched."""
    cfg = config(smoke, tmp_path / "out", "elbo", "data=omniglot_back_eval", f"data.shards_dir={tmp_path / 'none'}")
    with pytest.raises(EvalError, match="trained on 'omniglot_ns' but data=omniglot_back_eval"):
        jobs.run_job(cfg, torch.device("cpu"))
    allowed = config(smoke, tmp_path / "out", "elbo", "data=omniglot_back_eval", "eval.allow_other_dataset=true",
                     f"data.shards_dir={tmp_path / 'none'}")
    with pytest.raises(EvalError, match="omniglot_back_eval is not prepared"):  # past the dataset check
        jobs.run_job(allowed, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ packages by path
def test_an_exported_package_evaluates_by_path_like_its_registered_version(smoke, tmp_path):
    """launch.export of the training run -> a directory that `model_uri=<dir>` evaluates: the same numbers as the
    registry's champion (the same checkpoint), with no registry version attached."""
    package = tmp_path / "package"
    run_module("launch.export", str(smoke.root / "train"), "--out", str(package), cwd=ROOT)
    by_path, summary = evaluate(smoke, tmp_path / "by_path", "elbo", f"model_uri={package}")
    registered, _ = evaluate(smoke, tmp_path / "registered", "elbo")
    assert by_path == registered
    assert summary["model_uri"] == str(package) and "model_version" not in summary
    # a package needs no registry: against a store that does not exist yet, the job runs and creates it to log
    fresh = tmp_path / "fresh_store"
    again, summary = evaluate(smoke, tmp_path / "fresh", "elbo", f"model_uri={package}", f"tracking.root={fresh}")
    assert again == registered and (fresh / "mlflow.db").is_file() and summary["eval_run_id"]


# ------------------------------------------------------------------------------------------------ progress
def test_work_counts_are_the_sets_the_loaders_yield(omniglot_ns_shards, omniglot_raw):
    """Announced counts = what iterating yields: a partial last batch (test), a dropped one (train), MNIST sets."""
    from data_pipeline.config import DataConfig
    from data_pipeline.mnist import TransferSets
    from data_pipeline.sets import SetLoader
    from trainer.evaluation.progress import loader_work

    data = DataConfig(name="omniglot_ns", raw_dir=str(omniglot_raw), shards_dir=str(omniglot_ns_shards),
                      download=False, augment=False, set_size=5, set_size_test=5, batch_sets=100)
    for split in ("test", "val"):
        loader = SetLoader(data, split)
        work = loader_work(loader, f"{split} classes")
        yielded = [x.shape for x in loader]
        assert work.sets == sum(s[0] for s in yielded) and work.set_size == 5 == yielded[0][1]
    test = loader_work(SetLoader(data, "test"), "test classes")
    assert (test.classes, test.sets, test.images) == (423, 423 * 4, 423 * 20)  # 20 images per class, all used
    # a limited pass (eval.max_batches) is a seeded random subset of the test sets, not its first classes
    limited = [SetLoader(replace(data, batch_sets=10, limit_batches=2), "test") for _ in range(2)]
    seen = []
    for loader in limited:
        classes = []
        for _ in loader:
            classes += [int(c) for c in loader.last_batch_classes]
        seen.append(classes)
    assert seen[0] == seen[1] and len(seen[0]) == 20
    assert seen[0] != sorted(seen[0]) and max(seen[0]) > limited[0].class_indices[40]
    mnist = TransferSets("doublemnist", MNIST, "test", 5, 64, 3, seed=0)
    work = loader_work(mnist, "doublemnist test classes")
    assert work.sets == sum(x.shape[0] for x in mnist) == 3 * 64 < work.of_sets


def test_marginal_cli_announces_its_work_and_shows_a_progress_bar(smoke, tmp_path):
    import re

    test_classes = json.loads((smoke.shards / "omniglot_ns" / "manifest.json").read_text())["splits"]["test"]["classes"]
    proc = run_module("launch.evaluate", "eval=marginal", f"model_uri=models:/{MODEL}@champion", f"run_dir={tmp_path}",
                      f"data.raw_dir={smoke.raw}", f"data.shards_dir={smoke.shards}", f"tracking.root={smoke.store}",
                      "eval.set_sizes=[2]", "eval.batch_sets=3", "eval.max_batches=2", "eval.importance_samples=20",
                      "eval.chunk=8", cwd=ROOT)
    # 2 batches of 3 sets of 2: 6 sets, 12 images, x20 importance samples, 8 per forward pass
    assert (f"eval=marginal: {test_classes} test classes -> 6 sets x 2 images = 12 images (a seeded random subset of its "
            f"{test_classes * 10} sets: eval.max_batches), K=20 importance samples each (240 forward images) in chunks of 8"
            ) in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "eval_marginal.json").read_text())["rows"][0]["sets"] == 6
    # tqdm: description, percentage, count of total, elapsed<remaining
    bars = re.findall(r"marginal S=2 K=20: +(\d+)%\|[^|]*\| (\d+)/6 \[\d\d:\d\d<\d\d:\d\d", proc.stderr)
    assert bars and bars[-1] == ("100", "6"), proc.stderr[-2000:]
