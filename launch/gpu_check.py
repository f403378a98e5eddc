"""`python -m launch.gpu_check [out=runs/gpu_check] [budget_s=480] [form=auto|full|reduced] [tests=true|false]`
(`make gpu-check`)

The GPU acceptance in one command (trainer/measure/acceptance.py): the marked GPU tests (`pytest -m gpu`), then
the reference speed table, and a report in `<out>/gpu_check.json` and `<out>/gpu_check.md`. `form=auto` is `full`
with a CUDA device and `reduced` without. Exit status 10 (CHECKS_FAILED) if a marked test failed or a row raised.
"""
from __future__ import annotations

from typing import List

from launch.app import cli, composed, split_options
from trainer.run import exit_codes
from trainer.run.errors import ConfigError

DEFAULTS = {"out": "runs/gpu_check", "budget_s": "480", "form": "auto", "tests": "true"}


HELP = """
python -m launch.gpu_check [out=runs/gpu_check] [budget_s=480] [form=auto|full|reduced] [tests=true|false]

The GPU acceptance in one command (`make gpu-check`): the GPU-marked tests, then the reference speed table,
reported in <out>/gpu_check.md and .json. Without CUDA it runs a reduced smoke form.

Example:
  python -m launch.gpu_check budget_s=600
Docs: docs/performance.md.
"""

def gpu_check(argv: List[str]) -> int:
    from trainer.measure.acceptance import run_acceptance

    opts, rest = split_options(argv, DEFAULTS)
    if rest or opts["form"] not in ("auto", "full", "reduced") or opts["tests"] not in ("true", "false"):
        raise ConfigError(f"unknown or bad options {rest or opts}; usage: {__doc__.splitlines()[0]}")
    return exit_codes.OK if run_acceptance(opts, composed) else exit_codes.CHECKS_FAILED


main = cli(gpu_check, HELP)


if __name__ == "__main__":
    raise SystemExit(main())
