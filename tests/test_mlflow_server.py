"""The registered model as a product, against a real `mlflow server` (sqlite backend, 127.0.0.1, one worker):
a smoke model is trained over HTTP and registered; its model card is read back through MlflowClient; an
evaluation job loads it by alias over HTTP and puts its numbers on the version; `launch.generate` makes new
members of a set of real Omniglot PNGs; `mlflow models serve` answers /invocations; a version whose weights are a
malicious pickle is refused without running it."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, free_port, run_module, start_mlflow_server, start_process, stop_process, wait_http
from trainer.registry.mlflow_model import MAX_VERSION_TAGS

MODEL = "server-smoke"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free 127.0.0.1 port, ready once /health answers; stopped (its process group) after."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("server")
    proc = start_mlflow_server(workdir, port)
    try:
        yield f"http://127.0.0.1:{port}", workdir
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def trained(mlflow_server, tmp_path_factory, omniglot_raw, omniglot_ns_shards):
    url, server_dir = mlflow_server
    common = [f"data.raw_dir={omniglot_raw}", f"data.shards_dir={omniglot_ns_shards}", f"tracking.uri={url}"]
    train_dir = tmp_path_factory.mktemp("train") / "run"
    # epochs 2 and 3 are checkpointed and registered, epoch 1 is not. The store comes from MLflow's own variable
    # alone, as an MLflow user sets it (the commands after it give tracking.uri=, which would win over it).
    run_module("launch.train", "experiment=smoke", "trainer.epochs=3", "trainer.checkpoint_every_epochs=2",
               "data.limit_batches=2", f"tracking.model_name={MODEL}", "data.download=false", f"run_dir={train_dir}",
               "tracking.system_metrics_interval_s=1", *common[:2], cwd=ROOT, env={"MLFLOW_TRACKING_URI": url})
    return {"url": url, "server_dir": server_dir, "train_dir": train_dir, "common": common}


def test_mlflow_tracking_uri_alone_sends_training_evaluation_and_generation_to_the_server(trained, user_images,
                                                                                          tmp_path):
    from mlflow import MlflowClient

    url, by_variable = trained["url"], {"MLFLOW_TRACKING_URI": trained["url"]}
    said = f"MLflow store {url} (from MLFLOW_TRACKING_URI)"
    assert said in (trained["train_dir"] / "train.log").read_text()
    eval_dir = tmp_path / "eval"
    proc = run_module("launch.evaluate", "eval=elbo", f"model_uri=models:/{MODEL}@champion", f"run_dir={eval_dir}",
                      "eval.batch_sets=4", "eval.max_batches=1", "eval.set_sizes=[5]", *trained["common"][:2],
                      cwd=tmp_path, env=by_variable)
    assert said in proc.stdout  # the job's log lines (Hydra's console handler)
    client = MlflowClient(tracking_uri=url)
    summary = json.loads((eval_dir / "eval_elbo.json").read_text())
    evaluation = client.get_run(summary["eval_run_id"])
    assert evaluation.info.status == "FINISHED"
    # MLflow's system metrics on both runs (the run page's System metrics tab), sampled every second in training
    training = client.get_run(json.loads((trained["train_dir"] / "mlflow_run.json").read_text())["run_id"])
    for run in (training, evaluation):
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                "system/disk_usage_percentage", "system/network_receive_megabytes"} <= set(run.data.metrics), run
    assert len(client.get_metric_history(training.info.run_id, "system/cpu_utilization_percentage")) >= 2
    proc = run_module("launch.generate", f"model_uri=models:/{MODEL}@champion", f"images={user_images}", "samples=2",
                      f"out={tmp_path / 'gen'}", cwd=tmp_path, env=by_variable)
    assert said in proc.stderr and len(json.loads(proc.stdout.strip().splitlines()[-1])["sample_files"]) == 2
    assert not (tmp_path / "mlruns").exists()  # nothing fell back to a local store in the working directory


@pytest.fixture(scope="module")
def user_images(tmp_path_factory, omniglot_raw) -> Path:
    """Five real Omniglot PNGs (105x105, black ink on white) of one evaluation-alphabet character."""
    folder = tmp_path_factory.mktemp("user_images")
    with zipfile.ZipFile(omniglot_raw / "images_evaluation.zip") as z:
        names = sorted(n for n in z.namelist() if "/Angelic/character01/" in n and n.endswith(".png"))[:5]
        for n in names:
            (folder / Path(n).name).write_bytes(z.read(n))
    return folder


def test_model_card_in_mlflow(trained):
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import get_model_info

    from trainer.registry.mlflow_model import version_model_id

    url = trained["url"]
    mlflow.set_tracking_uri(url)
    client = MlflowClient(tracking_uri=url)
    epochs = [json.loads(line) for line in (trained["train_dir"] / "epochs.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["epoch"] in (2, 3)]  # the checkpointed ones
    training_run = json.loads((trained["train_dir"] / "mlflow_run.json").read_text())["run_id"]
    versions = sorted(client.search_model_versions(f"name='{MODEL}'"), key=lambda v: int(v.version))
    assert len(versions) == 2  # one per checkpoint
    for mv, epoch in zip(versions, epochs):
        assert mv.run_id == training_run
        # the version's own numbers: its logged model carries the validation ELBO of its checkpoint
        logged = client.get_logged_model(version_model_id(mv))
        linked = {m.key: m.value for m in logged.metrics}
        assert linked["val/vlb"] == pytest.approx(epoch["val/vlb"], rel=1e-12)
        assert not any(k.startswith("train/") for k in linked)
        assert f"{epoch['val/vlb']:.3f}" in mv.description and f"step {epoch['step']}" in mv.description
        assert "NS (model `ns`)" in mv.description and "omniglot_ns" in mv.description
        assert mv.tags["checkpoint"] == f"step{epoch['step']:09d}" and mv.tags["dataset"] == "omniglot_ns"
        # linked both ways, as the UI reads them: the version's source names the logged model, the logged model
        # lists the version; its description is the version's
        assert mv.source == f"models:/{logged.model_id}"
        assert {"name": MODEL, "version": mv.version} in json.loads(logged.tags["mlflow.modelVersions"])
        assert logged.tags["mlflow.note.content"] == mv.description
    champion = client.get_model_version_by_alias(MODEL, "champion")
    # the best of the registered versions (an unregistered epoch's ELBO does not count)
    assert float(champion.tags["val/vlb"]) == pytest.approx(max(e["val/vlb"] for e in epochs), rel=1e-5)
    assert "launch.generate" in client.get_registered_model(MODEL).description

    info = get_model_info(f"models:/{MODEL}@champion")
    assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, -1, -1, -1)
    assert [o["name"] for o in info.signature.outputs.to_dict()] == ["samples", "elbo"]
    assert {p.name for p in info.signature.params.params} == {"samples", "mode", "iterations", "seed"}
    example = json.loads(Path(mlflow.artifacts.download_artifacts(
        f"models:/{MODEL}@champion/serving_input_example.json", dst_path=str(trained["train_dir"] / "example"))).read_text())
    assert set(example) == {"inputs", "params"} and set(example["inputs"]) == {"images"}  # the documented request
    assert example["params"] == {"samples": 8, "mode": "conditional", "iterations": 10, "seed": 0}
    assert info.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert info.flavors["python_function"]["model_code_path"].endswith("model_code.py")  # models from code

    # the experiment opens in the UI's model-training view (the UI's own experiment-kind value), described
    experiment = client.get_experiment_by_name("scha-vae")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.tags["mlflow.note.content"]
    ui = Path(mlflow.__file__).parent / "server" / "js" / "build"
    assert any("custom_model_development" in p.read_text(errors="ignore") for p in ui.rglob("*.js"))

    run = client.get_run(training_run)
    params = run.data.params
    assert "model.hidden_dim" in params and "trainer.lr" in params and "data.set_size" in params
    assert not [k for k in params if k.startswith(("eval.", "trainer.fault_")) or k in ("tracking.uri", "model_uri")]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert run.data.tags["mlflow.source.git.commit"] == commit.strip()
    assert run.data.tags["mlflow.source.name"] == "launch.train"
    (data_input,) = run.inputs.dataset_inputs
    profile = json.loads(data_input.dataset.profile)
    assert data_input.dataset.name == "omniglot_ns"
    assert {t.key: t.value for t in data_input.tags}["mlflow.data.context"] == "training"
    assert {s: v["classes"] for s, v in profile["splits"].items()} == {"train": 1000, "val": 200, "test": 423}
    assert len(profile["manifest_sha256"]) == 64 and profile["manifest_sha256"].startswith(data_input.dataset.digest)


def test_evaluation_puts_its_numbers_on_the_version(trained, tmp_path):
    from mlflow import MlflowClient

    from trainer.registry.mlflow_model import version_model_id

    url = trained["url"]
    client = MlflowClient(tracking_uri=url)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    training_run = champion.run_id
    eval_dir = tmp_path / "eval"
    run_module("launch.evaluate", "eval=elbo", f"model_uri=models:/{MODEL}@champion", f"run_dir={eval_dir}",
               "eval.batch_sets=4", "eval.max_batches=1", "eval.set_sizes=[5]", *trained["common"], cwd=ROOT)
    summary = json.loads((eval_dir / "eval_elbo.json").read_text())
    assert summary["model_name"] == MODEL and summary["model_version"] == str(champion.version)
    run = client.get_run(summary["eval_run_id"])
    assert run.data.tags["training_run_id"] == training_run
    # opened before the work and finished after it: the run's duration is the job's
    written = (eval_dir / "eval_elbo" / "elbo.json").stat().st_mtime * 1000
    assert run.info.status == "FINISHED" and run.info.start_time < written <= run.info.end_time + 1000
    assert "eval/elbo/vlb_S5" in run.data.metrics  # each metric once, under the job's name
    assert all(k.startswith(("eval/elbo/", "system/")) for k in run.data.metrics), sorted(run.data.metrics)
    (data_input,) = run.inputs.dataset_inputs  # what it evaluated on, and which model
    assert data_input.dataset.name == "omniglot_ns"
    assert {t.key: t.value for t in data_input.tags}["mlflow.data.context"] == "evaluation"
    mv = client.get_model_version(MODEL, champion.version)
    # the version shows the job's headline number only; every number is on the run and the logged model
    assert {k for k in mv.tags if k.startswith("eval.")} == {"eval.elbo.vlb_S5"}
    assert float(mv.tags["eval.elbo.vlb_S5"]) == pytest.approx(summary["rows"][0]["vlb"], rel=1e-5)
    assert len(mv.tags) <= MAX_VERSION_TAGS
    # its parameters are the job's own: eval.job, eval.seed and the eval.* keys elbo reads
    assert {k for k in run.data.params if k.startswith("eval.")} == {"eval.job", "eval.seed", "eval.split",
        "eval.set_sizes", "eval.batch_sets", "eval.max_batches", "eval.allow_other_dataset"}
    linked = {m.key: m for m in client.get_logged_model(version_model_id(mv)).metrics}
    assert linked["eval/elbo/vlb_S5"].run_id == run.info.run_id
    assert [m.model_id for m in run.inputs.model_inputs] == [version_model_id(mv)]
    png_runs = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"elbo.json", "elbo.csv"} <= png_runs
    # artifacts went through the server's proxy into its own artifact root
    assert list(trained["server_dir"].glob(f"artifacts/**/{run.info.run_id}/**/elbo.json"))


def test_generate_from_a_folder_of_user_images(trained, user_images, tmp_path):
    from PIL import Image

    out = tmp_path / "gen"
    proc = run_module("launch.generate", f"model_uri=models:/{MODEL}@champion", f"images={user_images}",
                      "samples=7", "mode=refined", "iterations=2", f"out={out}", f"tracking.uri={trained['url']}",
                      cwd=ROOT)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(summary["sample_files"]) == 7 and len(summary["elbo_per_image"]) == 5
    assert all(v < 0 for v in summary["elbo_per_image"])
    grid = Image.open(out / "grid.png")
    # 7 columns (5 given + 2 blank on the top row, the 7 samples below), 28 px tiles, 2 px padding, upscaled 3x
    assert grid.size == (3 * (2 + 7 * 30), 3 * (2 + 2 * 30))
    sample = np.asarray(Image.open(out / "sample_000.png").convert("L"))
    assert sample.shape == (28, 28)
    assert "refined samples" in proc.stderr  # the progress bar


@pytest.mark.parametrize("case", ["empty", "unreadable", "colour", "too_many"])
def test_generate_refuses_bad_images_before_model_work(trained, user_images, tmp_path, case):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    if case == "unreadable":
        (folder / "a.png").write_bytes(b"not a png")
    elif case == "colour":
        Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "red.png")
    elif case == "too_many":
        for i in range(21):
            shutil.copy(next(user_images.iterdir()), folder / f"{i:02d}.png")
    proc = run_module("launch.generate", f"model_uri=models:/{MODEL}@champion", f"images={folder}",
                      f"out={tmp_path / 'out'}", f"tracking.uri={trained['url']}", cwd=ROOT, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    expected = {"empty": "holds no PNG or JPEG", "unreadable": "not a readable PNG", "colour": "is a colour image",
                "too_many": "conditions on at most 20"}[case]
    assert expected in proc.stderr
    assert not (tmp_path / "out").exists()


def test_mlflow_models_serve_answers_invocations(trained, tmp_path):
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    log_path = tmp_path / "serve.log"
    proc = start_process([str(mlflow_cli), "models", "serve", "-m", f"models:/{MODEL}@champion", "--env-manager", "local",
                  "-h", "127.0.0.1", "-p", str(port)], tmp_path, log_path,
                 env={"MLFLOW_TRACKING_URI": trained["url"]})
    url = f"http://127.0.0.1:{port}"

    def post(body) -> tuple:
        req = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    try:
        wait_http(f"{url}/ping", proc, log_path)
        x = (np.random.default_rng(0).random((5, 1, 28, 28)) > 0.8).astype(np.float32)
        status, body = post({"inputs": {"images": x.tolist()}, "params": {"samples": 6, "seed": 1}})
        assert status == 200, body
        samples, elbo = np.asarray(body["predictions"]["samples"]), np.asarray(body["predictions"]["elbo"])
        assert samples.shape == (6, 1, 28, 28) and elbo.shape == (5,)
        assert samples.min() >= 0.0 and samples.max() <= 1.0 and np.isfinite(elbo).all() and (elbo < 0).all()
        again = post({"inputs": {"images": x.tolist()}, "params": {"samples": 6, "seed": 1}})[1]
        assert np.array_equal(np.asarray(again["predictions"]["samples"]), samples)  # seeded
        # the request docs/serving.md sends, from its own file
        status, body = post(json.loads((ROOT / "docs" / "examples" / "serving_request.json").read_text()))
        assert status == 200 and np.asarray(body["predictions"]["samples"]).shape == (8, 1, 28, 28), body
        assert "serving_request.json" in (ROOT / "docs" / "serving.md").read_text()

        for bad, needle in [({"inputs": {"images": np.zeros((5, 1, 27, 28)).tolist()}}, "images must have shape"),
                            ({"inputs": {"images": (x * 3).tolist()}}, "pixel values must be"),
                            ({"inputs": {"images": x.tolist()}, "params": {"mode": "sideways"}}, "mode must be"),
                            ({"inputs": {"images": x.tolist()}, "params": {"samples": 0}}, "samples must be")]:
            status, body = post(bad)
            assert 400 <= status < 500 and needle in body["message"], (bad.get("params"), status, body)
    finally:
        stop_process(proc)


class _Payload:
    """Unpickling this runs a command that writes a marker file: what a hostile registry entry would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["pickle_as_safetensors", "mlflow_pytorch_pickle"])
