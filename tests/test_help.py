"""Every entry point answers --help with exit 0 and a short page: what it does, its options, an example, where
the docs are; nothing else runs (no config composed, no files written)."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT

ENTRY_POINTS = ("train", "evaluate", "generate", "export", "prepare", "extract_set", "sync_tracking", "bench",
                "plan", "gpu_check", "torchrun", "bench_readers", "train_features", "quality_report", "serve",
                "compare")


def test_every_entry_point_answers_help(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen([sys.executable, "-m", f"launch.{name}", "--help"], cwd=tmp_path, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ENTRY_POINTS}  # started together: each is mostly interpreter start-up
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"launch.{name} --help exited {proc.returncode}: {err[-2000:]}"
        assert f"launch.{name}" in out and "Example" in out, (name, out)
        assert "Docs:" in out, (name, out)
        assert len(out.splitlines()) <= 30, (name, len(out.splitlines()))
        assert "Traceback" not in err, (name, err[-2000:])
    assert list(tmp_path.iterdir()) == []  # nothing ran: no runs/, outputs/ or mlruns/
