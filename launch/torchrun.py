"""`python -m launch.torchrun [torchrun options] -m launch.train [overrides]`: torchrun with the project's exit codes.

torchrun itself exits 1 for any worker failure and restarts workers (`--max-restarts`) whatever their code, so
a scheduler cannot tell a typo or a divergence from a preemption. This wrapper takes the same arguments and
1. checks the training config before any worker starts (a config error exits 2 at once: nothing to restart);
2. runs torchrun in this process and exits with the most specific code of the failed workers
   (trainer/run/exit_codes.py: a config error or divergence explains its peers' lost connections).
"""
from __future__ import annotations

import sys
from typing import List

from trainer.run import exit_codes


from launch.app import cli

HELP = """
python -m launch.torchrun [torchrun options] -m launch.train [key=value ...]

torchrun with the project's exit codes: checks the training config once before any worker starts, then exits
with the most specific code of the failed workers (torchrun alone exits 1 for every failure).

Example:
  python -m launch.torchrun --nproc_per_node=2 -m launch.train experiment=smoke
torchrun's own options: python -m torch.distributed.run --help. Docs: README.md (Launching), docs/reliability.md.
"""

def _precheck(script_args: List[str]) -> None:
    """Compose and check `launch.train <script_args>` here as the workers would: a ConfigError now, not N times."""
    from launch.app import composed
    from trainer.config import check_trainable

    check_trainable(composed([a for a in script_args if not a.startswith(("hydra.", "--"))]))


def launch(argv: List[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    if args.module and args.training_script == "launch.train":
        _precheck(list(args.training_script_args))
    try:
        run(args)
    except ChildFailedError as exc:
        codes = {rank: f.exitcode for rank, f in exc.failures.items()}
        code = exit_codes.most_specific(codes.values())
        print(f"launch.torchrun: workers failed {codes}; exit {code} "
              f"({exit_codes.MEANING.get(code, 'unknown')})", file=sys.stderr, flush=True)
        return code
    except SignalException as exc:  # the agent was signalled (SIGTERM: preemption) and stopped its workers
        return exit_codes.from_returncode(-int(exc.sigval))
    return exit_codes.OK


# after -m: the script's own arguments, --help among them
main = cli(launch, HELP, help_args=lambda argv: argv[:argv.index("-m")] if "-m" in argv else argv)


if __name__ == "__main__":
    raise SystemExit(main())
