"""`python -m launch.compare <run_dir> [<run_dir> ...] [--out <dir>]`: trained models side by side (docs/results.md)."""
from __future__ import annotations

from pathlib import Path

from launch.app import cli

HELP = """
python -m launch.compare <run_dir> [<run_dir> ...] [--out <dir>]

Puts trained and evaluated runs side by side from what their run directories hold: training minutes and steps
(epochs.jsonl), the last validation ELBO, the test NELBO of eval=elbo, the NLL of eval=marginal with its standard
error, importance samples and sets, and eval=sample_quality's conditional row. Prints a markdown table (best NLL
first) and writes it with a picture of validation ELBO against wall clock to --out (default runs/compare):
table.md, val_elbo_vs_wallclock.png.

Example:
  python -m launch.compare runs/rank_vae runs/rank_ns runs/rank_cns --out runs/ranking
Docs: docs/results.md (the paper's ranking at a CPU budget).
"""


def compare(args) -> None:
    from trainer.evaluation.comparison import collect, elbo_vs_wallclock, markdown
    from trainer.run.errors import ConfigError

    out, dirs, rest = Path("runs/compare"), [], list(args)
    while rest:
        a = rest.pop(0)
        if a == "--out" and rest:
            out = Path(rest.pop(0))
        else:
            dirs.append(Path(a))
    if not dirs:
        raise ConfigError("usage: python -m launch.compare <run_dir> [<run_dir> ...] [--out <dir>]")
    missing = [str(d) for d in dirs if not (d / "config.yaml").is_file()]
    if missing:
        raise ConfigError(f"not a run directory (no config.yaml): {', '.join(missing)}")
    runs = [collect(d) for d in dirs]
    table = markdown(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    elbo_vs_wallclock(runs).savefig(out / "val_elbo_vs_wallclock.png", dpi=100)
    print(table)
    print(f"written: {out / 'table.md'}, {out / 'val_elbo_vs_wallclock.png'}")


main = cli(compare, HELP)

if __name__ == "__main__":
    raise SystemExit(main())
