"""`python -m launch.torchrun [torchrun options] -m launch.train [overrides]`: torchrun with the project's exit codes.

torchrun itself exits 1 for any worker failure and restarts workers (`--max-restarts`) whatever their code, so
a scheduler cannot tell a typo or a divergence from a preemption. This wrapper takes the same arguments and
1. checks the training config before any worker starts (a config error exits 2 at once: nothing to restart);
2. runs torchrun in this process and exits with the most specific code of the failed workers
   (trainer/exit_codes.py: a config error or divergence explains its peers' lost connections).
"""
from __future__ import annotations

import sys
from typing import List, Optional

from trainer import exit_codes


def _precheck(script_args: List[str]) -> Optional[str]:
    """The config error of `launch.train <script_args>`, composed here as the workers would (None: valid)."""
    from hydra import compose, initialize_config_dir

    from launch.app import CONFIG_DIR
    from trainer.config import check_trainable, load_config

    overrides = [a for a in script_args if not a.startswith(("hydra.", "--"))]
    try:
        with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
            cfg = load_config(compose("config", overrides=overrides))
        check_trainable(cfg)
    except Exception as exc:  # Hydra's composition errors and ours: the workers would fail the same way
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def main(argv: Optional[List[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.module and args.training_script == "launch.train":
        error = _precheck(list(args.training_script_args))
        if error:
            print(f"config error: {error}", file=sys.stderr, flush=True)
            return exit_codes.CONFIG_ERROR
    try:
        run(args)
    except ChildFailedError as exc:
        codes = {rank: f.exitcode for rank, f in exc.failures.items()}
        code = exit_codes.most_specific(codes.values())
        print(f"launch.torchrun: workers failed {codes}; exit {code} "
              f"({exit_codes.MEANING.get(code, 'unknown')})", file=sys.stderr, flush=True)
        return code
    except SignalException as exc:  # the agent was signalled (SIGTERM: preemption) and stopped its workers
        return 128 + int(exc.sigval)
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
