"""A process killed while writing a checkpoint leaves the previous one intact and loadable; keep-N pruning."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

SCRIPT = ROOT / "tests" / "scripts" / "checkpoint_kill.py"


def run(run_dir: Path, mode: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, str(SCRIPT), str(run_dir), mode], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**env, "PYTHONPATH": str(ROOT)})


def load_weights(run_dir: Path, tag: str) -> dict:
    states = torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)
    return states["module"]


@pytest.mark.parametrize("mode", ["during_write", "before_pointer"])
def test_killed_save_leaves_the_previous_checkpoint_current_and_intact(tmp_path, mode):
    proc = run(tmp_path, mode)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step000000001"
    assert (ckpt / "step000000002").exists()  # the interrupted write is there, but nothing points at it
    saved = load_weights(tmp_path, "step000000001")
    expected = torch.load(tmp_path / "weights_step1.pt")
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def test_old_checkpoints_are_pruned_to_keep_n(tmp_path):
    proc = run(tmp_path, "prune")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step000000003", "step000000004"]
    assert (ckpt / "latest").read_text().strip() == "step000000004"
