"""The FC part of the zoo at its paper configurations: exact parameter counts (SPEC 3.13), which parameters
receive a gradient, and the `python -m models` listing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models.registry as registry
from models.__main__ import main as zoo_main
from models.config import ModelConfig
from models.objective import elbo_terms
from models.registry import build_model, count_parameters, paper_config

ROOT = Path(__file__).resolve().parents[1]

# (trainable, params that get a gradient) counted on the reference at the paper configs (SPEC 3.13)
FC_COUNTS = {
    "vae": (13_345_099, 13_226_827),
    "ns": (14_762_959, 14_729_167),
    "ns_lag": (15_550_927, 15_517_135),
    "hfsgm": (6_008_791, 6_000_343),
    "hfsgm_lag": (6_080_599, 6_072_151),
}


@pytest.mark.parametrize("name", sorted(FC_COUNTS))
def test_paper_config_parameter_counts_and_gradient_coverage(name):
    torch.manual_seed(0)
    model = build_model(paper_config(name))
    trainable, with_grad = FC_COUNTS[name]
    assert count_parameters(model) == trainable
    # one training step's backward: the never-used embeddings (as in the reference) are the only ones left out
    x = torch.bernoulli(torch.full((2, 2, 1, 28, 28), 0.3))
    elbo_terms(model(x)).vlb.neg().backward()
    assert sum(p.numel() for p in model.parameters() if p.grad is not None) == with_grad


def test_python_m_models_json_lists_every_fc_model():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "models", "--json"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    rows = json.loads(proc.stdout)
    assert [row["name"] for row in rows] == list(registry.ZOO)
    by_name = {row["name"]: row for row in rows}
    for name, (trainable, _) in FC_COUNTS.items():
        assert by_name[name]["params"] == trainable
        assert by_name[name]["paper_name"] == registry.ZOO[name].paper_name
    failed = [row for row in rows if row["params"] is None]
    assert proc.returncode == (1 if failed else 0), proc.stderr


def test_listing_survives_a_broken_model(monkeypatch, capsys):
    fc = {k: v for k, v in registry.ZOO.items() if k in ("vae", "ns")}
    broken = registry.ZooEntry("models.does_not_exist:Nope", "Broken", ModelConfig(name="broken"))
    monkeypatch.setattr(registry, "ZOO", {**fc, "broken": broken})
    monkeypatch.setattr("models.__main__.ZOO", registry.ZOO)
    assert zoo_main([]) == 1
    text = capsys.readouterr().out
    assert "13,345,099" in text and "14,762,959" in text
    assert "broken" in text and "ERROR" in text
