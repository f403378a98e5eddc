"""`python -m launch.gpu_check` in its reduced CPU form (what `make gpu-check` does on a host without CUDA): the
marked GPU tests all skip with their reason, every eager row of the reference table is measured at 2 sets per
batch, the compile rows are reported as not run, and the report says the GPU figures were not taken."""
from __future__ import annotations

import json

from conftest import ROOT, run_module
from trainer.measure.reference import NOT_TAKEN, ROWS


def test_gpu_check_reduced_cpu_form_writes_the_report(tmp_path):
    out = tmp_path / "report"
    proc = run_module("launch.gpu_check", f"out={out}", cwd=ROOT, env={"CUDA_VISIBLE_DEVICES": ""}, timeout=600)
    assert "GPU figures were NOT taken" in proc.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["form"] == "reduced" and report["gpu_figures_taken"] is False and report["notice"] == NOT_TAKEN
    assert report["wall_s"] < report["budget_s"] == 480

    tests = report["tests"]
    assert tests["returncode"] == 0 and tests["passed"] == tests["failed"] == tests["errors"] == 0
    assert tests["skipped"] >= 12  # tests/test_gpu.py's 11 and test_dali.py's DALI GPU reader
    assert all("CUDA" in reason for reason in tests["skip_reasons"])

    rows = report["rows"]
    assert [(r["row"], r["compile"]) for r in rows] == [(row.key, c) for c in (False, True) for row in ROWS]
    for r in rows[:8]:
        assert r["status"] == "measured", r
        rec = r["record"]
        assert rec["device"] == "cpu" and rec["batch_sets"] == r["measured_batch_sets"] == 2
        assert rec["set_size"] == r["set_size"] and r["train_img_s"] > 0 and r["eval_img_s"] > 0
        assert r["ratio_train"] is r["ratio_eval"] is r["meets_target"] is None  # not the reference's experiment
        assert "launch.bench" in r["command"] and "trainer.compile=false" in r["command"]
    assert rows[3]["record"]["hidden_dim"] == 256 and rows[7]["record"]["set_size"] == 1
    first = rows[0]["record"]  # the FLOP count and the calculator's prediction ran on the first row
    assert first["train_flops_per_image"] > 0 and first["predicted"]["peak_train_bytes"] > 0
    assert all(r["status"] == "not run" and "GPU only" in r["reason"] for r in rows[8:])

    md = (out / "gpu_check.md").read_text()
    assert NOT_TAKEN in md and md.count("| measured") >= 8 and md.count("| not run") == 8
    assert (out / "gpu_tests.xml").exists()
