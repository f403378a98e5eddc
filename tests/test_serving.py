"""trainer/serving: the pyfunc that `mlflow models serve` runs, called in-process through MLflow's own loader, and
the generation it shares with `launch.generate`; a version registered before the package layout changed."""
from __future__ import annotations

import shutil

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from safetensors.torch import save_file

from conftest import ROOT
from models.registry import build_model
from trainer.registry.package import FORMAT, ModelCard, cpu_state
from trainer.serving.generation import GenerationError, check_request, generate, set_elbo

OLD_MODEL = ROOT / "tests" / "data" / "pre_layout_model"


@pytest.fixture(scope="module")
def old_version(tmp_path_factory):
    """The MLmodel, stored code file and card exactly as a version registered before the move stored them
    (code file `serving_code.py`: `from trainer.serving import FewShotGenerator`); weights written here."""
    dst = tmp_path_factory.mktemp("old") / "model"
    shutil.copytree(OLD_MODEL, dst)
    card = ModelCard.from_json((dst / "artifacts" / "model.json").read_text(), "card")
    torch.manual_seed(0)
    model = build_model(card.model).eval()
    save_file(cpu_state(model.state_dict()), str(dst / "artifacts" / "weights.safetensors"), metadata={"format": FORMAT})
    return dst, model


def test_a_version_registered_before_the_layout_move_still_loads_and_serves(old_version):
    path, model = old_version
    assert "from trainer.serving import FewShotGenerator" in (path / "serving_code.py").read_text()
    assert not (ROOT / "trainer" / "serving_code.py").exists()  # the module it was logged from is gone
    served = mlflow.pyfunc.load_model(str(path))
    x = (np.random.default_rng(0).random((3, 1, 28, 28)) > 0.7).astype(np.float32)
    out = served.predict({"images": x}, params={"samples": 4, "mode": "conditional", "seed": 1})
    assert out["samples"].shape == (4, 1, 28, 28) and out["elbo"].shape == (3,)
    assert np.isfinite(out["elbo"]).all() and (out["elbo"] < 0).all()
    assert 0.0 <= out["samples"].min() and out["samples"].max() <= 1.0
    again = served.predict({"images": x}, params={"samples": 4, "mode": "conditional", "seed": 1})
    assert np.array_equal(out["samples"], again["samples"])  # seeded per request
    # the same numbers as generation run directly on the same weights and seed (x is binary: no draw for it)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        xt = torch.bernoulli(torch.from_numpy(x))
        want = generate(model, xt, 4, "conditional", 10)
        elbo = set_elbo(model, xt)
    assert np.allclose(out["samples"], want.numpy(), atol=1e-6) and np.allclose(out["elbo"], elbo.numpy(), atol=1e-4)


@pytest.mark.parametrize("images, params, needle", [
    (np.zeros((3, 1, 27, 28), np.float32), {}, "shape"),
    (np.zeros((21, 1, 28, 28), np.float32), {}, "1..20 images"),
    (np.full((3, 1, 28, 28), 2.0, np.float32), {}, "in [0, 1]"),
    (np.zeros((3, 1, 28, 28), np.float32), {"mode": "dream"}, "mode must be one of"),
    (np.zeros((3, 1, 28, 28), np.float32), {"samples": 0}, "samples must be in 1.."),
])
def test_a_bad_request_is_refused_with_its_reason(old_version, images, params, needle):
    from trainer.serving.pyfunc import FewShotGenerator

    generator = FewShotGenerator()
    generator.load_context(type("Context", (), {"artifacts": {
        "weights": str(old_version[0] / "artifacts" / "weights.safetensors")}})())
    with pytest.raises(MlflowException, match=needle.replace("[", r"\[").replace(".", r"\.")):
        generator.predict(None, {"images": images}, params)


def test_check_request_names_the_bad_value(old_version):
    model = old_version[1]
    check_request(model, 8, "refined", 5)
    for args, needle in (((0, "conditional", 0), "samples"), ((8, "x", 0), "mode"), ((8, "refined", 101), "iterations")):
        with pytest.raises(GenerationError, match=needle):
            check_request(model, *args)
    vae = build_model(type(model.cfg)(name="vae", hidden_dim=8, c_dim=4, z_dim=4, n_stochastic=1, n_res=1, ch_enc=4))
    with pytest.raises(GenerationError, match="no context"):
        check_request(vae, 8, "conditional", 0)
