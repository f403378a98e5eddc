"""Generation in worker processes, so that one costly request cannot hold the server (issue 33).

Why processes, not threads: sampling draws from torch's process-global random stream, and a request's answer
must depend on its seed alone; in one process that needs one request at a time (the lock this replaces), and a
large request then kept every other one -- and, with the CPU saturated, `/ping` -- waiting for minutes. Each worker
process has its own stream and its own copy of the model: requests run side by side, and the server's own process
(which answers `/ping`) does no generation. A request still running at its deadline (the scoring server's request
timeout, after which the client has had its 504) has its worker killed and replaced, so the work stops with the
answer nobody waits for. Our own small pool, because concurrent.futures' and multiprocessing's pools cannot stop one
running task.
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional

from trainer.serving.generation import GenerationError


def _worker(package: str, threads: int, conn) -> None:
    """A worker's loop: requests in, (samples, elbo) or ("error", message) out."""
    import torch

    from trainer.registry.package import read_package
    from trainer.serving.generation import generate, set_elbo

    torch.set_num_threads(threads)
    model, card = read_package(Path(package))
    conn.send(("ready", None))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        try:
            x = torch.from_numpy(request["x"])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(request["seed"])
                if card.inputs.binarize:
                    x = torch.bernoulli(x)
                out = generate(model, x, request["samples"], request["mode"], request["iterations"])
                elbo = set_elbo(model, x)
            conn.send(("ok", (out.numpy(), elbo.numpy())))
        except GenerationError as exc:
            conn.send(("refused", str(exc)))
        except Exception as exc:  # noqa: BLE001 -- reported to the caller, the worker lives on
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class _Worker:
    def __init__(self, ctx, package: str, threads: int) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(package, threads, child), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False

    def wait_ready(self, timeout: float) -> None:
        if not self.ready:
            if not self.conn.poll(timeout):
                raise TimeoutError("a generation worker did not load the model in time")
            self.conn.recv()
            self.ready = True

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class GenerationPool:
    """`workers` processes, each with the model of `package` and `threads` intra-op threads."""

    def __init__(self, package: Path, workers: int = 2, threads: int = 1, start_timeout_s: float = 300.0) -> None:
        if workers < 1 or threads < 1:
            raise ValueError(f"workers and threads must be >= 1, got {workers}, {threads}")
        self.package, self.threads = str(package), threads
        self._ctx = mp.get_context("spawn")  # never fork a process that holds torch's thread pools
        self._idle: "queue.Queue[_Worker]" = queue.Queue()
        self._lock = threading.Lock()
        self._all = [_Worker(self._ctx, self.package, threads) for _ in range(workers)]
        for w in self._all:
            w.wait_ready(start_timeout_s)
            self._idle.put(w)

    def run(self, request: Dict[str, Any], deadline_s: float) -> Any:
        """The worker's answer to `request` (see `_worker`), or TimeoutError once `deadline_s` (seconds from
        now) passed: waiting for a free worker counts, and a worker still busy then is replaced."""
        end = time.monotonic() + deadline_s
        try:
            worker = self._idle.get(timeout=max(0.0, end - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"no generation worker became free within {deadline_s:.0f} s") from None
        try:
            worker.conn.send(request)
            if not worker.conn.poll(max(0.0, end - time.monotonic())):
                raise TimeoutError(f"the request was still running after {deadline_s:.0f} s: its worker was "
                                   "stopped")
            status, payload = worker.conn.recv()
        except (TimeoutError, EOFError, OSError):
            self._replace(worker)
            raise
        self._idle.put(worker)
        if status == "refused":
            raise GenerationError(payload)
        if status == "error":
            raise RuntimeError(payload)
        return payload

    def _replace(self, worker: _Worker) -> None:
        """Kill a worker that overran (or died) and start another in the background; it joins the idle ones once
        its model is loaded."""
        worker.kill()
        fresh = _Worker(self._ctx, self.package, self.threads)
        with self._lock:
            self._all = [w for w in self._all if w is not worker] + [fresh]

        def join() -> None:
            try:
                fresh.wait_ready(300.0)
            except TimeoutError:
                fresh.kill()
                return
            self._idle.put(fresh)

        threading.Thread(target=join, daemon=True).start()

    def close(self) -> None:
        for w in self._all:
            w.kill()


def request_timeout_s(default: float = 60.0) -> float:
    """The scoring server's request timeout (MLflow's MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT): past it the client
    has its 504, so the work stops then."""
    import os

    try:
        return float(os.environ.get("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", default))
    except ValueError:
        return default


def pool_settings(env: Optional[dict] = None) -> Dict[str, int]:
    """Workers and threads per worker: SCHA_SERVE_WORKERS / SCHA_SERVE_THREADS (launch.serve's `workers=` and
    `threads=` set them); default 2 workers sharing the usable cores."""
    import os

    from trainer.threads import usable_cores

    env = os.environ if env is None else env
    workers = int(env.get("SCHA_SERVE_WORKERS", "2"))
    threads = int(env.get("SCHA_SERVE_THREADS", "0")) or max(1, usable_cores() // workers)
    return {"workers": workers, "threads": threads}
