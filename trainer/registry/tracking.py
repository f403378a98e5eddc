"""Rank-0 MLflow tracking that never blocks or breaks training.

Every MLflow call, opening the run included, runs in order on one background thread, so a run starts (and a
preempted run resumes) while the tracking server is down. When the server is unreachable the thread keeps the
calls queued, warns once, retries with backoff and sends them when the server is back; whatever is still
queued when the run ends (after `tracking.flush_timeout_s`) is written to `<run_dir>/tracking_fallback.jsonl`,
model packages included (`<run_dir>/to_register/`). A preempted run (SIGTERM) waits at most
`tracking.preempt_flush_s`, and not at all during an outage, so the file is written well inside a grace period.
The next start of the run replays that file, and `python -m launch.sync_tracking <run_dir>` replays it for a run
that will not start again; both also register every complete package left in `to_register/` that the file does
not name (a run killed before it could write the file). A call the store
refuses for good (a 4xx, or a bug) goes to the fallback file at once instead of blocking the queue.
The step records are also in `<run_dir>/metrics.jsonl`.

The run directory remembers its MLflow run and the store it lives in (`mlflow_run.json`); a restart against
another store, or after the run was deleted, continues in a new MLflow run with a warning.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import shutil
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Union

from trainer.config import TrackingConfig
from trainer.metrics import STEP_KEYS, jsonable
from trainer.registry.package import ModelCard, write_package
from trainer.registry.store import (Backoff, bound_http_requests, describe_store, first_line, mlflow_log_to,
                                    point_mlflow_at, run_link, tracking_uri, transient, use_store)
from trainer.registry.system_metrics import SystemMetrics

FALLBACK = "tracking_fallback.jsonl"

log = logging.getLogger(__name__)


@dataclass
class _Call:
    what: str  # open | metrics | model | end
    payload: Any  # JSON: all a replay needs
    future: Future = field(default_factory=Future)


class _Sender(threading.Thread):
    """Runs queued calls in order; a call that fails for an outage stays at the head and is retried with
    backoff, one refused for good is handed to `on_refused` and dropped from the queue."""

    def __init__(self, perform: Callable[[_Call], Any], on_refused: Callable[[_Call, BaseException], None],
                 retry_s: float) -> None:
        super().__init__(name="mlflow-sender", daemon=True)
        self.perform, self.on_refused = perform, on_refused
        self.queue: Deque[_Call] = collections.deque()
        self.cv = threading.Condition()
        self.backoff = Backoff(retry_s)
        self.closing = False
        self.outage_since: Optional[float] = None
        self.last_error = ""  # of the current outage

    def submit(self, call: _Call) -> Future:
        with self.cv:
            self.queue.append(call)
            self.cv.notify()
        return call.future

    def run(self) -> None:
        while True:
            with self.cv:
                while not self.queue and not self.closing:
                    self.cv.wait()
                if not self.queue:
                    return
                call = self.queue[0]
            try:
                result = self.perform(call)
            except Exception as exc:
                if not transient(exc):
                    with self.cv:
                        self.queue.popleft()
                    self.on_refused(call, exc)
                    call.future.set_exception(exc)
                    continue
                self.last_error = f"{type(exc).__name__}: {first_line(exc, 200)}"
                if self.outage_since is None:
                    self.outage_since = time.monotonic()
                    log.warning("MLflow tracking unavailable (%s: %s); buffering and retrying, training goes on",
                                type(exc).__name__, first_line(exc, 200))
                with self.cv:
                    if self.closing == "abandon":
                        return
                    self.cv.wait(self.backoff.next())
                continue
            if self.outage_since is not None:
                log.warning("MLflow tracking is back after %.0f s; sending %d buffered calls",
                            time.monotonic() - self.outage_since, len(self.queue))
                self.outage_since = None
            self.backoff.reset()
            with self.cv:
                self.queue.popleft()
            call.future.set_result(result)

    def close(self, timeout: float, cap_s: float = 600.0) -> List[_Call]:
        """Wait for the queue to drain while the store answers; give up once it has been unreachable for
        `timeout` during the wait (or after `cap_s` in all); return the calls that never went through.

        A store that answers slowly (a new sqlite store creating its tables on a loaded machine) is waited
        for: only an outage, not a slow first call, sends the rest of the run to the fallback file."""
        with self.cv:
            self.closing = True
            self.cv.notify()
        start = time.monotonic()
        while self.is_alive():
            self.join(0.05)
            now = time.monotonic()
            outage = self.outage_since is not None and now - max(self.outage_since, start) >= timeout
            if outage or now - start >= cap_s:
                break
        with self.cv:
            self.closing = "abandon"
            self.cv.notify()
            left = list(self.queue)
        return left


REGISTER = "register.json"  # in a package under to_register/: the registration call it waits for


def orphan_packages(run_dir: Path, entries: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Registration calls for the complete packages in `<run_dir>/to_register/` that `entries` do not name
    (a start killed before writing its fallback file left them), oldest checkpoint first."""
    named = {e["payload"].get("package") for e in entries if e["what"] == "model"}
    found = []
    run_dir = Path(run_dir)
    named = {str(run_dir / p) for p in named if p}
    for meta in sorted(run_dir.glob(f"to_register/*/{REGISTER}")):
        payload = json.loads(meta.read_text())
        payload["package"] = str(meta.parent.relative_to(run_dir))
        if str(meta.parent) not in named:
            found.append({"what": "model", "payload": payload})
    return sorted(found, key=lambda e: e["payload"]["tag"])


