"""Every command line README.md, the Makefile and docs/*.md show is in exactly one category of `TABLE`, and the
RUN ones run, as written, in a tiny workspace: only placeholders filled in (`<...>`, the Makefile's variables,
optional `[...]` groups left out, the docs' example paths outside the workspace moved into it) and tiny-size
overrides appended (a later override wins, for Hydra and for the tools' own options). Each must exit 0 and leave
its own outcome (a file it names, finite numbers in the rows it prints, its summary line).

They run in order, in ONE child process (tests/scripts/run_documented.py): importing torch, DeepSpeed and MLflow
costs 8-15 s per process, more than most commands take at these sizes. The workspace is the cwd of that process,
with `../shared` beside it (a link to the shared data) so that `../shared/data/...` in a command means what it
means from the repository root; the default store `mlruns/mlflow.db` is the workspace's own.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest

from conftest import ROOT, free_port, shared_data, start_process, stop_process, wait_http
from test_documented_commands import DOCS

DRIVER = ROOT / "tests" / "scripts" / "run_documented.py"
# a command line: optional VAR=value words, then one of the tools the docs run
START = re.compile(r"^(?:[A-Z_]+=\S+ )*(?:/usr/bin/tini -- )?(?:\$\(BIN\)/)?"
                   r"(?:python -m \w|mlflow |torchrun |deepspeed |launch/multinode\.sh|curl |make |kubectl |docker )")


def documented() -> Dict[str, List[str]]:
    """Command line -> the files that show it: lines of fenced code blocks and of Makefile recipes, and inline
    `code` spans, that start like a command (continuation lines joined, trailing comments cut)."""
    found: Dict[str, List[str]] = {}

    def add(doc: Path, text: str) -> None:
        text = " ".join(text.split())
        if START.match(text):
            found.setdefault(text, []).append(doc.name)

    for doc in DOCS:
        text = doc.read_text()
        if doc.name == "Makefile":
            for line in text.replace("\\\n", " ").splitlines():
                if line.startswith("\t"):  # a recipe; the shell around the command is Make's, not the command's
                    line = re.sub(r"^@|^test -f \S+ \|\| | > /dev/null$", "", line.strip())
                    add(doc, line)
            continue
        for i, part in enumerate(re.split(r"^```.*$", text, flags=re.M)):
            if i % 2:  # inside a fenced block
                for line in part.replace("\\\n", " ").splitlines():
                    add(doc, re.split(r"\s+#\s", line)[0])
            else:
                for span in re.findall(r"`([^`]+)`", part):
                    add(doc, span)
    return found


# ------------------------------------------------------------------------------------------------ outcomes
Check = Callable[[Path, str], None]  # (workspace, the command's output)


def file(path: str) -> Check:
    def check(ws: Path, out: str) -> None:
        assert (ws / path).is_file() and (ws / path).stat().st_size > 0, f"{path} not written"
    return check


def checkpoint(run_dir: str, step: int) -> Check:
    def check(ws: Path, out: str) -> None:
        tag = ws / run_dir / "checkpoints" / f"step{step:09d}"
        assert tag.is_dir() and any(tag.iterdir()), f"no checkpoint {tag.name} in {run_dir}"
    return check


def pngs(folder: str, n: int) -> Check:
    def check(ws: Path, out: str) -> None:
        assert len(list((ws / folder).glob("*.png"))) == n, f"{folder}: expected {n} PNG files"
    return check


def says(pattern: str) -> Check:
    def check(ws: Path, out: str) -> None:
        assert re.search(pattern, out, re.M), f"output lacks /{pattern}/"
    return check


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def rows(key: str, n: int = 1) -> Check:
    """The JSON rows launch.evaluate prints last: at least `n`, each with a finite `key`."""
    def check(ws: Path, out: str) -> None:
        starts = [m.start() for m in re.finditer(r"^\[$", out, re.M)]
        assert starts, "no JSON rows printed"
        printed, _ = json.JSONDecoder().raw_decode(out[starts[-1]:])
        assert len(printed) >= n and all(_finite(r.get(key)) for r in printed), printed[:3]
    return check


def json_lines(key: str, n: int = 1) -> Check:
    """JSON records, one a line (bench, bench_readers): `n` of them, each with a finite positive `key`."""
    def check(ws: Path, out: str) -> None:
        records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert len(records) >= n and all(_finite(r.get(key)) and r[key] > 0 for r in records), records[:2]
    return check


def manifest(dataset: str, shards: str = "data/shards", **classes: int) -> Check:
    def check(ws: Path, out: str) -> None:
        m = json.loads((ws / shards / dataset / "manifest.json").read_text())
        for split, n in classes.items():
            assert m["splits"][split]["classes"] == n, (split, m["splits"][split]["classes"])
    return check


# ------------------------------------------------------------------------------------------------ categories
@dataclass
class Run:
    tiny: str = ""  # appended
    fill: Dict[str, str] = field(default_factory=dict)  # placeholder -> value
    checks: Tuple[Check, ...] = ()
    before: str = ""  # an undocumented command that makes the state this one needs (runs just before it)


@dataclass
class Serve:
    """RUN as a process of its own, since it serves until stopped: started in the workspace once the RUN commands
    are done, `tiny` appended, it must answer `probe` with 200 and `expect` in the body."""
    tiny: str
    probe: str
    expect: str


@dataclass
class Covered:
    node: str  # tests/<file>.py::<test>, which runs the same tool with the same options end to end
    runs: str  # how that test's module starts it (checked to be there)


@dataclass
class Cluster:
    why: str


@dataclass
class Gpu:
    why: str


@dataclass
class Long:
    why: str


@dataclass
class Mention:
    why: str  # a tool's name or a launcher's flag inside a sentence: not a command line


FILL = {"$(BIN)/python": "python", "$(RAW)": "../shared/data/omniglot", "$(FEATURES)": "protonet_demo"}
DEMO = "trainer.epochs=1 data.limit_batches=2"
EVAL = "eval.set_sizes=[5] eval.batch_sets=4 eval.max_batches=1"
IWAE = "eval.importance_samples=4 eval.k_values=[1]"
QUALITY = "eval.episodes=2 eval.samples_per_set=2 eval.refine_iterations=1"
FEATURES = "train.episodes=2 train.eval_episodes=2"
BENCH = "data.batch_sets=2 warmup=0 steps=1 eval=false"  # 2: BatchNorm over sets needs more than one
READERS = "data.limit_batches=3"
OMNIGLOT = "../shared/data/omniglot"
LAG = ("python -m launch.train experiment=smoke name=lag model.name=ns_lag model.aggregation=lag trainer.epochs=1 "
       "data.limit_batches=2")
SERVE_NODE = "tests/test_mlflow_server.py::test_mlflow_models_serve_answers_invocations"
PAPER = "the paper preset on 8 GPUs of one node"
K8S = "talks to a Kubernetes cluster"

TABLE: List[Tuple[str, object]] = [
    # docs/data.md, object storage: they need an S3 server, which tests/test_object_store.py starts
    ("python -m launch.prepare data=omniglot_ns data.raw_dir=../shared/data/omniglot "
     "data.shards_dir=s3://my-bucket/shards",
     Covered("tests/test_object_store.py::test_prepare_writes_the_local_bytes_to_a_bucket_and_rewrites_nothing_the_"
             "second_time", '"launch.prepare"')),
    ("python -m launch.train experiment=demo data.raw_dir=../shared/data/omniglot data.shards_dir=s3://my-bucket/shards "
     "data.cache_dir=/tmp/shard-cache",
     Covered("tests/test_object_store.py::test_the_store_going_away_mid_epoch_exits_11_and_the_run_resumes_exactly_"
             "through_a_cut_connection", '"launch.train"')),
    ("python -m launch.bench_readers data.raw_dir=../shared/data/omniglot data.download=false data.batch_sets=16 "
     "data.sampling=stream data.reader=torch data.limit_batches=301 data.num_workers=0|2 "
     "data.shards_dir=<dir or s3://bench/shards> [data.cache_dir=<dir>]",
     Long("the figure's eight runs against a local S3 server (docs/data.md)")),
    # --- README: data and training (the order is the order they run in: later ones use what earlier ones made)
    ("python -m launch.prepare data=omniglot_ns data.raw_dir=<dir with images_background.zip, images_evaluation.zip>",
     Run(fill={"<dir with images_background.zip, images_evaluation.zip>": OMNIGLOT},
         checks=(manifest("omniglot_ns", train=1000, val=200, test=423),))),
    ("python -m launch.train experiment=demo data.raw_dir=../shared/data/omniglot trainer.precision=fp32",
     Run(DEMO, checks=(says(r"checkpoint step000000002 \[champion, last\]: models:/demo/1"),
                       file("runs/demo/figures/learning_curve.png")))),
    ("python -m launch.train experiment=smoke trainer.max_steps=3",
     Run(checks=(checkpoint("runs/smoke", 3), says(r"training stopped after epoch 0/2")))),
    ("python -m launch.train experiment=omniglot_ns_ns",
     Run("trainer.max_steps=1 data.batch_sets=2", checks=(checkpoint("runs/omniglot_ns_ns", 1),))),
    # --- the Makefile's demo, step by step (`make demo` itself is LONG); its training resumes the one above
    ("$(BIN)/python -m launch.train experiment=demo data.raw_dir=$(RAW)",
     Run("trainer.epochs=2 data.limit_batches=2",
         checks=(says(r"resumed from .*step000000002"), says(r"checkpoint step000000004 \[.*last.*\]: models:/demo/2")))),
    ("$(BIN)/python -m launch.evaluate name=demo eval=elbo model_uri=models:/demo@champion data.raw_dir=$(RAW) "
     "eval.set_sizes=[5] eval.max_batches=20",
     Run("eval.max_batches=1", checks=(rows("vlb"), file("runs/demo/eval_elbo.json")))),
    ("$(BIN)/python -m launch.evaluate name=demo eval=marginal model_uri=models:/demo@champion data.raw_dir=$(RAW) "
     "eval.set_sizes=[5] eval.importance_samples=100 eval.batch_sets=8 eval.max_batches=4",
     Run(f"{IWAE} eval.batch_sets=4 eval.max_batches=1", checks=(rows("nll"), file("runs/demo/eval_marginal.json")))),
    ("$(BIN)/python -m launch.extract_set name=demo split=test index=0 images=5 out=runs/demo/test_character",
     Run(checks=(pngs("runs/demo/test_character", 5),))),
    ("$(BIN)/python -m launch.generate name=demo model_uri=models:/demo@champion images=runs/demo/test_character "
     "samples=20 mode=refined iterations=5 out=runs/demo/generated",
     Run("samples=2 iterations=1", checks=(file("runs/demo/generated/grid.png"), pngs("runs/demo/generated", 3)))),
    ("$(BIN)/python -m launch.train_features name=$(FEATURES) data.raw_dir=$(RAW) train.episodes=1000 "
     "train.eval_episodes=100",
     Run(FEATURES, checks=(file("runs/protonet_demo/feature_model/weights.safetensors"),))),
    ("$(BIN)/python -m launch.evaluate name=demo eval=sample_quality model_uri=models:/demo@champion "
     "data.raw_dir=$(RAW) eval.feature_model=models:/$(FEATURES)@champion eval.episodes=50 eval.refine_iterations=5",
     Run(QUALITY, checks=(rows("recognizability", 4), file("runs/demo/eval_sample_quality.json")))),
    ("$(BIN)/python -m launch.quality_report runs/demo", Run(checks=(says(r"^conditional\s+\d\.\d+ \+- "),))),
    ("$(BIN)/python -m launch.gpu_check",
     Covered("tests/test_gpu_check.py::test_gpu_check_reduced_cpu_form_writes_the_report", '"launch.gpu_check"')),
    ("OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q --durations=25 -n $(TEST_WORKERS) --dist loadfile "
     "--no-loadscope-reorder tests",
     Long("the whole suite (`make test`), this test among it")),
    # --- docs/results.md: the recipe rows (a demo-budget training each); the export and the evaluation of the
    # weights as trained run on the demo run above
    ("python -m launch.train experiment=demo name=<row> data.raw_dir=../shared/data/omniglot trainer.epochs=5 "
     "trainer.budget_minutes=0 trainer.checkpoint_every_epochs=1 trainer.ema_decay=0.999 OPTIONS",
     Long("a 500-step demo training, ~10 minutes")),
    ("python -m launch.evaluate name=<row> eval=sample_quality model_uri=models:/<row>@last "
     "data.raw_dir=../shared/data/omniglot eval.feature_model=models:/protonet_demo@champion eval.episodes=50 "
     "eval.refine_iterations=5", Long("the sample quality of a results.md row's training")),
    ("python -m launch.train experiment=demo name=<row> data.raw_dir=../shared/data/omniglot "
     "trainer.checkpoint_every_epochs=5", Long("a demo-size training of a results.md row, 5-15 minutes")),
    ("python -m launch.export runs/<row> --trained-weights --out runs/<row>/trained_pkg",
     Run(fill={"<row>": "demo"}, checks=(file("runs/demo/trained_pkg/weights.safetensors"),))),
    ("python -m launch.evaluate name=<row> run_dir=runs/<row>_trained eval=sample_quality "
     "model_uri=runs/<row>/trained_pkg eval.feature_model=runs/protonet_demo/feature_model eval.episodes=50 "
     "eval.refine_iterations=5 data.raw_dir=../shared/data/omniglot",
     Run(QUALITY, fill={"<row>": "demo"}, checks=(rows("recognizability", 4),))),
    # --- docs/results.md: the one-hour preset and its evaluations
    ("python -m launch.train experiment=omniglot_cpu_hour data.raw_dir=../shared/data/omniglot",
     Long("the one-hour preset: 55 minutes of training on 2 cores")),
    ("python -m launch.train experiment=omniglot_cpu_hour name=hour_w64 model.hidden_dim=64 trainer.epochs=200 "
     "trainer.budget_minutes=55 data.raw_dir=../shared/data/omniglot", Long("the one-hour preset's measured run")),
    ("python -m launch.evaluate name=omniglot_cpu_hour eval=sample_quality model_uri=models:/omniglot_cpu_hour@last "
     "data.raw_dir=../shared/data/omniglot eval.feature_model=models:/protonet_demo@champion eval.episodes=50 "
     "eval.refine_iterations=5", Long("the sample quality of the one-hour preset's training")),
    ("python -m launch.evaluate name=omniglot_cpu_hour eval=marginal model_uri=models:/omniglot_cpu_hour@last "
     "data.raw_dir=../shared/data/omniglot eval.set_sizes=[5] eval.importance_samples=1000 eval.batch_sets=8 "
     "eval.max_batches=8", Long("K=1000 on 64 test sets of the one-hour preset's training, ~11 minutes")),
    # --- docs/results.md: the ranking at a CPU budget
    ("make ranking", Long("five 20-minute trainings, one after another, then their evaluations: hours on 2 cores")),
    ("python -m launch.train experiment=omniglot_cpu_rank_<model> data.raw_dir=../shared/data/omniglot",
     Long("one ranked model: 20 minutes of wall clock (trainer.budget_minutes)")),
    ("python -m launch.compare runs/rank_vae runs/rank_ns runs/rank_cns runs/rank_schavae runs/rank_schavae_lag "
     "--out runs/ranking",
     Run(fill={"runs/rank_vae runs/rank_ns runs/rank_cns runs/rank_schavae runs/rank_schavae_lag": "runs/demo"},
         checks=(file("runs/ranking/table.md"), file("runs/ranking/val_elbo_vs_wallclock.png")))),
    ("python -m launch.train experiment=omniglot_cpu_rank_cns name=demo_cns64 model.hidden_dim=64 "
     "trainer.budget_minutes=9 data.raw_dir=../shared/data/omniglot",
     Long("a CNS trained for the demo's 9 minutes of wall clock (trainer.budget_minutes)")),
    ("$(BIN)/python -m launch.compare $(foreach m,$(RANK_MODELS),runs/rank_$(m)) --out runs/ranking",
     Covered("tests/test_compare.py::test_runs_are_ranked_by_nll_with_their_budget_and_a_picture", '"launch.compare"')),
    # --- README: export, the registry, evaluation
    ("python -m launch.export runs/<name>",
     Run(fill={"<name>": "demo"}, checks=(file("runs/demo/export/step000000004/weights.safetensors"),
                                          file("runs/demo/export/step000000004/model.json")))),
    ("python -m launch.evaluate model_uri=<that dir>",
     Run(EVAL, fill={"<that dir>": "runs/demo/export/step000000004"}, checks=(rows("vlb"),))),
    ("python -m launch.generate model_uri=models:/demo@champion images=<folder of PNG/JPEG> samples=20 out=generated",
     Run("samples=2", fill={"<folder of PNG/JPEG>": "my_character"}, checks=(file("generated/grid.png"),))),
    ("python -m launch.evaluate eval=elbo model_uri=models:/demo@champion", Run(EVAL, checks=(rows("vlb"),))),
    ("python -m launch.evaluate eval=marginal model_uri=models:/demo@champion",
     Run(f"{EVAL} {IWAE}", checks=(rows("nll"),))),
    ("python -m launch.evaluate eval=cardinality model_uri=models:/demo@champion",
     Run(EVAL, checks=(rows("vlb", 2),))),  # train and test
    ("python -m launch.evaluate eval=kl_layer model_uri=models:/demo@champion", Run(EVAL, checks=(rows("kl", 2),))),
    ("python -m launch.evaluate eval=transfer model_uri=models:/demo@champion eval.mnist_dir=../shared/data/mnist",
     Run(f"{EVAL} {IWAE}", checks=(rows("nll", 3),))),  # MNIST, DoubleMNIST, TripleMNIST
    ("python -m launch.evaluate eval=fewshot model_uri=models:/demo@champion eval.mnist_dir=../shared/data/mnist",
     Run("eval.episodes=1 eval.queries=10", checks=(rows("accuracy", 2),))),  # both rules
    ("python -m launch.evaluate eval=samples model_uri=models:/demo@champion eval.mnist_dir=../shared/data/mnist",
     Run("eval.num_sets=2 eval.refine_iterations=1", checks=(file("runs/run/eval_samples/samples_mnist.png"),))),
    ("python -m launch.evaluate eval=attention model_uri=models:/<a LAG model>@champion",
     Run("eval.num_sets=2", fill={"<a LAG model>": "lag"}, before=LAG, checks=(rows("weight", 2 * 4 * 5),))),
    ("python -m launch.train_features", Run(FEATURES, checks=(file("runs/protonet/feature_model/weights.safetensors"),
                                                              says(r'"model_uri": "models:/protonet@champion"')))),
    ("python -m launch.evaluate eval=sample_quality model_uri=models:/demo@champion",
     Run(QUALITY, checks=(rows("recognizability", 4), says(r'"feature_model": "models:/protonet@champion"')))),
    ("python -m launch.sync_tracking <run_dir>",
     Run(fill={"<run_dir>": "runs/demo"}, checks=(says(r"runs/demo: nothing to send"),))),
    ("python -m models", Run(checks=(says(r"^schavae\s+SCHA-VAE\s+[\d,]+$"),))),
    # the README's port is taken as written unless busy: the test's own comes last (click keeps the last value)
    ("mlflow server --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port 5000",
     Serve("--port {port} --workers 1", "/api/2.0/mlflow/registered-models/get?name=demo", '"alias": "champion"')),
    ("MLFLOW_TRACKING_URI=sqlite:///mlruns/mlflow.db mlflow models serve -m models:/demo@champion --env-manager local "
     "-h 127.0.0.1 -p 5001", Covered(SERVE_NODE, '"models", "serve"')),
    ("python -m launch.bench", Mention("names the tool; its command lines are below")),
    # --- README: launching
    ("torchrun --nproc_per_node=8 -m launch.train experiment=omniglot_ns_ns run_dir=runs/ns", Gpu(PAPER)),
    ("python -m launch.torchrun --nproc_per_node=8 -m launch.train experiment=omniglot_ns_ns run_dir=runs/ns",
     Gpu(PAPER)),
    ("deepspeed --num_gpus 8 --no_local_rank --module launch.train experiment=omniglot_ns_ns run_dir=runs/ns",
     Gpu(PAPER)),
    ("NNODES=4 NPROC_PER_NODE=8 MASTER_ADDR=node-0 RUN_ID=ns launch/multinode.sh experiment=omniglot_ns_ns "
     "run_dir=/shared/runs/ns", Cluster("4 nodes of 8 GPUs; the recipe itself: tests/test_distributed.py::"
                                        "test_multinode_recipe_torchrun_c10d")),
    ("deepspeed --hostfile hostfile --no_ssh --node_rank=$NODE_RANK --master_addr=node-0 --no_local_rank --module "
     "launch.train experiment=omniglot_ns_ns run_dir=/shared/runs/ns",
     Cluster("one per node of a hostfile cluster; the recipe: tests/test_distributed.py::"
             "test_multinode_recipe_deepspeed_hostfile")),
    ("python -m launch.torchrun", Mention("names the launcher")),
    ("make demo", Long("17 minutes on 2 cores; each of its commands runs here at a tiny size ($(BIN)/python ...)")),
    ("make test", Long("the whole suite, 43 minutes on two workers")),
    ("make gpu-check", Gpu("the GPU acceptance; its CPU form is $(BIN)/python -m launch.gpu_check, covered")),
    ("make setup", Long("creates .venv and pip-installs the package: the environment this test runs in")),
    # --- docs/data.md
    ("python -m data_pipeline.synthetic /tmp/fake_celeba --identities 300 --images 20",
     Run("--identities 12 --images 5", fill={"/tmp/fake_celeba": "fake_celeba"},
         checks=(says(r"^60 images of 12 identities in fake_celeba$"),))),
    ("python -m launch.prepare data=celeba data.raw_dir=/tmp/fake_celeba",
     Run(fill={"/tmp/fake_celeba": "fake_celeba"}, checks=(manifest("celeba", train=8),))),
    ("python -m launch.prepare data=celeba data.raw_dir=/data/celeba data.shards_dir=/data/shards",
     Run(fill={"/data/celeba": "fake_celeba", "/data/shards": "celeba_shards"},
         checks=(manifest("celeba", "celeba_shards", train=8),))),
    ("python -m launch.bench_readers data.raw_dir=<omniglot dir> [data.num_workers=2] [data.limit_batches=101]",
     Run(READERS, fill={"<omniglot dir>": OMNIGLOT}, checks=(json_lines("img_per_s", 3),))),
    ("python -m launch.bench_readers data=celeba data.raw_dir=<celeba or generated tree> [data.augment=true]",
     Run(f"{READERS} data.batch_sets=2", fill={"<celeba or generated tree>": "fake_celeba"},
         checks=(json_lines("img_per_s"), says(r'"dataset": "celeba"')))),
    # --- docs/evaluation.md
    ("python -m launch.evaluate eval=<job> model_uri=models:/<name>@<alias> [overrides]",
     Run(EVAL, fill={"<job>": "kl_layer", "<name>": "demo", "<alias>": "last"}, checks=(rows("kl"),))),
    ("python -m launch.export", Mention("names the tool (`python -m launch.export runs/<name>` runs above)")),
    ("python -m launch.evaluate experiment=omniglot_ns_ns eval=transfer model_uri=models:/omniglot_ns_ns@champion "
     "tracking.uri=http://mlflow:5000 eval.mnist_dir=/data/raw/mnist", Cluster("the cluster's MLflow server and volume")),
    ("python -m launch.prepare ...", Mention("the start of the command an error message prints")),
    ("python -m launch.evaluate eval=sample_quality model_uri=models:/demo@champion "
     "[eval.feature_model=models:/protonet@champion]", Run(QUALITY, checks=(rows("recognizability", 4),))),
    ("python -m launch.quality_report runs/<name>",
     Run(fill={"<name>": "run"}, checks=(says(r"^refined\s+\d\.\d+ \+- "),))),
    ("mlflow server", Mention("names MLflow's server; tests/test_mlflow_server.py runs one")),
    # --- docs/kubernetes.md: a cluster's commands and the pods' own command lines
    ("docker build -t scha-vae:0.1.0 .", Cluster("builds the cluster's image (docker daemon)")),
    ("kubectl apply -k k8s/namespace", Cluster("a cluster admin's step: a Namespace is cluster-scoped")),
    ("kubectl auth can-i create trainjobs.trainer.kubeflow.org -n scha-vae", Cluster(K8S)),
    ("kubectl delete -k", Mention("names what not to do to an overlay")),
    ("kubectl apply -k k8s/mlflow", Cluster(K8S)),
    ("kubectl -n scha-vae rollout status deploy/mlflow", Cluster(K8S)),
    ("kubectl apply -k k8s/prepare", Cluster(K8S)),
    ("kubectl -n scha-vae wait --for=condition=complete job/prepare-omniglot-ns --timeout=1h", Cluster(K8S)),
    ("kubectl apply -k k8s/train-indexed", Cluster("a cluster with GPU nodes")),
    ("kubectl -n scha-vae logs -f job/train-omniglot-ns-ns", Cluster(K8S)),
    ("kubectl apply -k k8s/evaluate", Cluster("a cluster with GPU nodes")),
    ("kubectl kustomize k8s/<overlay>", Covered("tests/test_k8s.py::test_kustomization_renders", "kustomize(")),
    ("kubectl -n scha-vae create secret generic mlflow-postgres --from-literal=POSTGRES_PASSWORD=\"$(openssl rand "
     "-hex 24)\"", Cluster(K8S)),
    ("kubectl -n scha-vae create secret generic mlflow-admin --from-literal=username=admin --from-literal=password="
     "\"$(openssl rand -hex 24)\" --from-literal=flask_secret_key=\"$(openssl rand -hex 32)\"", Cluster(K8S)),
    ("kubectl -n scha-vae create secret generic mlflow-client --from-literal=MLFLOW_TRACKING_USERNAME=scha-vae-jobs "
     "--from-literal=MLFLOW_TRACKING_PASSWORD=\"$(openssl rand -hex 24)\"", Cluster(K8S)),
    ("kubectl -n scha-vae port-forward svc/mlflow 5000 &", Cluster(K8S)),
    ("curl -u \"admin:$ADMIN_PASSWORD\" -X POST http://localhost:5000/api/2.0/mlflow/users/create -H 'Content-Type: "
     "application/json' -d '{\"username\": \"scha-vae-jobs\", \"password\": \"<MLFLOW_TRACKING_PASSWORD of "
     "mlflow-client>\"}'", Cluster("the cluster's MLflow server, port-forwarded")),
    ("kubectl -n scha-vae delete job <name>", Cluster(K8S)),
    ("kubectl -n scha-vae run loader --image=busybox:1.37 --restart=Never --overrides='{\"spec\":{"
     "\"automountServiceAccountToken\":false,\"securityContext\":{\"runAsNonRoot\":true,\"runAsUser\":1000,"
     "\"runAsGroup\":1000,\"fsGroup\":1000,\"seccompProfile\":{\"type\":\"RuntimeDefault\"}},\"volumes\":[{"
     "\"name\":\"d\",\"persistentVolumeClaim\":{\"claimName\":\"scha-vae-data\"}}],\"containers\":[{\"name\":"
     "\"loader\",\"image\":\"busybox:1.37\",\"command\":[\"sh\",\"-c\",\"mkdir -p /data/raw/omniglot && sleep "
     "3600\"],\"securityContext\":{\"allowPrivilegeEscalation\":false,\"capabilities\":{\"drop\":[\"ALL\"]}},"
     "\"volumeMounts\":[{\"name\":\"d\",\"mountPath\":\"/data\"}]}]}}'", Cluster(K8S)),
    ("kubectl -n scha-vae cp images_background.zip loader:/data/raw/omniglot/", Cluster(K8S)),
    ("mlflow server --app-name basic-auth --artifacts-destination /mlartifacts --serve-artifacts --host 0.0.0.0 "
     "--port 5000 --workers 2", Covered("tests/test_k8s_hardening.py::test_basic_auth_server_refuses_requests_without_the_password",
             'start_rendered_mlflow_server("mlflow",')),
    ("kubectl -n scha-vae port-forward svc/mlflow 5000", Cluster(K8S)),
    ("python -m launch.prepare data=omniglot_ns data.raw_dir=/data/raw/omniglot data.shards_dir=/data/shards "
     "name=prepare-omniglot_ns run_dir=/runs/prepare/omniglot_ns", Cluster("the prepare Job's pod and volumes")),
    ("python -m launch.torchrun --nnodes=$(NNODES) --nproc-per-node=$(GPUS_PER_NODE) --rdzv-backend=c10d "
     "--rdzv-endpoint=train-omniglot-ns-ns-0.train-omniglot-ns-ns:29400 --rdzv-id=train-omniglot-ns-ns "
     "--max-restarts=3 --shutdown-timeout=240 -m launch.train experiment=omniglot_ns_ns name=omniglot_ns_ns "
     "run_dir=/runs/omniglot_ns_ns data.raw_dir=/data/raw/omniglot data.shards_dir=/data/shards "
     "tracking.uri=$(MLFLOW_TRACKING_URI) trainer.resume=auto", Cluster("each pod of the Indexed Job")),
    ("kubectl apply -k k8s/train-kubeflow", Cluster("a cluster with Kubeflow Trainer")),
    ("kubectl apply -k k8s/mlflow-s3", Cluster(K8S)),
    ("kubectl -n scha-vae create secret generic object-store --from-literal=AWS_ACCESS_KEY_ID=\"<access key id>\" "
     "--from-literal=AWS_SECRET_ACCESS_KEY=\"<secret access key>\"", Cluster(K8S)),
    ("mlflow server ... --artifacts-destination $(MLFLOW_ARTIFACTS_URL)", Covered(
        "tests/test_k8s_object_store.py::test_the_overlays_commands_prepare_train_register_and_evaluate_with_data_and_"
        "artifacts_in_the_bucket", 'start_rendered_mlflow_server("mlflow-s3",')),
    ("/usr/bin/tini -- python -m launch.torchrun --max-restarts=3 --shutdown-timeout=240 -m launch.train "
     "experiment=omniglot_ns_ns name=omniglot_ns_ns run_dir=/runs/omniglot_ns_ns data.raw_dir=/data/raw/omniglot "
     "data.shards_dir=/data/shards tracking.uri=$(MLFLOW_TRACKING_URI) trainer.resume=auto",
     Cluster("the TrainJob's container")),
    ("kubectl explain trainjob.spec", Cluster("a cluster with Kubeflow Trainer's CRDs")),
    ("python -m launch.evaluate eval=marginal model_uri=models:/omniglot_ns_ns@champion "
     "tracking.uri=$(MLFLOW_TRACKING_URI) experiment=omniglot_ns_ns name=omniglot_ns_ns-marginal "
     "run_dir=/runs/eval/omniglot_ns_ns-marginal data.raw_dir=/data/raw/omniglot data.shards_dir=/data/shards",
     Cluster("the evaluate Job's pod")),
    ("kubectl get priorityclass", Cluster(K8S)),
    ("kubectl kustomize", Mention("names the renderer the k8s tests use")),
    # --- docs/performance.md and docs/scaling.md: benchmarks and the calculator
    ("python -m launch.bench model=<name> [data.batch_sets=..] [data.set_size=..] [trainer.precision=..] "
     "[device=..] [warmup=2] [steps=5] [eval=true] [threads=auto] [...any trainer/model override; a,b sweeps]",
     Run(BENCH, fill={"<name>": "vae"}, checks=(json_lines("step_time_median_s"),))),
    ("python -m launch.bench experiment=demo eval=false steps=5 warmup=2 threads=1",
     Run(BENCH, checks=(json_lines("step_time_median_s"), says(r"1 torch threads")))),
    ("python -m launch.bench model=schavae data.batch_sets=16 data.set_size=5 device=cpu",
     Run(BENCH, checks=(json_lines("step_time_median_s"), says(r'"model": "schavae"')))),
    ("python -m launch.bench_readers data.raw_dir=../shared/data/omniglot data.download=false data.batch_sets=16 "
     "data.sampling=stream data.limit_batches=301 [data.num_workers=0|2]",
     Run(READERS, checks=(json_lines("img_per_s", 2),))),  # torch and dali, streaming
    ("python -m launch.bench_readers data.raw_dir=../shared/data/omniglot data.download=false data.limit_batches=101",
     Run(READERS, checks=(json_lines("img_per_s", 3),))),
    ("python -m launch.bench model=schavae,schavae_lag data.batch_sets=16 data.set_size=5 device=cuda", Gpu("device=cuda")),
    ("python -m launch.bench model=schavae data.batch_sets=128 data.set_size=5 device=cuda", Gpu("device=cuda")),
    ("python -m launch.bench model=ns,cns,chfsgm data.batch_sets=100 data.set_size=5 device=cuda", Gpu("device=cuda")),
    ("python -m launch.bench model=vae data.batch_sets=100 data.set_size=1 device=cuda", Gpu("device=cuda")),
    ("python -m launch.bench model=schavae data.batch_sets=16 data.set_size=5 device=cuda "
     "trainer.precision=fp32,amp_bf16,bf16 trainer.channels_last=false trainer.guard_every=1", Gpu("device=cuda")),
    ("python -m launch.bench model=schavae data.batch_sets=16 data.set_size=5 device=cuda trainer.compile=true",
     Gpu("device=cuda")),
    ("python -m launch.bench_readers data.reader=resident data.device=cuda data.raw_dir=<omniglot dir>",
     Gpu("data.device=cuda")),
    ("torchrun --nproc_per_node=2", Mention("a launcher's flag in a sentence")),
    ("torchrun --max-restarts=1", Mention("a launcher's flag in a sentence")),
    ("deepspeed --no_local_rank --module", Mention("a launcher's flags in a sentence")),
    ("deepspeed --no_local_rank", Mention("a launcher's flag in a sentence")),
    ("python -m launch.torchrun ... -m launch.train", Mention("the shape of the pods' command, shown in full above")),
    ("python -m launch.serve", Mention("names the tool")),
    ("mlflow models serve", Mention("names MLflow's server")),
    ("python -m launch.plan", Mention("names the tool")),
    ("python -m launch.plan model=schavae_xl world_size=8 data.batch_sets=16 data.set_size=5 trainer.precision=bf16 "
     "trainer.zero_stage=3", Long("builds the 309M-parameter xl model and counts its FLOPs: ~40 s on 2 cores; "
                                  "tests/test_plan.py runs the calculator on s and m")),
    ("python -m launch.plan model=schavae_xl world_size=32 device_memory_gb=80 data.batch_sets=16 "
     "trainer.zero_stage=2 trainer.precision=bf16 [model.activation_checkpointing=blocks] "
     "[trainer.offload_optimizer=cpu] [bandwidth_gb_s=45] [device=cuda|cpu] [format=table|json]",
     Long("the xl model again, ~40 s")),
    ("python -m launch.plan ... device=cpu", Mention("the shape of the calculator's CPU prediction")),
    ("python -m launch.bench model=schavae_s data.batch_sets=4 data.set_size=5 trainer.zero_stage=0,1,2,3 "
     "model.activation_checkpointing=none,blocks trainer.precision=fp32 warmup=1 steps=2 eval=false",
     Long("a sweep of 8 configurations, one process each (appended values cannot shrink a sweep)")),
    ("python -m launch.bench model=schavae_m data.batch_sets=1 data.set_size=1 trainer.zero_stage=0,1,2,3 "
     "trainer.precision=fp32,bf16 warmup=1 steps=2 eval=false", Long("a sweep of 8 configurations, one process each")),
    ("python -m launch.bench model=schavae data.batch_sets=16 data.set_size=5 device=cpu trainer.precision=fp32",
     Run(BENCH, checks=(says(r'"precision": "fp32"'), json_lines("step_time_median_s")))),
    # docs/performance.md, trainer.compile=auto: the bench keeps what compile=auto reads
    ("python -m launch.bench <the run's overrides> trainer.compile=false,true",
     Covered("tests/test_compile.py::test_auto_compiles_a_run_only_after_the_bench_measured_its_configuration_paying",
             '"launch.bench"')),
    ("python -m launch.bench experiment=demo data.batch_sets=8 threads=2 warmup=2 steps=5 eval=false "
     "trainer.precision=fp32 trainer.compile=false,true",
     Long("inductor's cold compile of the demo model: ~2 minutes, then the eager and compiled steps")),
    ("python -m launch.bench experiment=demo data.batch_sets=16 threads=T warmup=2 steps=8 eval=false "
     "trainer.compile=false trainer.precision=fp32,amp_bf16",
     Long("a timing at each thread count, idle and with three busy processes taking the cores: meaningless beside "
          "the suite, and minutes at 3 busy processes")),
    ("torchrun --nproc_per_node=2 -m launch.bench model=schavae_m data.batch_sets=1 data.set_size=1 "
     "trainer.zero_stage=2 trainer.precision=bf16 warmup=1 steps=2 eval=false",
     Long("two ranks of schavae_m under torchrun: a process tree of its own, ~40 s on 2 cores")),
    ("python -m launch.bench model=<name> [data.batch_sets=..] [data.set_size=..] [trainer.precision=..] "
     "[trainer.zero_stage=..] [model.activation_checkpointing=..] [device=auto|cpu|cuda] [warmup=2] [steps=5] "
     "[eval=true]", Run(BENCH, fill={"<name>": "ns"}, checks=(json_lines("step_time_median_s"),))),
    ("python -m launch.bench model=schavae_s,schavae_m,schavae_l,schavae_xl data.batch_sets=16 data.set_size=5 "
     "trainer.precision=bf16 trainer.zero_stage=0 model.activation_checkpointing=none,blocks device=cuda",
     Gpu("device=cuda")),
    ("torchrun --nproc_per_node=8 -m launch.bench model=schavae_xl data.batch_sets=16 data.set_size=5 "
     "trainer.precision=bf16 trainer.zero_stage=0,1,2,3 model.activation_checkpointing=blocks device=cuda",
     Gpu("8 GPUs, device=cuda")),
    # --- docs/serving.md
    ("python -m launch.generate model_uri=models:/demo@champion images=my_character/ samples=20 mode=refined out=gen",
     Run("samples=2 iterations=1", checks=(file("gen/grid.png"), file("gen/generation.json")))),
    ("python -m launch.extract_set split=test index=0 images=5 out=<dir>",
     Run(fill={"<dir>": "extracted"}, checks=(pngs("extracted", 5),))),
    ("python -m launch.serve model_uri=models:/demo@champion host=127.0.0.1 port=5001 [tracking.uri=...]",
     Covered("tests/test_mlflow_server.py::test_served_requests_are_bounded_and_errors_never_echo_them",
             '"-m", "launch.serve"')),
    ("curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' "
     "-d @docs/examples/serving_request.json", Covered(SERVE_NODE, '"serving_request.json"')),
]
RUN = [(cmd, entry) for cmd, entry in TABLE if isinstance(entry, Run)]


def filled(cmd: str, run: Run) -> str:
    line = cmd
    for old, new in {**FILL, **run.fill}.items():
        line = line.replace(old, new)
    line = re.sub(r" \[[^\]]*\]", "", line)  # optional parts ([key=value], [overrides]); `=[5]` is a Hydra list
    assert "<" not in line and "$(" not in line, f"unfilled placeholder in {line}"
    return f"{line} {run.tiny}".strip()


# ------------------------------------------------------------------------------------------------ the table
def test_every_documented_command_is_in_exactly_one_category():
    commands = [cmd for cmd, _ in TABLE]
    twice = sorted({c for c in commands if commands.count(c) > 1})
    assert not twice, f"in the table twice: {twice}"
    docs = documented()
    missing = {c: d for c, d in docs.items() if c not in commands}
    assert not missing, ("documented commands in no category of TABLE (run them here, name the test that runs "
                         "them, or say why they cannot run):\n" + "\n".join(f"{d}: {c}" for c, d in missing.items()))
    stale = [c for c in commands if c not in docs]
    assert not stale, f"in TABLE but in no doc any more: {stale}"
    assert len(RUN) >= 35


def test_the_collector_sees_what_the_key_check_sees():
    """Every `python -m launch.<tool>` the key-check test reads is a command line here too."""
    from test_documented_commands import commands

    lines = " ".join(documented())
    for _, tool, args in commands():
        assert f"launch.{tool}" in lines


@pytest.mark.parametrize("cmd, entry", [(c, e) for c, e in TABLE if isinstance(e, Covered)])
def test_a_covering_test_exists(cmd, entry):
    path, name = entry.node.split("::")
    module = importlib.import_module(Path(path).stem)
    assert callable(getattr(module, name, None)), f"{entry.node} (for `{cmd}`) does not exist"
    assert entry.runs in (ROOT / path).read_text(), f"{entry.node}'s module has no {entry.runs}"


@pytest.mark.parametrize("cmd, entry", [(c, e) for c, e in TABLE if not isinstance(e, (Run, Serve, Covered))])
def test_what_does_not_run_here_says_why(cmd, entry):
    assert len(entry.why) > 8, cmd


def test_filling_keeps_the_command_and_appends_the_tiny_sizes():
    cmd, run = RUN[0]
    assert filled(cmd, run) == "python -m launch.prepare data=omniglot_ns data.raw_dir=../shared/data/omniglot"
    line = filled("python -m launch.bench_readers data.raw_dir=<omniglot dir> [data.num_workers=2] eval.set_sizes=[5]",
                  Run(READERS, fill={"<omniglot dir>": "x"}))
    assert line == "python -m launch.bench_readers data.raw_dir=x eval.set_sizes=[5] data.limit_batches=3"


# ------------------------------------------------------------------------------------------------ running them
def _user_images(folder: Path, n: int = 5) -> None:
    """Five drawings of one character straight from the Omniglot zip (105x105, dark strokes on white): what a
    user's folder holds, not the model's 28x28 ink-is-1 form."""
    folder.mkdir()
    with zipfile.ZipFile(shared_data() / "omniglot" / "images_evaluation.zip") as z:
        names = sorted(n for n in z.namelist() if n.endswith(".png"))[:n]
        for i, name in enumerate(names):
            (folder / f"{i}.png").write_bytes(z.read(name))


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> Dict[str, dict]:
    top = tmp_path_factory.mktemp("documented")
    ws = top / "ws"
    ws.mkdir()
    (top / "shared").symlink_to(shared_data().parent)
    _user_images(ws / "my_character")
    lines: List[str] = []
    for cmd, run in RUN:
        for line in (run.before, filled(cmd, run)):
            if line and line not in lines:  # two docs' forms of one command run once
                lines.append(line)
    (ws / "commands.json").write_text(json.dumps(lines))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store of the commands is the workspace's own
    proc = subprocess.run([sys.executable, str(DRIVER), "commands.json", "results.jsonl", "logs"], cwd=ws, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in (ws / "results.jsonl").read_text().splitlines()]
    assert [r["command"] for r in results] == lines
    return {"ws": ws, **{r["command"]: r for r in results}}


@pytest.mark.parametrize("cmd, run", RUN, ids=[f"{i:02d}-{cmd.split(' -m ')[-1].split()[0]}"
                                               for i, (cmd, _) in enumerate(RUN)])
def test_a_documented_command_runs_as_written(ran, cmd, run):
    line = filled(cmd, run)
    result = ran[line]
    out = (ran["ws"] / result["log"]).read_text()
    assert result["code"] == 0, f"`{line}` exited {result['code']}:\n{out[-5000:]}"
    for check in run.checks:
        try:
            check(ran["ws"], out)
        except AssertionError as exc:
            pytest.fail(f"`{line}`: {exc}\n--- its output\n{out[-3000:]}")


@pytest.mark.parametrize("cmd, serve", [(c, e) for c, e in TABLE if isinstance(e, Serve)])
def test_a_documented_server_answers(ran, cmd, serve, tmp_path):
    import urllib.request

    port = free_port()
    words = shlex.split(f"{cmd} {serve.tiny.format(port=port)}")
    log = tmp_path / "server.log"
    proc = start_process([str(Path(sys.executable).with_name(words[0])), *words[1:]], ran["ws"], log)
    try:
        url = f"http://127.0.0.1:{port}{serve.probe}"
        wait_http(url, proc, log, timeout=120)
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = resp.read().decode()
        assert serve.expect in body.replace('":"', '": "'), body[:2000]
    finally:
        stop_process(proc)
