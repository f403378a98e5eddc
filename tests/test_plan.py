"""`python -m launch.plan` and trainer/measure/planning.py: per-rank memory by ZeRO stage, communication volume, FLOPs,
and the stage / micro batch / accumulation options."""
from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from conftest import run_module
from launch.app import CONFIG_DIR
from trainer.config import load_config
from trainer.measure.planning import GB, activation_model, activation_profile, communication_bytes, param_inventory, plan_memory


def cfg_of(*overrides: str):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return load_config(compose("config", overrides=list(overrides)))


def test_memory_by_stage_partitions_what_zero_promises():
    base = ("model=schavae_m", "data.batch_sets=2", "data.set_size=5", "trainer.precision=fp32")
    inv, act = param_inventory(cfg_of(*base)), activation_model(cfg_of(*base))
    plans = {s: plan_memory(cfg_of(*base, f"trainer.zero_stage={s}"), 8, "cuda", act, inv) for s in (0, 1, 2, 3)}
    p = inv.total
    assert (plans[0].params, plans[0].grads, plans[0].optimizer) == (4 * p, 4 * p, 8 * p)
    assert plans[1].optimizer == plans[2].optimizer == 12 * -(-p // 8)  # master + Adam, partitioned
    assert plans[3].params < plans[2].params  # ZeRO-3 partitions the parameters too
    assert len({plans[s].activations for s in plans}) == 1  # activations do not depend on the stage
    bf16 = plan_memory(cfg_of(*base, "trainer.precision=bf16"), 8, inventory=inv)
    assert bf16.activations < 0.6 * plans[0].activations and bf16.params == 2 * p
    offload = plan_memory(cfg_of(*base, "trainer.zero_stage=2", "trainer.offload_optimizer=cpu"), 8, "cuda", act, inv)
    assert offload.optimizer == 0 and offload.host > 0 and offload.train_peak < plans[2].train_peak
    ckpt = plan_memory(cfg_of(*base, "model.activation_checkpointing=blocks"), 8, inventory=inv)
    assert ckpt.activations < 0.65 * plans[0].activations  # (the blocks already recompute their GELUs)


def test_activations_are_linear_in_the_micro_batch():
    """The calculator extrapolates from meta profiles at 1 and 2 sets: a profile at 5 sets agrees."""
    cfg = cfg_of("model=schavae_s", "data.batch_sets=5")
    assert activation_profile(cfg, 5).train == pytest.approx(activation_model(cfg).train(5), rel=0.01)


def test_communication_volume():
    inv = param_inventory(cfg_of("model=schavae_s"))
    p = inv.total
    assert communication_bytes(inv, 1, 0, "fp32", 1, 0.0) == 0
    assert communication_bytes(inv, 4, 0, "fp32", 4, 0.0) == int(2 * 0.75 * 4 * p)  # one all-reduce per step
    assert communication_bytes(inv, 4, 2, "bf16", 4, 0.0) == int(4 * 0.75 * 2 * p + 0.75 * 2 * p)
    z3 = communication_bytes(inv, 4, 3, "fp32", 1, 0.0)
    assert z3 > communication_bytes(inv, 4, 2, "fp32", 1, 0.0)  # parameters gathered in forward and backward
    assert communication_bytes(inv, 4, 3, "fp32", 1, 1.0) > z3  # and again for recomputed blocks


def test_plan_command_json_and_table(tmp_path):
    proc = run_module("launch.plan", "model=schavae_m", "world_size=16", "device_memory_gb=80", "data.batch_sets=4",
                      "trainer.zero_stage=2", "trainer.precision=bf16", "format=json", cwd=tmp_path, timeout=300)
    r = json.loads(proc.stdout)
    assert r["params"] == param_inventory(cfg_of("model=schavae_m")).total and r["world_size"] == 16
    m = r["memory"]
    assert m["train_peak"] == m["params"] + m["grads"] + m["optimizer"] + m["buffers"] + max(m["activations"],
                                                                                            m["step_temp"])
    assert r["fits"] == (m["train_peak"] <= 80 * GB) and r["global_sets"] == 64 and r["comm_bytes_per_step"] > 0
    assert r["flops_per_image"]["train"] > 2 * r["flops_per_image"]["eval"] > 0
    rows = {(o["zero_stage"], o["activation_checkpointing"], o["offload_optimizer"]): o for o in r["options"]}
    assert len(rows) == 2 * (1 + 3 * 2)
    assert rows[3, "blocks", "none"]["max_micro_sets"] >= rows[0, "none", "none"]["max_micro_sets"] > 0
    fit = rows[0, "none", "none"]
    assert fit["micro_sets"] * fit["grad_accum"] * 16 == 64 and fit["micro_sets"] <= fit["max_micro_sets"]

    table = run_module("launch.plan", "model=schavae_s", "world_size=2", "device_memory_gb=0.5", cwd=tmp_path,
                       timeout=300).stdout
    assert "DOES NOT FIT" in table and "options for this world size" in table

    bad = run_module("launch.plan", "model=schavae_s", "world_size=0", cwd=tmp_path, check=False, timeout=120)
    assert bad.returncode == 2 and "world_size" in bad.stderr
