"""`python -m launch.bench`: JSON records of the trainer's step, sweeps, the plain-torch fallback, and the
calculator's memory prediction against the bench's CPU measurement for SCHA-VAE s at two ZeRO stages."""
from __future__ import annotations

import json

import pytest

from conftest import ROOT, run_module
from trainer.fastpath import cpu_has_fast_bf16

TINY = ["model=schavae", "model.hidden_dim=16", "model.c_dim=4", "model.z_dim=4",
        "model.str_enc='32-1,16-1,8-1,4-1,2-1,1-1'", "model.str_gen='8-1,4-1,2-1,1-1'", "model.str_dec='32-1,16-1,8-1'"]
RUN = ["device=cpu", "warmup=0", "steps=1"]


def records(proc) -> list:
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # stdout holds the JSON lines only


@pytest.fixture(scope="module")
def schavae_s_stages(tmp_path_factory) -> list:
    """SCHA-VAE s, 2 sets of 5, ZeRO 0 and 3: one process per configuration."""
    proc = run_module("launch.bench", "model=schavae_s", "data.batch_sets=2", "data.set_size=5",
                      "trainer.zero_stage=0,3", *RUN, cwd=tmp_path_factory.mktemp("bench"), timeout=900)
    return records(proc)


def test_bench_records_the_trainer_step(schavae_s_stages):
    assert [(r["model"], r["zero_stage"]) for r in schavae_s_stages] == [("schavae_s", 0), ("schavae_s", 3)]
    for r in schavae_s_stages:
        assert r["engine"] == "deepspeed" and r["engine_note"] is None and r["device"] == "cpu"
        assert r["params"] == 4_761_793 and r["global_images_per_step"] == 10 and r["world_size"] == 1
        assert 0 < r["step_time_min_s"] <= r["step_time_median_s"]
        assert r["train_img_s"] == pytest.approx(10 / r["step_time_median_s"])
        # one timed step on a shared 2-core VM cannot order eval and train speeds reliably; the work can
        assert r["eval_img_s"] > 0 and r["train_img_s"] > 0
        assert 0 < r["eval_flops_per_image"] < r["train_flops_per_image"]
        assert r["peak_mem_method"] == "cpu_vmhwm_reset+mmap_threshold_128k"
        assert 0 < r["peak_mem_eval_bytes"] < r["peak_mem_train_bytes"] <= r["peak_held_train_bytes"] * 1.05
        # FLOPs counted on the real step agree with the calculator's meta-device count
        assert r["train_flops_per_image"] == pytest.approx(r["predicted"]["flops_per_image_train"], rel=1e-6)
        assert r["achieved_flops_per_s"] > 0 and r["mfu"] is None  # no known peak for a CPU
        assert r["versions"]["torch"] and r["versions"]["deepspeed"] and "cpus" in r["device_name"]
        # the fast path as the trainer resolves it (trainer/fastpath.py): autocast bf16 where the CPU has bf16
        # instructions, channels-last only where ZeRO leaves the weights alone, the guard read every step on a CPU
        assert r["precision_setting"] == "auto"
        assert r["precision"] == ("amp_bf16" if cpu_has_fast_bf16() else "fp32")
        assert r["channels_last"] == (r["zero_stage"] == 0 and cpu_has_fast_bf16()) and r["guard_every"] == 1 and r["compile"] is False
        assert r["process_peak_train_bytes"] > r["peak_held_train_bytes"]


def test_calculator_within_15_percent_of_measured_peak(schavae_s_stages):
    for r in schavae_s_stages:
        measured, predicted = r["peak_mem_train_bytes"], r["predicted"]["peak_train_bytes"]
        assert abs(predicted - measured) <= 0.15 * measured, (r["zero_stage"], predicted, measured)


FALLBACK = """
import sys
sys.modules["deepspeed"] = None  # import deepspeed -> ImportError, as on a host without it
from launch.bench import main
sys.exit(main(sys.argv[1:]))
"""


def test_bench_without_deepspeed_runs_the_step_in_plain_torch(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", FALLBACK, *TINY, "data.batch_sets=1", "data.set_size=2",
                           "trainer.precision=bf16", "eval=false", *RUN], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = records(proc)
    assert r["engine"] == "torch" and "deepspeed is not importable" in r["engine_note"]
    assert r["versions"]["deepspeed"] is None and r["eval_img_s"] is None and r["step_time_median_s"] > 0


@pytest.mark.parametrize("arg, message", [("device=gpu", "device must be"), ("steps=0", "steps must be"),
                                          ("trainer.zero_stage=5", "trainer.zero_stage")])
def test_bench_config_errors(tmp_path, arg, message):
    proc = run_module("launch.bench", *TINY, arg, cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr
