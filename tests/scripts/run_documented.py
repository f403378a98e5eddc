"""Run `python -m <module> ...` command lines one after another in this one process, each as `python -m` would
run it (runpy: the module's own `if __name__ == "__main__"` block, sys.argv as the shell would split it), and
write one JSON line per command: its exit code, wall time and the file holding its output.

    python tests/scripts/run_documented.py COMMANDS.json RESULTS.jsonl LOG_DIR

COMMANDS.json: a list of command lines. One process for all of them because importing torch, DeepSpeed and
MLflow costs 8-15 s per process; what a command leaves behind in the process that a fresh `python -m` would not
see is undone after each one (`_fresh`), so every command starts as if alone.
"""
from __future__ import annotations

import json
import logging
import os
import runpy
import shlex
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def _output_to(path: Path):
    """Both fds, not only sys.stdout: Hydra's log handlers, tqdm and C++ (gloo, oneDNN) write there too."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "wb") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@contextmanager
def _fresh():
    """Undo what a command leaves in the process. Hydra clears its GlobalHydra itself after each @hydra.main
    call, but: trainer.distributed.init exports RANK / LOCAL_RANK / MASTER_PORT for a plain process, which the
    next command would read as a launcher's (LOCAL_RANK makes it watch its parent as a torchrun worker would);
    a training's process group, MLflow's active run and global tracking URI outlive the call; our file log
    handlers (train.log, mlflow.log) would collect the next command's lines; launch.bench sets torch's thread
    count; the guard installs a SIGTERM handler; and launch.app._composed, once set, would turn Hydra's own
    config errors (exit 1) of a later command into exit 1 instead of the config error code."""
    import mlflow
    import torch
    import torch.distributed as dist

    env = dict(os.environ)
    handlers = {name: list(lg.handlers) for name, lg in _loggers()}
    levels = {name: lg.level for name, lg in _loggers()}
    threads = torch.get_num_threads()
    sigs = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        if dist.is_initialized():
            dist.destroy_process_group()
        _forget_deepspeed_groups()
        mlflow.set_tracking_uri(None)  # back to "from the environment" (it also unsets MLFLOW_TRACKING_URI)
        os.environ.clear()
        os.environ.update(env)
        for name, lg in _loggers():
            for h in [h for h in lg.handlers if h not in handlers.get(name, [])]:
                lg.removeHandler(h)
                h.close()
            lg.level = levels.get(name, logging.NOTSET)
        torch.set_num_threads(threads)
        for s, handler in sigs.items():
            signal.signal(s, handler)
        import launch.app

        launch.app._composed = False


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches process groups of its own (a clone of the world group, data / expert parallel groups) in
    module globals, which outlive destroy_process_group: the next training's engine would broadcast over a
    group of the dead one ("Group ... is not registered")."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name, value in vars(groups).items():
        if name.startswith("_") and "GROUP" in name and name.isupper():
            setattr(groups, name, {} if isinstance(value, dict) else None)
    groups.mesh_device = None


def _loggers():
    yield "", logging.getLogger()
    for name, lg in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger):
            yield name, lg


def run(line: str) -> int:
    words = shlex.split(line)
    if words[:2] != ["python", "-m"]:
        raise ValueError(f"not a `python -m` command: {line}")
    sys.argv = [words[2], *words[3:]]
    try:
        runpy.run_module(words[2], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def main() -> None:
    commands, results, logs = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), Path(sys.argv[3])
    logs.mkdir(parents=True, exist_ok=True)
    argv = list(sys.argv)
    with open(results, "w") as out:
        for i, line in enumerate(commands):
            log = logs / f"{i:03d}.log"
            start = time.monotonic()
            with _output_to(log), _fresh():
                try:
                    code = run(line)
                except BaseException as exc:  # reported like the interpreter would, then the next command
                    import traceback

                    traceback.print_exc()
                    code = 130 if isinstance(exc, KeyboardInterrupt) else 1
            sys.argv = argv
            out.write(json.dumps({"command": line, "code": code, "seconds": round(time.monotonic() - start, 2),
                                  "log": str(log)}) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
