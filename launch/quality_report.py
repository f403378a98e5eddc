"""`python -m launch.quality_report <run_dir>`: the table of the last eval=sample_quality of a run directory
(`{run_dir}/eval_sample_quality.json`), one line per row, for people (make demo ends with it)."""
from __future__ import annotations

import json
from pathlib import Path


def table(summary: dict) -> str:
    rows = [r for r in summary["rows"] if "recognizability" in r]
    first = rows[0]
    acc = next((f"{v:.3f}" for k, v in first.items() if k.startswith("feature_net_") and v is not None), "?")
    lines = [f"sample quality of {summary.get('model_uri', '?')}: {first['episodes']} test sets, "
             f"{first['images_per_set']} images per set and row, {first['ways']}-way prototypes "
             f"(chance {first['chance']:.3f}); feature net {first['feature_model']} "
             f"({first['ways']}-way accuracy on real test images {acc})",
             f"{'row':<14}{'recognizability':>22}{'diversity':>12}{'FID':>10}"]
    for r in rows:
        lines.append(f"{r['row']:<14}{r['recognizability']:>14.3f} +- {r['recognizability_se']:.3f}"
                     f"{r['diversity']:>12.3f}{r['fid']:>10.2f}")
    lines.append("real = held-out images of the same characters (the ceiling; its FID is the floor); "
                 "unconditional = samples that ignore the given set")
    return "\n".join(lines)


from launch.app import cli

HELP = """
python -m launch.quality_report <run_dir>

Prints the table of the last eval=sample_quality of a run directory ({run_dir}/eval_sample_quality.json):
recognizability, diversity and FID per row (real, conditional, refined, unconditional) and the feature net's
accuracy.

Example:
  python -m launch.quality_report runs/demo
Docs: docs/evaluation.md (sample_quality).
"""


def report(args) -> None:
    from trainer.run.errors import ConfigError

    if len(args) != 1:
        raise ConfigError("usage: python -m launch.quality_report <run_dir>")
    path = Path(args[0]) / "eval_sample_quality.json"
    if not path.is_file():
        raise ConfigError(f"{path} is missing: run `python -m launch.evaluate eval=sample_quality "
                          f"run_dir={args[0]} ...` first")
    print(table(json.loads(path.read_text())))


main = cli(report, HELP)

if __name__ == "__main__":
    raise SystemExit(main())
