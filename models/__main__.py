"""`python -m models [--json]`: the model zoo with parameter counts at each model's paper configuration.

A model that fails to build gets an error row (the others are still listed) and the exit status is 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

import torch

from models.registry import ZOO, build_model, count_parameters, paper_config


def zoo_rows() -> List[dict]:
    rows = []
    for name, entry in ZOO.items():
        row = {"name": name, "paper_name": entry.paper_name, "params": None}
        try:
            with torch.device("meta"):  # shapes only: counting needs no memory and no initialisation
                row["params"] = count_parameters(build_model(paper_config(name)))
        except Exception as exc:  # one broken model must not hide the others
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list of {name, paper_name, params}")
    args = parser.parse_args(argv)
    rows = zoo_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        wn = max([14] + [len(row["name"]) for row in rows])
        wp = max([14] + [len(row["paper_name"]) for row in rows])
        print(f"{'name':<{wn}} {'paper name':<{wp}} {'params':>12}")
        for row in rows:
            value = f"{row['params']:>12,}" if row["params"] is not None else f"ERROR {row['error']}"
            print(f"{row['name']:<{wn}} {row['paper_name']:<{wp}} {value}")
    failed = [row["name"] for row in rows if row["params"] is None]
    if failed:
        print(f"failed to build: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
