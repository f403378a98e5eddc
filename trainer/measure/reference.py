"""The reference implementation's speed table (../shared/DESIGN.md "Performance anchors": one NVIDIA H200, torch
2.11, fp32) and the ours-vs-reference report that `python -m launch.gpu_check` writes (JSON and markdown)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

REFERENCE_BASIS = "reference implementation, one NVIDIA H200, torch 2.11, fp32 (../shared/DESIGN.md)"
REDUCED_SETS = 2  # the reduced form's batch: BatchNorm in training mode needs more than one value per channel
NOT_TAKEN = ("GPU figures were NOT taken: this was the reduced form (no CUDA device here, or form=reduced): 2 sets "
             "per batch, one timed step, FLOPs and the memory prediction on the first row only, compile rows not run; "
             "its img/s are not comparable with the reference, so no ratio is given.")
NONE_MEASURED = "GPU figures were NOT taken: no row of the table was measured (see each row's status)."


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    overrides: Tuple[str, ...]  # the model, before the batch shape
    batch_sets: int
    set_size: int
    train_img_s: float
    eval_img_s: Optional[float]  # None: the reference table has no figure
    target: float  # the speed issue's acceptance: 10x at the paper batch, 3x at the larger ones


ROWS: Tuple[Row, ...] = (
    Row("schavae_16x5", "SCHA-VAE, 16x5 (paper config)", ("model=schavae",), 16, 5, 307, 1482, 10),
    Row("schavae_lag_16x5", "SCHA-VAE-LAG, 16x5", ("model=schavae_lag",), 16, 5, 258, 1022, 10),
    Row("schavae_128x5", "SCHA-VAE, 128x5", ("model=schavae",), 128, 5, 1827, None, 3),
    Row("schavae_large_100x5", "SCHA-VAE large (W_h 256), 100x5", ("model=schavae", "model.hidden_dim=256"),
        100, 5, 1398, 4517, 3),
    Row("ns_100x5", "NS, 100x5", ("model=ns",), 100, 5, 14628, 37490, 3),
    Row("cns_100x5", "CNS, 100x5", ("model=cns",), 100, 5, 13798, 44611, 3),
    Row("chfsgm_100x5", "CHFSGM, 100x5", ("model=chfsgm",), 100, 5, 10101, 36102, 3),
    Row("vae_100x1", "VAE, 100x1", ("model=vae",), 100, 1, 3402, 16196, 3),
)

# invariant data parallelism swaps the generator state in forward hooks, which dynamo cannot trace
# (docs/performance.md); at one process the sharded mode draws the same kind of noise without it
COMPILE_OVERRIDES = ("trainer.compile=true", "trainer.data_parallel=sharded")


def bench_overrides(row: Row, compiled: bool, reduced: bool) -> List[str]:
    """The Hydra overrides of one measurement: the row's model and batch (REDUCED_SETS sets in the reduced form),
    compiled or eager."""
    sets = REDUCED_SETS if reduced else row.batch_sets
    extra = COMPILE_OVERRIDES if compiled else ("trainer.compile=false",)
    return [*row.overrides, f"data.batch_sets={sets}", f"data.set_size={row.set_size}", *extra]


def ratio(ours: Optional[float], reference: Optional[float]) -> Optional[float]:
    return ours / reference if ours and reference else None


def result(row: Row, compiled: bool, reduced: bool, record: Optional[Dict[str, object]], status: str,
           reason: Optional[str], command: str) -> Dict[str, object]:
    """One line of the report. Ratios only for full-size measurements on a CUDA device: anything else is not
    the reference's experiment."""
    comparable = (not reduced and record is not None and record.get("device") == "cuda"
                  and record.get("batch_sets") == row.batch_sets and record.get("set_size") == row.set_size)
    train = record.get("train_img_s") if record else None
    evaluation = record.get("eval_img_s") if record else None
    r_train = ratio(train, row.train_img_s) if comparable else None
    r_eval = ratio(evaluation, row.eval_img_s) if comparable else None
    return {
        "row": row.key, "label": row.label, "compile": compiled, "status": status, "reason": reason,
        "command": command, "batch_sets": row.batch_sets, "set_size": row.set_size,
        "measured_batch_sets": record.get("batch_sets") if record else None,
        "reference_train_img_s": row.train_img_s, "reference_eval_img_s": row.eval_img_s,
        "train_img_s": train, "eval_img_s": evaluation, "ratio_train": r_train, "ratio_eval": r_eval,
        "target_ratio": row.target,
        "meets_target": (r_train >= row.target and (r_eval is None or r_eval >= row.target)) if r_train else None,
        "precision": record.get("precision") if record else None,
        "peak_mem_train_bytes": record.get("peak_mem_train_bytes") if record else None,
        "predicted_peak_train_bytes": ((record.get("predicted") or {}).get("peak_train_bytes") if record else None),
        "record": record,
    }


def _num(v: Optional[float], digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _ratio(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def markdown(report: Dict[str, object]) -> str:
    """The report as a markdown table, ours vs the reference, one line per row and compile setting."""
    lines = [f"# GPU check: {report['device_name']}", ""]
    if report.get("notice"):
        lines += [f"**{report['notice']}**", ""]
    t = report.get("tests") or {}
    if t:
        lines += [f"Marked GPU tests (`{t['command']}`): {t['passed']} passed, {t['failed']} failed, "
                  f"{t['errors']} errors, {t['skipped']} skipped."]
        lines += [f"- skipped: {reason}" for reason in t.get("skip_reasons", [])]
        lines += [f"- FAILED: {name}" for name in t.get("failures", [])]
        if t.get("timed_out_after_s"):
            lines.append(f"- INTERRUPTED after {t['timed_out_after_s']:.0f} s (its share of the budget)")
        lines.append("")
    lines += [f"Reference: {REFERENCE_BASIS}. Ours: the configuration's defaults (precision `auto`), "
              f"{report['bench_options']}.", ""]
    lines += ["| model, batch | compile | ours train img/s | ref train img/s | train ratio | ours eval img/s | "
              "ref eval img/s | eval ratio | target | precision | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        measured = r["measured_batch_sets"]
        label = r["label"] + (f" (measured at {measured}x{r['set_size']})" if measured not in (None, r["batch_sets"])
                              else "")
        status = r["status"] + (f": {r['reason']}" if r["reason"] else "")
        lines.append(f"| {label} | {'on' if r['compile'] else 'off'} | {_num(r['train_img_s'], 1)} | "
                     f"{_num(r['reference_train_img_s'])} | {_ratio(r['ratio_train'])} | {_num(r['eval_img_s'], 1)} | "
                     f"{_num(r['reference_eval_img_s'])} | {_ratio(r['ratio_eval'])} | {r['target_ratio']:g}x | "
                     f"{r['precision'] or '-'} | {status} |")
    lines += ["", f"Wall time {report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget."]
    return "\n".join(lines) + "\n"


def rows_in_order(rows: Sequence[Row] = ROWS) -> List[Tuple[Row, bool]]:
    """Every row eager first, then every row compiled: the eager table completes before any compile time is spent."""
    return [(row, False) for row in rows] + [(row, True) for row in rows]


def as_dicts(rows: Sequence[Row] = ROWS) -> List[Dict[str, object]]:
    return [asdict(r) for r in rows]
