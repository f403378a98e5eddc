"""A process killed while writing a checkpoint leaves the previous one intact and loadable; keep-N pruning."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from trainer.checkpoint import load_state_file

SCRIPT = ROOT / "tests" / "scripts" / "checkpoint_kill.py"


def run(run_dir: Path, mode: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, str(SCRIPT), str(run_dir), mode], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**env, "PYTHONPATH": str(ROOT)})


def load_weights(run_dir: Path, tag: str) -> dict:
    return load_state_file(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt")["module"]


@pytest.mark.parametrize("mode", ["during_write", "before_pointer"])
def test_killed_save_leaves_the_previous_checkpoint_current_and_intact(tmp_path, mode):
    proc = run(tmp_path, mode)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step000000001"
    assert (ckpt / "step000000002").exists()  # the interrupted write is there, but nothing points at it
    saved = load_weights(tmp_path, "step000000001")
    expected = torch.load(tmp_path / "weights_step1.pt", weights_only=True)
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def test_old_checkpoints_are_pruned_to_keep_n(tmp_path):
    proc = run(tmp_path, "prune")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step000000003", "step000000004"]
    assert (ckpt / "latest").read_text().strip() == "step000000004"


class _Payload:
    """Pickles as a call that creates a file: what a hostile checkpoint file would run when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_files_are_read_weights_only(tmp_path):
    """Our loads take tensors and numpy RNG state (what a real checkpoint holds) and refuse any other object
    without running it."""
    import pickle

    from trainer.checkpoint import rng_state, set_rng_state

    import numpy as np

    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = torch.rand(3), np.random.rand(3)
    set_rng_state(load_state_file(tmp_path / "rng.pt"))
    again = torch.rand(3), np.random.rand(3)
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])

    marker = tmp_path / "payload-ran"
    torch.save({"module": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, tmp_path / "hostile.pt")
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        load_state_file(tmp_path / "hostile.pt")
    assert not marker.exists()
