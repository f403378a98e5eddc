"""The typed config: presets compose, unknown keys and bad values fail naming the key, entry points exit early."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from launch.app import CONFIG_DIR
from trainer.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def cfg_for(*overrides):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return load_config(compose("config", overrides=list(overrides)))


def test_paper_presets_hold_the_reference_settings():
    ns = cfg_for("experiment=omniglot_ns_ns")
    assert (ns.model.name, ns.model.hidden_dim, ns.model.c_dim, ns.model.z_dim, ns.model.n_stochastic) == ("ns", 512, 32, 32, 3)
    assert (ns.data.name, ns.data.set_size, ns.data.batch_sets) == ("omniglot_ns", 5, 100)
    assert (ns.trainer.epochs, ns.trainer.lr, ns.trainer.alpha, ns.trainer.alpha_step) == (1000, 1e-3, 2.0, 0.98)
    assert (ns.trainer.weight_decay, ns.trainer.plateau_patience, ns.trainer.plateau_factor) == (1e-5, 10, 0.5)
    assert ns.trainer.grad_clamp == 1.0 and ns.run_dir == "runs/omniglot_ns_ns"
    vae = cfg_for("experiment=omniglot_ns_vae")
    assert (vae.model.name, vae.model.hidden_dim, vae.data.set_size, vae.data.batch_sets) == ("vae", 512, 1, 100)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")))
def test_every_preset_composes_and_validates(preset):
    cfg = cfg_for(f"experiment={preset}")
    assert cfg.name and cfg.model.name


@pytest.mark.parametrize("override, needle", [
    ("trainer.bogus=1", "bogus"),
    ("model.hidden_dim=abc", "hidden_dim"),
])
def test_unknown_key_or_wrong_type_names_the_key(override, needle):
    with pytest.raises(Exception, match=needle):
        cfg_for(override)


@pytest.mark.parametrize("override, needle", [
    ("trainer.lr=-1", "trainer.lr"),
    ("trainer.precision=fp8", "trainer.precision"),
    ("model.likelihood=gaussian", "model.likelihood"),
    ("data.set_size=0", "data.set_size"),
    ("data.name=cifar", "data.name"),
    ("eval.importance_samples=0", "eval.importance_samples"),
])
def test_bad_value_names_the_key(override, needle):
    with pytest.raises(ValueError, match=needle):
        cfg_for(override)


def test_train_entry_point_fails_fast_on_bad_key(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launch.train", "experiment=smoke", "trainer.learning_rate=1", f"run_dir={tmp_path}/r"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]  # CONFIG_ERROR, before any data or process-group work
    assert "config error: unknown key 'trainer.learning_rate'" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_typo_is_answered_with_the_nearest_existing_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch.evaluate", "eval=elbo", "eval.set_size=[5]"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "did you mean eval.set_sizes?" in proc.stderr, proc.stderr[-2000:]
    assert "+eval.set_size" not in proc.stderr and list(tmp_path.iterdir()) == []


def test_train_entry_point_fails_fast_on_bad_value(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launch.train", "experiment=smoke", "trainer.alpha_step=2", f"run_dir={tmp_path}/r"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "trainer.alpha_step" in proc.stderr


@pytest.mark.parametrize("preset, model, hidden, batch, lr, alpha_step, epochs", [
    ("omniglot_ns_schavae", "schavae", 128, 16, 2e-4, 0.9, 1000),
    ("omniglot_ns_schavae_lag", "schavae_lag", 128, 16, 2e-4, 0.9, 1000),
    ("omniglot_ns_schavae_large", "schavae", 256, 100, 2e-4, 0.9, 1000),
    ("omniglot_ns_cns", "cns", 256, 100, 2e-4, 0.98, 1000),
    ("omniglot_back_eval_cns_lag", "cns_lag", 256, 100, 1e-3, 0.98, 1000),
    ("omniglot_back_eval_ns_lag", "ns_lag", 512, 100, 1e-3, 0.98, 600),
    ("omniglot_back_eval_vae", "vae", 512, 100, 1e-3, 0.98, 600),
    ("omniglot_ns_chfsgm_lag", "chfsgm_lag", 128, 100, 1e-3, 0.98, 1000),
])
def test_reference_script_rows(preset, model, hidden, batch, lr, alpha_step, epochs):
    cfg = cfg_for(f"experiment={preset}")
    assert (cfg.model.name, cfg.model.hidden_dim, cfg.data.batch_sets) == (model, hidden, batch)
    assert (cfg.trainer.lr, cfg.trainer.alpha_step, cfg.trainer.epochs) == (lr, alpha_step, epochs)
    assert cfg.data.name == preset.split("_")[0] + "_" + preset.split("_")[1] + ("_eval" if "back_eval" in preset else "")
    assert cfg.name == preset


def test_cns_set_size_rows():
    assert cfg_for("experiment=omniglot_ns_cns_s2").data.set_size == 2
    assert cfg_for("experiment=omniglot_ns_cns_s10").data.set_size_test == 10


def test_misspelled_preset_is_an_error_not_the_default():
    with pytest.raises(Exception, match="omniglot_ns_nope"):
        cfg_for("experiment=omniglot_ns_nope")
    assert cfg_for().name == "run"  # no preset: the plain defaults
