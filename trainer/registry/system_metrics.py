"""MLflow's own system metrics (CPU, memory, disk, network; GPU where MLflow finds one) on a run: what its run
page shows under "System metrics", as `system/<metric>`, or `system/node<N>/<metric>` per node of a multi-node job.

MLflow's SystemMetricsMonitor does the sampling; we start one per node for a run we opened with MlflowClient
(mlflow.start_run's `log_system_metrics` covers only runs it opens itself). On by default: `tracking.system_metrics`,
or MLflow's own MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false, turns it off. The monitor stops at the first failure to
reach the store; its samples are not replayed after an outage (the training's own metrics are).
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Optional

from trainer import distributed
from trainer.config import TrackingConfig
from trainer.registry import store

log = logging.getLogger(__name__)

ENV_SWITCH = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"


def wanted(cfg: TrackingConfig) -> bool:
    return cfg.enabled and cfg.system_metrics and os.environ.get(ENV_SWITCH, "").strip().lower() not in ("false", "0")


def multi_node() -> bool:
    return distributed.node_rank() is not None


def node_name() -> Optional[str]:
    """`node<N>` on a multi-node job, None on one node: the metric keys then stay MLflow's plain
    `system/<metric>`."""
    rank = distributed.node_rank()
    return None if rank is None else f"node{rank}"


class SystemMetrics:
    """One monitor for this node's side of a run; `stop` logs the last samples (before the run is ended)."""

    def __init__(self, cfg: TrackingConfig) -> None:
        self.cfg = cfg
        self.monitor = None

    def start(self, run_id: str, tracking_uri: str, resumed: bool) -> None:
        if self.monitor is not None or not wanted(self.cfg):
            return
        # its start/stop notes are MLflow's INFO lines: kept out of the command's output
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=self.cfg.system_metrics_interval_s,
                                                resume_logging=resumed, node_id=node_name(),
                                                tracking_uri=tracking_uri)
            self.monitor.start()
        except Exception as exc:  # psutil missing, a store error: the run goes on without them
            log.warning("MLflow system metrics not started (%s: %s)", type(exc).__name__, exc)
            self.monitor = None

    def stop(self) -> None:
        if self.monitor is not None:
            try:
                self.monitor.finish()
                # MLflow's loop drops the samples of its last, unfinished interval at shutdown: a run shorter
                # than one interval (an evaluation) would show none
                last = self.monitor.aggregate_metrics()
                if last:
                    self.monitor.publish_metrics(last)
                    self.monitor.mlflow_logger.flush()
            except Exception as exc:
                log.warning("MLflow system metrics: the last samples were not logged (%s: %s)", type(exc).__name__,
                            exc)
            self.monitor = None


@contextlib.contextmanager
def sampled(cfg: TrackingConfig, run_id: str) -> Iterator[None]:
    """This process's system metrics on run `run_id` (none for an empty id) while the block runs; stopped, with its
    last samples logged, when the block ends, so before the caller ends the run."""
    metrics = SystemMetrics(cfg)
    if run_id:
        metrics.start(run_id, store.tracking_uri(cfg), resumed=False)
    try:
        yield
    finally:
        metrics.stop()
