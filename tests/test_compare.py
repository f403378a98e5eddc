"""`launch.compare`: trained runs side by side, from what their run directories hold (issue 30's ranking)."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import ROOT, run_module


def fake_run(root: Path, name: str, model: str, vlbs: list, nll: float | None, recog: float | None) -> Path:
    """A run directory as launch.train and launch.evaluate leave it (only the files launch.compare reads)."""
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(f"name: {name}\nmodel:\n  name: {model}\n")
    (d / "epochs.jsonl").write_text("".join(
        json.dumps({"epoch": i + 1, "step": 100 * (i + 1), "val/vlb": v, "elapsed_min": 2.5 * (i + 1)}) + "\n"
        for i, v in enumerate(vlbs)))
    uri = f"models:/{name}@last"
    (d / "eval_elbo.json").write_text(json.dumps({"model_uri": uri, "rows": [
        {"set_size": 5, "split": "test", "vlb": vlbs[-1] + 3.0}]}))
    if nll is not None:
        (d / "eval_marginal.json").write_text(json.dumps({"model_uri": uri, "rows": [
            {"set_size": 5, "split": "test", "nll": nll, "nll_se": 1.25, "sets": 64, "importance_samples": 1000}]}))
    if recog is not None:
        (d / "eval_sample_quality.json").write_text(json.dumps({"model_uri": uri, "rows": [
            {"row": "real", "recognizability": 0.96, "recognizability_se": 0.01, "diversity": 3.0, "fid": 0.3},
            {"row": "conditional", "recognizability": recog, "recognizability_se": 0.04, "diversity": 2.5,
             "fid": 8.0}]}))
    return d


def test_runs_are_ranked_by_nll_with_their_budget_and_a_picture(tmp_path):
    a = fake_run(tmp_path, "rank_ns", "ns", [-150.0, -130.0], 110.0, 0.2)
    b = fake_run(tmp_path, "rank_schavae", "schavae", [-140.0, -120.0, -115.0], 99.5, 0.25)
    c = fake_run(tmp_path, "rank_vae", "vae", [-160.0], None, None)  # not evaluated yet
    out = tmp_path / "ranking"
    proc = run_module("launch.compare", str(a), str(c), str(b), "--out", str(out), cwd=ROOT)
    rows = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("| rank_")]
    assert [r.split(" | ")[0] for r in rows] == ["| rank_schavae", "| rank_ns", "| rank_vae"]  # best NLL first
    cells = rows[0].split(" | ")
    assert cells[1:7] == ["schavae", "7.5", "300", "-115.0", "112.0", "99.5 ± 1.2 (1000, 64)"]
    assert cells[7] == "0.250 ± 0.040" and cells[-1] == "`models:/rank_schavae@last` |"
    assert rows[2].split(" | ")[6:8] == ["-", "-"]
    assert (out / "val_elbo_vs_wallclock.png").stat().st_size > 10_000
    assert "rank_ns" in proc.stdout


def test_a_directory_that_is_not_a_run_is_refused_by_name(tmp_path):
    proc = run_module("launch.compare", str(tmp_path / "nothing"), cwd=ROOT, check=False)
    assert proc.returncode == 2 and "not a run directory (no config.yaml)" in proc.stderr and "nothing" in proc.stderr


def test_the_wall_clock_axis_keeps_readable_ticks_with_many_epochs():
    """Wall clock is continuous: a tick at every epoch of five 20-minute runs (60 points at odd minutes) would print
    their labels on top of each other, as the first ranking picture did."""
    from trainer.evaluation.comparison import RunFigures, elbo_vs_wallclock

    models = ("vae", "ns", "cns", "schavae", "lag")
    runs = [RunFigures(f"rank_{m}", m, [{"val/vlb": -200.0 + 4 * i, "elapsed_min": 0.37 + (1.07 + 0.1 * k) * i}
                                        for i in range(12)]) for k, m in enumerate(models)]
    ax = elbo_vs_wallclock(runs).axes[0]
    assert 3 <= len(ax.get_xticks()) <= 12, ax.get_xticks()
    assert all(float(v).is_integer() for v in ax.get_xticks()), ax.get_xticks()
