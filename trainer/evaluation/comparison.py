"""Models side by side (`python -m launch.compare`): what each run directory's training and evaluation jobs wrote,
as one table and one picture of validation ELBO against wall clock. Reads only files of the given run directories:
`config.yaml`, `epochs.jsonl` and the `eval_<job>.json` summaries of eval=elbo, marginal and sample_quality."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from trainer.evaluation.figures import Figure, lines_figure
from trainer.metrics import read_jsonl


@dataclass
class RunFigures:
    name: str
    model: str
    epochs: List[dict]
    elbo: Optional[dict] = None  # eval=elbo's row at the compared set size
    marginal: Optional[dict] = None
    quality: Dict[str, dict] = field(default_factory=dict)  # sample_quality rows by kind
    model_uri: str = ""

    @property
    def minutes(self) -> float:
        return self.epochs[-1].get("elapsed_min", math.nan) if self.epochs else math.nan

    @property
    def steps(self) -> int:
        return self.epochs[-1]["step"] if self.epochs else 0


def _summary(run_dir: Path, job: str) -> Optional[dict]:
    path = run_dir / f"eval_{job}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _row(summary: Optional[dict], set_size: int) -> Optional[dict]:
    rows = [r for r in (summary or {}).get("rows", []) if r.get("set_size") == set_size and r.get("split", "test")
            == "test"]
    return rows[0] if rows else None


def collect(run_dir: Path, set_size: int = 5) -> RunFigures:
    """One run directory's figures; a job that has not run leaves its columns empty."""
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())  # safe_load: data, never objects
    epochs_file = run_dir / "epochs.jsonl"
    epochs = read_jsonl(epochs_file) if epochs_file.is_file() else []  # a torn last line of a killed run skipped
    elbo, marginal, quality = (_summary(run_dir, job) for job in ("elbo", "marginal", "sample_quality"))
    uri = next((s["model_uri"] for s in (marginal, quality, elbo) if s), "")
    return RunFigures(config.get("name", run_dir.name), config["model"]["name"], epochs,
                      _row(elbo, set_size), _row(marginal, set_size),
                      {r["row"]: r for r in (quality or {}).get("rows", []) if "recognizability" in r}, uri)


def _num(value: Optional[float], digits: int = 1, se: Optional[float] = None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None and math.isfinite(se) else "")


def markdown(runs: List[RunFigures]) -> str:
    """One row per run, best NLL first (runs without an NLL last)."""
    def key(r: RunFigures) -> float:
        return r.marginal["nll"] if r.marginal else math.inf

    head = ("| run | model | minutes | steps | val ELBO (last) | test NELBO (whole split) | test NLL ± se (K, sets) | "
            "conditional recognizability | diversity | FID | registered |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(runs, key=key):
        last = r.epochs[-1]["val/vlb"] if r.epochs else None
        m, e, q = r.marginal, r.elbo, r.quality.get("conditional")
        lines.append(" | ".join([
            f"| {r.name}", r.model, _num(r.minutes), str(r.steps), _num(last), _num(-e["vlb"]) if e else "-",
            f"{_num(m['nll'], se=m.get('nll_se'))} ({m['importance_samples']}, {m['sets']})" if m else "-",
            _num(q["recognizability"], 3, q["recognizability_se"]) if q else "-",
            _num(q["diversity"], 2) if q else "-", _num(q["fid"], 1) if q else "-",
            f"`{r.model_uri}` |" if r.model_uri else "- |"]))
    return "\n".join(lines)


def elbo_vs_wallclock(runs: List[RunFigures]) -> Figure:
    series = {f"{r.name} ({r.model})": ([e.get("elapsed_min", math.nan) for e in r.epochs],
                                        [e["val/vlb"] for e in r.epochs]) for r in runs if r.epochs}
    return lines_figure("wall clock (minutes: training, validation, checkpoints)", "validation ELBO (nats/image)",
                        series, "validation ELBO against wall clock", ticks_at_points=False)
