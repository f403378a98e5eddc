"""Every model of the zoo trains on real Omniglot through the real trainer: validation loss goes down."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from models.registry import PAPER_MODELS


@pytest.fixture(scope="module")
def zoo_curves(tmp_path_factory, omniglot_raw, omniglot_ns_shards) -> dict:
    out = tmp_path_factory.mktemp("zoo")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "zoo_smoke.py"), str(omniglot_raw),
                           str(omniglot_ns_shards), str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        pytest.fail(f"zoo smoke training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads((out / "zoo.json").read_text())


# CHFSGM's unclamped, batch-normalised c heads can overflow early in training (SPEC 8 item 5: the reference
# diverges at its script settings); here its first validation pass may be NaN before it recovers.
MAY_START_NAN = {"chfsgm"}


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_model_trains_with_decreasing_validation_loss(zoo_curves, name):
    val_loss = [-v for v in zoo_curves[name]]  # -ELBO per image, nats
    assert len(val_loss) == 3 and val_loss[-1] == val_loss[-1], val_loss
    finite = [v for v in val_loss if v == v]
    if name not in MAY_START_NAN:
        assert finite == val_loss, val_loss
    assert len(finite) >= 2 and finite[-1] < finite[0], val_loss
