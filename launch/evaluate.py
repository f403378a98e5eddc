"""`python -m launch.evaluate eval=<job> model_uri=models:/<name>@<alias> [overrides]` (jobs: docs/evaluation.md)."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from launch.app import CONFIG_DIR, exit_codes_of, validated
from trainer.run.exits import exit_with

HELP = """
python -m launch.evaluate eval=<job> model_uri=<uri> [key=value ...]

Evaluates a registered (or exported) model: the job's table, figures and headline numbers go to the run
directory, to an MLflow run and onto the model version.

Main options:
  eval=<job>                 elbo, marginal, cardinality, kl_layer, transfer, fewshot, samples, attention,
                             sample_quality (eval.feature_model=models:/protonet@champion)
  model_uri=<uri>            models:/<name>@champion, models:/<name>/<version>, runs:/<id>/..., or a package dir
  data=<dataset>             the dataset the model was trained on (checked against its card)
  eval.set_sizes=[5]         eval.max_batches=N (a seeded random subset of the sets)   eval.seed=0
Example:
  python -m launch.evaluate name=demo eval=elbo model_uri=models:/demo@champion eval.set_sizes=[5]
Docs: docs/evaluation.md (jobs, protocol, exit codes).
"""


def evaluate(raw: DictConfig) -> None:
    import json

    from trainer import distributed
    from trainer.evaluation.jobs import run_job
    from trainer.metrics import strict_rows
    from trainer.run.errors import ConfigError

    from trainer import threads

    cfg = validated(raw)
    world = distributed.world()
    if world.world_size > 1:
        raise ConfigError(f"jobs run as one process (WORLD_SIZE={world.world_size}); start it without torchrun / "
                          "deepspeed")
    threads.apply(cfg.trainer.threads, world.device.type)
    # strict JSON: a non-finite number is null, and its row names it in "non_finite"
    print(json.dumps(strict_rows(run_job(cfg, world.device)), indent=2, default=str, allow_nan=False))


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(raw: DictConfig) -> None:
    exit_with(lambda: evaluate(raw))


if __name__ == "__main__":
    exit_codes_of(main, HELP)
