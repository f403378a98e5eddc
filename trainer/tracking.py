"""Rank-0 MLflow tracking that never blocks or breaks training.

Every MLflow call runs, in order, on one background thread. When the tracking server is unreachable the
thread keeps the calls queued, warns once, retries with backoff and replays them when the server is back;
whatever is still queued when the run ends (after `tracking.flush_timeout_s`) is written to
`<run_dir>/tracking_fallback.jsonl`. The step records are also in `<run_dir>/metrics.jsonl`, so nothing is lost.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional

from trainer.config import TrackingConfig
from trainer.metrics import STEP_KEYS
from trainer.model_package import ModelCard, write_package

log = logging.getLogger(__name__)


def tracking_uri(cfg: TrackingConfig) -> str:
    if cfg.uri:
        return cfg.uri
    root = Path(cfg.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root}/mlflow.db"


def use_store(cfg: TrackingConfig) -> None:
    """Point MLflow at the configured store (and create the experiment with a local artifact root)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    if mlflow.get_experiment_by_name(cfg.experiment) is None:
        location = None if cfg.uri else (Path(cfg.root).resolve() / "artifacts").as_uri()
        mlflow.create_experiment(cfg.experiment, artifact_location=location)
    mlflow.set_experiment(cfg.experiment)


@dataclass
class _Call:
    what: str
    fn: Callable[[], Any]
    payload: Any = None  # what goes to the fallback file if the call never succeeds
    future: Future = field(default_factory=Future)


class _Sender(threading.Thread):
    """Runs queued calls in order; a failing call stays at the head and is retried with backoff."""

    def __init__(self, retry_s: float) -> None:
        super().__init__(name="mlflow-sender", daemon=True)
        self.queue: Deque[_Call] = collections.deque()
        self.cv = threading.Condition()
        self.retry_s = retry_s
        self.closing = False
        self.outage_since: Optional[float] = None

    def submit(self, call: _Call) -> Future:
        with self.cv:
            self.queue.append(call)
            self.cv.notify()
        return call.future

    def run(self) -> None:
        delay = self.retry_s
        while True:
            with self.cv:
                while not self.queue and not self.closing:
                    self.cv.wait()
                if not self.queue:
                    return
                call = self.queue[0]
            try:
                result = call.fn()
            except Exception as exc:  # network errors, 5xx, timeouts: keep the call and retry
                if self.outage_since is None:
                    self.outage_since = time.monotonic()
                    log.warning("MLflow tracking unavailable (%s: %s); buffering and retrying, training goes on",
                                type(exc).__name__, str(exc).splitlines()[0][:200])
                with self.cv:
                    if self.closing == "abandon":
                        return
                    self.cv.wait(delay)
                delay = min(delay * 2, 30.0)
                continue
            if self.outage_since is not None:
                log.warning("MLflow tracking is back after %.0f s; replaying %d buffered calls",
                            time.monotonic() - self.outage_since, len(self.queue))
                self.outage_since = None
            delay = self.retry_s
            with self.cv:
                self.queue.popleft()
            call.future.set_result(result)

    def close(self, timeout: float) -> List[_Call]:
        """Wait up to `timeout` for the queue to drain; return the calls that never went through."""
        with self.cv:
            self.closing = True
            self.cv.notify()
        self.join(timeout)
        with self.cv:
            self.closing = "abandon"
            self.cv.notify()
            left = list(self.queue)
        return left


