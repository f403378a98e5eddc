"""What a finished (or stopped) training tells its user at the end: the best validation ELBO and its epoch, the
model versions it registered with their aliases (or why it registered none), where its files are."""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple


@dataclass
class Registration:
    tag: str
    aliases: Tuple[str, ...]
    version: Optional[Future]  # of the registry version number; None when tracking did not take it


@dataclass
class RunSummary:
    run_dir: Path
    epochs_done: int
    epochs: int
    best_vlb: float
    best_epoch: int
    model_name: str
    not_registering: str = ""  # why nothing is registered ("" when registering)
    registrations: List[Registration] = field(default_factory=list)
    link: str = ""  # the MLflow run's page on a tracking server

    def lines(self) -> List[str]:
        out = [f"training {'finished' if self.epochs_done >= self.epochs else 'stopped'} after epoch "
               f"{self.epochs_done}/{self.epochs}"]
        if self.best_epoch:
            out.append(f"best validation ELBO {self.best_vlb:.3f} nats/image at epoch {self.best_epoch}")
        if self.not_registering:
            out.append(f"registered no model version: {self.not_registering}")
        # an alias moves to the newest version given it: each is shown where it points now
        held = [tuple(a for a in r.aliases if not any(a in later.aliases for later in self.registrations[i + 1:]))
                for i, r in enumerate(self.registrations)]
        for r, now_held in zip(self.registrations, held):
            if r.version is not None and r.version.done() and r.version.exception() is None:
                where = f"models:/{self.model_name}/{r.version.result()}"
            else:
                where = "not sent yet (in tracking_fallback.jsonl / to_register/: sent by the next start or " \
                        "`python -m launch.sync_tracking`)"
            aliases = f" [{', '.join(now_held)}]" if now_held else ""
            out.append(f"checkpoint {r.tag}{aliases}: {where}")
        if self.link:
            out.append(f"MLflow run {self.link}")
        out.append(f"run directory {self.run_dir}: checkpoints/, metrics.jsonl, epochs.jsonl, config.yaml, "
                   f"figures/, train.log")
        return out
