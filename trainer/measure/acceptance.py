"""The GPU acceptance behind `python -m launch.gpu_check` (`make gpu-check`): the marked GPU tests (`pytest -m gpu`), then the reference speed table
(trainer/measure/reference.py: every row of ../shared/DESIGN.md "Performance anchors", train and eval, eager and
`trainer.compile=true`) measured by launch.bench's machinery (trainer/measure/bench.py) in this one process, and a
report: `<out>/gpu_check.json` (every bench record) and `<out>/gpu_check.md` (ours vs the reference, the ratio per
row). It keeps to `budget_s`: eager rows run before compiled ones, each row under a time cap, and a row the budget
does not reach is reported as not run.

`form=auto` is `full` with a CUDA device and `reduced` without: 2 sets per batch, one timed step, no compile
rows (inductor's CPU compile takes minutes per model), and the report says that the GPU figures were not taken.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Dict

from trainer.measure.bench import BenchOptions
from trainer.run.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TESTS_SHARE = 0.6  # of the budget at most for the marked tests; the table gets the rest and what they leave
FULL = {"timing": BenchOptions(warmup=3, steps=10, eval=True), "cap_s": 60.0, "compile_cap_s": 150.0}
REDUCED = {"timing": BenchOptions(warmup=0, steps=1, eval=True), "cap_s": 120.0, "compile_cap_s": 0.0}


class RowTimeout(Exception):
    pass


def run_marked_tests(out: Path, timeout: float, env: Dict[str, str]) -> Dict[str, object]:
    """`pytest -m gpu` in a child process; counts, skip reasons and failures from its JUnit XML."""
    xml = out / "gpu_tests.xml"
    argv = ["-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}", "tests"]
    summary: Dict[str, object] = {"command": "python " + " ".join(argv[:-2] + ["tests"]), "passed": 0, "failed": 0,
                                  "errors": 0, "skipped": 0, "skip_reasons": [], "failures": []}
    log = (out / "gpu_tests.log").open("w")
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        summary["returncode"] = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        # an interrupted pytest still writes its JUnit report with the tests it finished
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        summary.update(returncode=None, timed_out_after_s=timeout)
    finally:
        log.close()
    if not xml.exists():
        summary["errors"] = 1
        summary["failures"] = ["pytest wrote no report (see gpu_tests.log)"]
        return summary
    reasons = set()
    for case in ET.parse(xml).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag: child for child in case}
        if "skipped" in kinds:
            summary["skipped"] += 1
            reasons.add(kinds["skipped"].get("message", "").strip())
        elif "failure" in kinds or "error" in kinds:
            summary["failed" if "failure" in kinds else "errors"] += 1
            summary["failures"].append(name)
        else:
            summary["passed"] += 1
    summary["skip_reasons"] = sorted(reasons)
    return summary


@contextlib.contextmanager
def time_cap(seconds: float):
    """Raise RowTimeout in this (main) thread after `seconds`: a compile that runs long gives up its row only."""

    def expire(*_):
        raise RowTimeout(f"over its {seconds:.0f} s cap")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def speed_table(form: Dict[str, object], reduced: bool, deadline: float, composed: Callable) -> tuple:
    """`composed`: overrides -> typed Config (the entry point's Hydra composition: launch.app.composed)."""
    import torch

    from trainer.measure.bench import session
    from trainer.measure.reference import bench_overrides, result, rows_in_order

    timing = form["timing"]
    flags = f"warmup={timing.warmup} steps={timing.steps} eval={str(timing.eval).lower()}"
    lines, first, done = [], None, {}
    with contextlib.redirect_stdout(sys.stderr), session() as s:
        for row, compiled in rows_in_order():
            overrides = bench_overrides(row, compiled, reduced)
            command = f"python -m launch.bench {' '.join(overrides)} {flags}"
            cap = float(form["compile_cap_s" if compiled else "cap_s"])
            left = deadline - time.monotonic()
            record, status, reason, began = None, "not run", None, time.monotonic()
            if compiled and cap <= 0:
                reason = "compile rows run on a GPU only (inductor's CPU compile takes minutes per model)"
            elif left < 5:
                reason = "time budget spent"
            elif tuple(overrides) in done:  # the reduced form maps some rows onto one configuration
                record, status, reason = done[tuple(overrides)]
                reason = reason or "the same configuration as a row above, measured once"
            else:
                try:
                    cfg = composed(overrides)
                    with time_cap(min(cap, left)):
                        # reduced: FLOPs, CPU live memory and the prediction once, to keep the smoke run short
                        record = s.measure(cfg, replace(timing, count=not (reduced and first)))
                    status = "measured"
                    done[tuple(overrides)] = (record, status, None)
                except RowTimeout as exc:
                    status, reason = "timed out", str(exc)
                except Exception as exc:  # one broken row must not lose the others
                    status, reason = "error", f"{type(exc).__name__}: {exc}"[:500]
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            first = first or record
            lines.append({**result(row, compiled, reduced, record, status, reason, command),
                          "wall_s": round(time.monotonic() - began, 1)})
            print(f"gpu_check: {row.key} compile={compiled}: {status} in {lines[-1]['wall_s']} s"
                  + (f" ({reason})" if reason else ""),
                  file=sys.stderr, flush=True)
    return lines, first, flags


def run_acceptance(opts: Dict[str, str], composed: Callable) -> bool:
    """The marked tests and the speed table under opts (launch.gpu_check's options); True when all passed.
    `composed` turns a row's overrides into its config (launch.app.composed: the composition belongs to the
    entry points, which call down into trainer/)."""
    import torch

    from trainer.measure.reference import NONE_MEASURED, NOT_TAKEN, REFERENCE_BASIS, as_dicts, markdown

    start = time.monotonic()
    deadline = start + float(opts["budget_s"])
    cuda = torch.cuda.is_available()
    reduced = opts["form"] == "reduced" or (opts["form"] == "auto" and not cuda)
    if not reduced and not cuda:
        raise ConfigError("form=full needs a CUDA device")
    if not os.environ.get("DS_ACCELERATOR"):  # DeepSpeed rejects an empty value
        os.environ["DS_ACCELERATOR"] = "cuda" if cuda else "cpu"
    out = Path(opts["out"]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    tests = None
    if opts["tests"] == "true":
        tests = run_marked_tests(out, TESTS_SHARE * float(opts["budget_s"]), env)
    if reduced:
        torch.set_num_threads(1)  # a smoke run of the machinery, not a speed figure
    form = REDUCED if reduced else FULL
    rows, first, flags = speed_table(form, reduced, deadline, composed)
    gpu_taken = not reduced and any(r["status"] == "measured" for r in rows)
    report = {
        "command": "python -m launch.gpu_check " + " ".join(f"{k}={v}" for k, v in opts.items()),
        "form": "reduced" if reduced else "full", "gpu_figures_taken": gpu_taken,
        "notice": NOT_TAKEN if reduced else (None if gpu_taken else NONE_MEASURED),
        "device_name": first["device_name"] if first else (torch.cuda.get_device_name() if cuda else "cpu"),
        "versions": first["versions"] if first else None, "bench_options": flags,
        "reference_basis": REFERENCE_BASIS, "reference": as_dicts(),
        "budget_s": float(opts["budget_s"]), "wall_s": time.monotonic() - start,
        "tests": tests, "rows": rows,
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"report: {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    failed = bool(tests and (tests["failed"] or tests["errors"] or tests.get("returncode") not in (0, 5)))
    return not (failed or any(r["status"] == "error" for r in rows))