def read_fallback(run_dir: Path) -> List[Dict[str, Any]]:
    """The calls a previous start of this run could not send (oldest first); the file is moved aside, and
    removed once they went through (tracking_fallback.replaying.jsonl is read too after a crash)."""
    run_dir = Path(run_dir)
    entries = []
    for path in (run_dir / "tracking_fallback.replaying.jsonl", run_dir / FALLBACK):
        if path.is_file():
            entries += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if entries:
        replaying = run_dir / "tracking_fallback.replaying.jsonl"
        replaying.write_text("".join(json.dumps(e) + "\n" for e in entries))
        (run_dir / FALLBACK).unlink(missing_ok=True)
    return entries


def _last_steps(client, run_id: str) -> Dict[str, int]:
    """Metric key -> the highest step the store holds for it in run `run_id`."""
    keys = client.get_run(run_id).data.metrics
    return {k: max((m.step for m in client.get_metric_history(run_id, k)), default=-1) for k in keys}


class Tracker:
    """No-op unless enabled (rank 0 with tracking on). The MLflow run id is kept in the run directory."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path, enabled: bool) -> None:
        self.cfg = cfg
        self.enabled = enabled and cfg.enabled
        self.run_dir = Path(run_dir)
        self.id_file = self.run_dir / "mlflow_run.json"
        self.run_id: Optional[str] = None
        self.sender: Optional[_Sender] = None
        # metric key -> the last step the store holds for it (a resumed run's MLflow run): points at or before
        # it are not sent again. A resume re-runs the steps after its checkpoint with identical values, and a
        # killed start cannot tell which of its queued calls arrived; the store itself can.
        self.stored_through: Dict[str, int] = {}
        self.system = SystemMetrics(cfg)
        self.link = ""  # the run's page in the UI of a tracking server, once the run is open
        self.monitor_system = False

    @property
    def registering(self) -> bool:
        return self.enabled and self.cfg.register

    def _submit(self, what: str, payload: Any) -> Optional[Future]:
        if not self.enabled:
            return None
        return self.sender.submit(_Call(what, payload))

    def start(self, run_name: str, params: Dict[str, object], config_file: Path,
              dataset_dir: Optional[Union[Path, str]] = None, replay_end: bool = False,
              monitor_system: bool = False) -> None:
        """Queue the opening of the run (a new one, or on resume the one in mlflow_run.json) and the replay of
        an earlier start's fallback file; nothing here waits for the store, so an outage never stops a start.

        A new run gets the source and git commit tags and the prepared dataset under `dataset_dir` as its
        training dataset input (trainer/registry/mlflow_model.py). `replay_end` also replays the earlier start's end of
        run (launch.sync_tracking); a training start drops it, the run being live again. `monitor_system`: this
        process is the run's work (a training), so MLflow's system metrics of this node go on the run once open."""
        if not self.enabled:
            return
        self.monitor_system = monitor_system
        from trainer.registry.mlflow_model import DatasetRecord, source_tags

        bound_http_requests()
        import mlflow

        mlflow_log_to(self.run_dir / "mlflow.log")  # after the import, which configures MLflow's logger

        point_mlflow_at(tracking_uri(self.cfg))
        log.info("MLflow store %s", describe_store(self.cfg))
        dataset = DatasetRecord.from_manifest(dataset_dir) if dataset_dir is not None else None
        self.sender = _Sender(self._perform, self._refused, self.cfg.retry_s)
        self.sender.start()
        self._submit("open", {"run_name": run_name, "params": {k: str(v)[:6000] for k, v in params.items()},
                              "tags": source_tags("launch.train"), "config_file": str(config_file),
                              "dataset": asdict(dataset) if dataset else None})
        replayed = [e for e in read_fallback(self.run_dir) if e["what"] != "open" and (replay_end or e["what"] != "end")]
        orphans = orphan_packages(self.run_dir, replayed)
        if orphans:
            log.warning("registering %d model package(s) that an earlier start of this run left in %s: %s",
                        len(orphans), self.run_dir / "to_register", ", ".join(e["payload"]["tag"] for e in orphans))
            at = len(replayed) - 1 if replayed and replayed[-1]["what"] == "end" else len(replayed)
            replayed[at:at] = orphans
        if replayed:
            log.warning("replaying %d MLflow calls that an earlier start of this run could not send",
                        len(replayed))
            futures = [self._submit(e["what"], e["payload"]) for e in replayed]
            futures[-1].add_done_callback(
                lambda f: (self.run_dir / "tracking_fallback.replaying.jsonl").unlink(missing_ok=True))

    # -- what each queued call does (in the sender thread) --------------------------------------------
    def _perform(self, call: _Call) -> Any:
        return getattr(self, f"_do_{call.what}")(call.payload)

    def _refused(self, call: _Call, exc: BaseException) -> None:
        from mlflow.exceptions import MlflowException

        log.error("MLflow refused a %s call (%s: %s); it is kept in %s", call.what, type(exc).__name__,
                  first_line(exc), self.run_dir / FALLBACK,
                  exc_info=not isinstance(exc, MlflowException))  # a bug of ours: show where
        self._write_fallback([call], f"refused by the store: {type(exc).__name__}: {first_line(exc)}")

    def _do_open(self, p: Dict[str, Any]) -> str:
        import mlflow
        from mlflow.exceptions import MlflowException

        from trainer.registry.mlflow_model import DatasetRecord

        use_store(self.cfg)
        client = mlflow.MlflowClient()
        uri = mlflow.get_tracking_uri()
        saved = json.loads(self.id_file.read_text()) if self.id_file.exists() else {}
        run_id = saved.get("run_id")
        if run_id and saved.get("tracking_uri", uri) != uri:
            log.warning("this run directory's MLflow run %s lives in %s, not in %s: continuing in a new MLflow "
                        "run there", run_id, saved.get("tracking_uri"), uri)
            run_id = None
        if run_id:
            try:
                gone = client.get_run(run_id).info.lifecycle_stage == "deleted"
            except MlflowException as exc:
                if str(exc.error_code) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                gone = True
            if gone:
                log.warning("MLflow run %s of this run directory is gone from %s (deleted?): continuing in a new "
                            "MLflow run", run_id, uri)
                run_id = None
        if run_id:
            client.update_run(run_id, status="RUNNING")
            self.stored_through = _last_steps(client, run_id)
        else:
            exp = mlflow.get_experiment_by_name(self.cfg.experiment)
            run_id = client.create_run(exp.experiment_id, run_name=p["run_name"], tags=p["tags"]).info.run_id
            client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in p["params"].items()])
            if p.get("dataset"):
                client.log_inputs(run_id, datasets=[DatasetRecord(**p["dataset"]).to_input()])
        self.link = run_link(uri, client.get_run(run_id).info.experiment_id, run_id)
        resumed = saved.get("run_id") == run_id  # an earlier start's run: its system metrics go on after its steps
        self.run_id = run_id
        self.id_file.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
        if self.monitor_system:
            self.system.start(run_id, uri, resumed=resumed)
        if Path(p["config_file"]).is_file():
            client.log_artifact(run_id, p["config_file"])
        return run_id

    def _do_metrics(self, rows: List[list]) -> None:
        import mlflow
        from mlflow.entities import Metric

        client = mlflow.MlflowClient()
        metrics = [Metric(k, math.nan if v is None else v, ts, step) for k, v, ts, step in rows
                   if step > self.stored_through.get(k, -1)]
        for i in range(0, len(metrics), 1000):  # the server's per-request limit
            client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def _do_model(self, p: Dict[str, Any]) -> str:
        import numpy as np

        from trainer.registry.mlflow_model import log_packaged_model
        from trainer.registry.package import CARD, WEIGHTS, read_card

        package = self.run_dir / p["package"]  # relative to the run directory (absolute in older fallbacks)
        files = {"weights": package / WEIGHTS, "card": package / CARD}
        card = read_card(package)
        card.training_run_id = self.run_id
        files["card"].write_text(card.to_json())
        example = np.load(package / "example.npy", allow_pickle=False)
        version = log_packaged_model(self.run_id, files, card, p["model_name"], tuple(p["aliases"]), p["tag"],
                                     example)
        shutil.rmtree(package, ignore_errors=True)
        return version

    def _do_artifact(self, p: Dict[str, Any]) -> None:
        import mlflow

        if Path(p["path"]).is_file():
            mlflow.MlflowClient().log_artifact(self.run_id, p["path"], p.get("artifact_path"))

    def _do_end(self, status: str) -> None:
        import mlflow

        self.system.stop()  # its last samples, while the run still accepts them
        mlflow.MlflowClient().set_terminated(self.run_id, status)

    # -- what the trainer calls (rank 0; never waits on MLflow) -------------------------------------------
    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._log([(k, float(v), now, step) for k, v in metrics.items()])

    def log_steps(self, records: List[Dict[str, float]]) -> None:
        """One batched request for a whole flush of per-step records."""
        now = int(time.time() * 1000)
        self._log([(f"train/{k}", float(r[k]), now, int(r["step"]))
                   for r in records for k in STEP_KEYS + ("lr", "img_per_s", "skipped")])

    def _log(self, rows: List[tuple]) -> None:
        # non-finite values are MLflow's to refuse or clamp; the fallback file keeps them as null
        self._submit("metrics", [list(r) for r in rows])

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        """Send a file of the run directory (a figure, the log) to the run's artifacts, in order with the rest."""
        self._submit("artifact", {"path": str(path), "artifact_path": artifact_path})

    def register_model(self, state: Dict[str, Any], card: ModelCard, model_name: str, aliases: tuple, tag: str,
                       input_example: Any) -> Optional[Future]:
        """Log a checkpoint as an MLflow model (trainer/registry/package.py: safetensors + model card, served by
        trainer/serving/pyfunc.py as a models-from-code pyfunc) and register it as a new version with `aliases`.

        `state` is a CPU copy of the weights taken by the caller (training goes on changing them); it is
        written to `<run_dir>/to_register/<tag>-*` now (the sender may run much later, or a later start may
        replay it); nothing here builds a model or draws a random number, so registering leaves training
        exactly as it was. Returns a future of the registry version (None when tracking is off)."""
        if not self.registering:
            return None
        import tempfile

        import numpy as np

        (self.run_dir / "to_register").mkdir(exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=self.run_dir / "to_register"))
        write_package(staging, state, card)
        np.save(staging / "example.npy", np.asarray(input_example, dtype=np.float32), allow_pickle=False)
        # the package as a path inside the run directory: a copied or moved run directory replays its own
        payload = {"model_name": model_name, "tag": tag, "aliases": list(aliases),
                   "package": str(staging.relative_to(self.run_dir))}
        # written last: a package with it is complete, and registered by a later start if this one is killed
        (staging / REGISTER).write_text(json.dumps(payload))
        return self._submit("model", payload)

    def end(self, status: Optional[str] = "FINISHED", preempted: bool = False) -> None:
        """Finish the run (status None: only send what is queued); what cannot reach the store in time goes
        to tracking_fallback.jsonl: after tracking.flush_timeout_s, or when preempted after
        tracking.preempt_flush_s, at once while the store is unreachable."""
        if not self.enabled or self.sender is None:
            return
        if status is not None:
            self._submit("end", status)
        if preempted:  # a grace period: no wait during an outage, at most preempt_flush_s otherwise
            cap = min(self.cfg.flush_timeout_s, self.cfg.preempt_flush_s)
            left = self.sender.close(0.0, cap_s=cap)
            reason = (f"not sent before the run stopped on SIGTERM (tracking.preempt_flush_s={cap:g}; last error "
                      f"{self.sender.last_error or 'none'})")
        else:
            left = self.sender.close(self.cfg.flush_timeout_s)
            reason = (f"not sent by the end of the run: the store was unreachable for {self.cfg.flush_timeout_s:g} s "
                      f"(tracking.flush_timeout_s; last error {self.sender.last_error or 'none'})")
        if left:
            self._write_fallback(left, reason)
            # every call still pending is in the fallback now, the replayed ones among them
            (self.run_dir / "tracking_fallback.replaying.jsonl").unlink(missing_ok=True)
            log.warning("MLflow unreachable at the end of the run: %d calls written to %s (sent by the next "
                        "start of this run, or by `python -m launch.sync_tracking %s`)", len(left),
                        self.run_dir / FALLBACK, self.run_dir)

    def _write_fallback(self, calls: List[_Call], reason: str) -> None:
        with (self.run_dir / FALLBACK).open("a") as f:
            for call in calls:
                f.write(json.dumps({"run_id": self.run_id, "what": call.what, "reason": reason,
                                    "payload": jsonable(call.payload)}, allow_nan=False) + "\n")