class Tracker:
    """No-op unless enabled (rank 0 with tracking on). The MLflow run id is kept in the run directory."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path, enabled: bool) -> None:
        self.cfg = cfg
        self.enabled = enabled and cfg.enabled
        self.run_dir = Path(run_dir)
        self.id_file = self.run_dir / "mlflow_run.json"
        self.run_id: Optional[str] = None
        self.sender: Optional[_Sender] = None

    def _submit(self, what: str, fn: Callable[[], Any], payload: Any = None) -> Optional[Future]:
        if not self.enabled:
            return None
        return self.sender.submit(_Call(what, fn, payload))

    @property
    def registering(self) -> bool:
        return self.enabled and self.cfg.register

    def start(self, run_name: str, params: Dict[str, object], config_file: Path,
              dataset_dir: Optional[Path] = None) -> None:
        """Open (or, on resume, reopen) the run; the store must answer now, so a wrong URI fails fast.

        A new run gets the source and git commit tags and the prepared dataset under `dataset_dir` as its
        training dataset input (trainer/model_card.py)."""
        if not self.enabled:
            return
        import mlflow

        from trainer.model_card import DatasetRecord, source_tags

        tags = source_tags("launch.train")
        dataset = DatasetRecord.from_manifest(dataset_dir) if dataset_dir is not None else None

        # our sender retries; MLflow's own retries would stall each call for minutes during an outage
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        use_store(self.cfg)
        previous = json.loads(self.id_file.read_text())["run_id"] if self.id_file.exists() else None
        client = mlflow.MlflowClient()
        if previous is None:
            exp = mlflow.get_experiment_by_name(self.cfg.experiment)
            self.run_id = client.create_run(exp.experiment_id, run_name=run_name, tags=tags).info.run_id
            client.log_batch(self.run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])
            if dataset is not None:
                client.log_inputs(self.run_id, datasets=[dataset.to_input()])
        else:
            self.run_id = previous
            client.update_run(self.run_id, status="RUNNING")
        self.id_file.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": mlflow.get_tracking_uri()}))
        client.log_artifact(self.run_id, str(config_file))
        self.sender = _Sender(self.cfg.retry_s)
        self.sender.start()

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._log([(k, float(v), now, step) for k, v in metrics.items()])

    def log_steps(self, records: List[Dict[str, float]]) -> None:
        """One batched request for a whole flush of per-step records."""
        now = int(time.time() * 1000)
        self._log([(f"train/{k}", float(r[k]), now, int(r["step"]))
                   for r in records for k in STEP_KEYS + ("lr", "img_per_s", "skipped")])

    def _log(self, rows: List[tuple]) -> None:
        if not self.enabled:
            return
        import mlflow
        from mlflow.entities import Metric

        def send() -> None:
            client = mlflow.MlflowClient()
            metrics = [Metric(*row) for row in rows]
            for i in range(0, len(metrics), 1000):  # the server's per-request limit
                client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

        self._submit("metrics", send, payload=rows)

    def register_model(self, state: Dict[str, Any], card: ModelCard, model_name: str, aliases: tuple, tag: str,
                       input_example: Any) -> Optional[Future]:
        """Log a checkpoint as an MLflow model (trainer/model_package.py: safetensors + model card, served by
        trainer/serving.py as a models-from-code pyfunc) and register it as a new version with `aliases`.

        `state` is a CPU copy of the weights taken by the caller (training goes on changing them); nothing here
        builds a model or draws a random number, so registering leaves training exactly as it was.
        Returns a future of the registry version (None when tracking is off)."""
        if not (self.enabled and self.cfg.register):
            return None
        import tempfile

        from trainer.model_card import log_packaged_model

        (self.run_dir / "to_register").mkdir(exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=self.run_dir / "to_register"))
        files = write_package(staging, state, card)  # written now: the sender may run much later
        run_id = self.run_id

        def send() -> str:
            version = log_packaged_model(run_id, files, card, model_name, aliases, tag, input_example)
            shutil.rmtree(staging, ignore_errors=True)
            return version

        return self._submit("model", send, payload={"model_name": model_name, "tag": tag, "aliases": aliases,
                                                     "package": str(staging)})

    def end(self, status: str = "FINISHED") -> None:
        """Finish the run; what cannot reach the store in time goes to tracking_fallback.jsonl."""
        if not self.enabled or self.sender is None:
            return
        import mlflow

        self._submit("end", lambda: mlflow.MlflowClient().set_terminated(self.run_id, status), payload=status)
        left = self.sender.close(self.cfg.flush_timeout_s)
        if left:
            fallback = self.run_dir / "tracking_fallback.jsonl"
            with fallback.open("a") as f:
                for call in left:
                    f.write(json.dumps({"run_id": self.run_id, "what": call.what, "payload": call.payload}) + "\n")
            log.warning("MLflow unreachable at the end of the run: %d calls written to %s", len(left), fallback)
