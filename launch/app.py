"""Shared plumbing of the Hydra entry points: schema registration, logging, validated config."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from omegaconf import DictConfig

from trainer.config import Config, check_override_keys, load_config, register_schema
from trainer.run import exit_codes
from trainer.run.errors import ConfigError

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")

register_schema()


_composed = False  # set once Hydra has composed the config and called the entry point


def composed(overrides: List[str]) -> Config:
    """The typed config of `overrides` for tools that take options of their own beside Hydra's (bench, plan,
    generate, extract_set): composed with Hydra's compose API, validated like `validated`'s."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    check_override_keys(overrides)
    try:
        with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
            raw = compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:  # unknown key or group, bad override syntax
        raise ConfigError(str(exc)) from exc
    return _typed(raw)


def validated(cfg: DictConfig) -> Config:
    """Turn the composed config into the typed one; a bad value is a ConfigError naming its key."""
    global _composed
    _composed = True
    logging.getLogger().setLevel(logging.INFO)
    return _typed(cfg)


def _typed(cfg: DictConfig) -> Config:
    from omegaconf.errors import OmegaConfBaseException

    try:
        return load_config(cfg)
    except (OmegaConfBaseException, ValueError) as exc:  # a value of the wrong type, our __post_init__ checks
        raise ConfigError(str(exc)) from exc


def exit_codes_of(hydra_main: Callable[[], None], page: str, schema: type = Config,
                  preflight: Optional[Callable[[Config], None]] = None) -> None:
    """Run a `@hydra.main` entry point so that Hydra's own config errors (unknown key or group, bad override
    syntax, missing preset), which Hydra reports with exit 1 before the entry point runs, exit with the config
    error code 2 like ours (trainer/run/exit_codes.py). `preflight(config)`: checks that must come before Hydra
    touches the run directory, under the exit policy (a config that does not compose is left to Hydra)."""
    from trainer.run import exits

    answer_help(page)
    try:
        check_override_keys(sys.argv[1:], schema)
    except ConfigError as exc:
        print(f"{exc.label}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(exc.exit_code) from exc
    if preflight is not None:
        try:
            cfg = composed([a for a in sys.argv[1:] if not a.lstrip("+~").startswith("hydra.")])
        except ConfigError:
            cfg = None
        if cfg is not None:
            code = exits.run(lambda: preflight(cfg))
            if code:
                raise SystemExit(code)
    try:
        hydra_main()
    except SystemExit as exc:
        if exc.code == 1 and not _composed:
            raise SystemExit(exit_codes.CONFIG_ERROR) from exc
        raise


def answer_help(page: str, argv: Optional[List[str]] = None) -> None:
    """`--help` / `-h` anywhere in the arguments: print the entry point's help page and exit 0 (before Hydra,
    whose own help is a dump of every config key)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("--help", "-h") for a in argv):
        print(page.strip())
        raise SystemExit(exit_codes.OK)


def cli(work: Callable[[List[str]], Optional[int]], page: str,
        help_args: Callable[[List[str]], List[str]] = lambda argv: argv) -> Callable[..., int]:
    """The `main(argv=None) -> int` of a non-Hydra entry point: its help page, then `work(argv)` under the one
    exit policy (trainer/run/exits.py). `help_args`: the part of argv where --help is the tool's own."""
    from trainer.run.exits import run

    def main(argv: Optional[List[str]] = None) -> int:
        argv = sys.argv[1:] if argv is None else argv
        answer_help(page, help_args(argv))
        return run(lambda: work(argv))

    return main


def split_options(argv: List[str], defaults: Dict[str, Optional[str]]) -> Tuple[Dict[str, Optional[str]], List[str]]:
    """A tool's own `key=value` options (those named in `defaults`, which fill the rest) and the remaining
    arguments, which are Hydra overrides."""
    opts = dict(defaults)
    rest = []
    for arg in argv:
        key, has_value, value = arg.partition("=")
        if key in defaults and has_value:
            opts[key] = value
        else:
            rest.append(arg)
    return opts, rest