def test_a_pickled_model_version_is_refused_and_never_runs(trained, user_images, tmp_path, kind):
    import mlflow
    from mlflow import MlflowClient

    url = trained["url"]
    client = MlflowClient(tracking_uri=url)
    marker = tmp_path / "payload_ran"
    staging = tmp_path / "model"
    (staging / "artifacts").mkdir(parents=True)
    if kind == "pickle_as_safetensors":  # a valid card, with a pickle where the safetensors weights belong
        genuine = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{MODEL}@champion",
                                                           dst_path=str(tmp_path / "dl"), tracking_uri=url))
        shutil.copy(genuine / "artifacts" / "model.json", staging / "artifacts" / "model.json")
        (staging / "artifacts" / "weights.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
        expected = "a Python pickle; refusing to load it"
    else:  # what this project used to register: mlflow.pytorch's pickle of the whole module
        (staging / "data").mkdir()
        (staging / "data" / "model.pth").write_bytes(pickle.dumps(_Payload(marker)))
        (staging / "MLmodel").write_text("flavors:\n  pytorch:\n    model_data: data\n    pickle_module_name: "
                                         "mlflow.pytorch.pickle_module\n")
        shutil.rmtree(staging / "artifacts")
        expected = "is not a scha-vae model package"
    name = f"hostile-{kind.replace('_', '-')}"
    exp = client.get_experiment_by_name("scha-vae")
    run_id = client.create_run(exp.experiment_id).info.run_id
    client.log_artifacts(run_id, str(staging), artifact_path="model")
    client.create_registered_model(name)
    client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id)
    client.set_registered_model_alias(name, "champion", "1")

    evaluated = run_module("launch.evaluate", "eval=kl_layer", f"model_uri=models:/{name}@champion",
                           f"run_dir={tmp_path / 'eval'}", *trained["common"], cwd=ROOT, check=False)
    assert evaluated.returncode == 2 and expected in evaluated.stderr, evaluated.stderr[-3000:]
    generated = run_module("launch.generate", f"model_uri=models:/{name}@champion",
                           f"images={user_images}", f"out={tmp_path / 'out'}", f"tracking.uri={url}", cwd=ROOT,
                           check=False)
    assert generated.returncode == 2 and expected in generated.stderr, generated.stderr[-3000:]
    # launch.serve checks the version before MLflow's loader touches it
    served = run_module("launch.serve", f"model_uri=models:/{name}@champion", f"port={free_port()}",
                        f"tracking.uri={url}", cwd=ROOT, check=False, timeout=120)
    lines = [line for line in served.stderr.splitlines() if line.strip()]
    assert served.returncode == 2 and "Traceback" not in served.stderr, served.stderr[-3000:]
    # the pickle-as-weights version has no MLmodel (nothing MLflow could load); the mlflow.pytorch one no package
    assert ("has no MLmodel file" if kind == "pickle_as_safetensors" else expected) in lines[-1], lines
    assert not marker.exists()


def test_serve_refuses_a_version_whose_stored_code_was_replaced(trained, tmp_path):
    """The genuine version with its code file (what MLflow runs on load) replaced: refused by its digest."""
    import mlflow

    from launch.serve import check_version
    from trainer.registry.package import PackageError

    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{MODEL}@champion",
                                                    dst_path=str(tmp_path / "dl"), tracking_uri=trained["url"]))
    assert check_version(root) == root / "artifacts"
    marker = tmp_path / "code_ran"
    (root / "model_code.py").write_text(f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n")
    with pytest.raises(PackageError, match="the stored model code is not the code this project writes"):
        check_version(root)
    assert not marker.exists()


@pytest.fixture(scope="module")
def bounded_server(trained, tmp_path_factory):
    """`python -m launch.serve` (MLflow's scoring app behind BoundedRequests) on the champion version."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    proc = start_process([sys.executable, "-m", "launch.serve", f"model_uri=models:/{MODEL}@champion",
                          f"port={port}", f"tracking.uri={trained['url']}"], ROOT, log_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, log_path)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


def _raw_post(url: str, body: bytes) -> tuple:
    """POST `body` to /invocations over a plain socket (the server may answer before the body is sent)."""
    import socket
    import threading
    from urllib.parse import urlparse

    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=60) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")

        def send_body():
            try:
                sock.sendall(body)
            except OSError:  # refused early: the server stopped reading
                pass

        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        reply = bytearray()
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except OSError:
                break
            if not chunk:
                break
            reply += chunk
            head, sep, rest = bytes(reply).partition(b"\r\n\r\n")
            if sep:
                length = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")]
                if length and len(rest) >= length[0]:
                    break
    head, _, rest = bytes(reply).partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), rest


def test_served_requests_are_bounded_and_errors_never_echo_them(bounded_server):
    x = (np.random.default_rng(0).random((5, 1, 28, 28)) > 0.8).astype(np.float32)
    good = json.dumps({"inputs": {"images": x.tolist()}, "params": {"samples": 3, "seed": 1}}).encode()
    status, body = _raw_post(bounded_server, good)
    assert status == 200 and np.asarray(json.loads(body)["predictions"]["samples"]).shape == (3, 1, 28, 28)

    nested = b"[" * 100_000
    status, body = _raw_post(bounded_server, nested)
    assert status == 400 and b"nests deeper than 8 levels" in body and len(body) < 2048, (status, body[:300])
    status, body = _raw_post(bounded_server, b'{"inputs": ' + b"[" * 20 + b"1" + b"]" * 20 + b"}")
    assert status == 400 and b"nests deeper" in body, (status, body[:300])

    marker = b"ECHO-ME-" * 8
    invalid = marker + b"x" * (50 << 20)  # 50 MB, not JSON
    status, body = _raw_post(bounded_server, invalid)
    assert status == 413 and marker not in body and len(body) < 2048, (status, body[:300])
    invalid = marker + b"x" * (5 << 20)  # 5 MB, under the size limit: a 400 naming the reason only
    status, body = _raw_post(bounded_server, invalid)
    assert status == 400 and b"not valid JSON" in body and marker not in body and len(body) < 2048, body[:300]

    for params, needle in (({"samples": 5000}, "samples must be in 1..1024"),
                           ({"iterations": 1000, "mode": "refined"}, "iterations must be in 0..100"),
                           ({"temperature": 0.5}, "unknown params ['temperature']: this model takes samples")):
        bad = json.dumps({"inputs": {"images": x.tolist()}, "params": params}).encode()
        status, body = _raw_post(bounded_server, bad)
        assert status == 400 and json.loads(body)["message"].startswith(needle), (status, body[:500])
    # a set of another image shape: the reason first and alone, no dump of the request (MLflow's own would start
    # "Failed to predict data '{'images': array([[[[0., ...")
    bad = json.dumps({"inputs": {"images": np.zeros((5, 1, 27, 28)).tolist()}}).encode()
    status, body = _raw_post(bounded_server, bad)
    message = json.loads(body)["message"]
    assert status == 400 and message.startswith("images must have shape (S, 1, 28, 28)") and len(message) < 200


def test_requests_are_bounded_by_their_work_and_the_largest_allowed_one_holds_nothing_else(bounded_server):
    """Issue 33: 1024 refined samples at 100 iterations (inside the size bounds) is refused by its cost with a
    400 naming the limit; while the largest request the limit allows runs, /ping and a small request answer
    within 2 s (they run beside it: generation happens in worker processes, trainer/serving/workers.py)."""
    import re
    import threading
    import time
    import urllib.request

    from trainer.serving.generation import MAX_REQUEST_FLOPS

    x = (np.random.default_rng(1).random((5, 1, 28, 28)) > 0.8).astype(np.float32).tolist()

    def body(**params) -> bytes:
        return json.dumps({"inputs": {"images": x}, "params": params}).encode()

    status, reply = _raw_post(bounded_server, body(samples=1024, mode="refined", iterations=100))
    message = json.loads(reply)["message"]
    assert status == 400 and message.startswith("the request's work is"), (status, message)
    assert f"above the limit of {MAX_REQUEST_FLOPS:.3g} per request" in message
    per_image = float(re.search(r"at ([0-9.e+]+) FLOPs per image", message).group(1))
    copies = int((MAX_REQUEST_FLOPS / per_image - 5) // (5 * 101))
    assert copies >= 1, per_image
    largest = {}

    def run_largest() -> None:
        t0 = time.monotonic()
        largest["reply"] = _raw_post(bounded_server, body(samples=5 * copies, mode="refined", iterations=100, seed=3))
        largest["s"] = time.monotonic() - t0

    thread = threading.Thread(target=run_largest)
    thread.start()
    time.sleep(1.0)  # the large request is at work in one worker
    for _ in range(3):
        t0 = time.monotonic()
        with urllib.request.urlopen(f"{bounded_server}/ping", timeout=10) as resp:
            assert resp.status == 200
        assert time.monotonic() - t0 < 2.0
        t0 = time.monotonic()
        status, reply = _raw_post(bounded_server, body(samples=1, seed=4))
        assert status == 200 and time.monotonic() - t0 < 2.0, (status, time.monotonic() - t0)
    assert thread.is_alive(), "the largest request ended before the checks: they proved nothing"
    thread.join(120)
    status, reply = largest["reply"]
    assert status == 200, reply[:500]
    assert np.asarray(json.loads(reply)["predictions"]["samples"]).shape == (5 * copies, 1, 28, 28)
