"""Train every model of the zoo for a few steps on real Omniglot in one process (one DeepSpeed init).

Usage: python tests/scripts/zoo_smoke.py RAW SHARDS OUT_DIR -> writes OUT_DIR/zoo.json {model: [val vlb per epoch]}
"""
import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from launch.app import CONFIG_DIR
from trainer import distributed
from trainer.config import load_config
from trainer.loop import Trainer

TINY_FC = ["model.hidden_dim=32", "model.ch_enc=8", "model.c_dim=8", "model.z_dim=8", "model.n_res=1"]
# The conv family's batch-normalised latent heads start with KL_z ~ 1000 nats/image, and its validation ELBO
# (eval-mode BN) first gets worse for ~40 steps before it improves: give it 35 steps per epoch, not 6.
TINY_CONV = ["model.hidden_dim=16", "model.ch_enc=8", "model.c_dim=8", "model.z_dim=8", "model.n_res=1",
             "data.limit_batches=35"]
TINY_MULTI = ["model.hidden_dim=16", "model.c_dim=4", "model.z_dim=4", "model.str_enc='32-1,16-1,8-1,4-1,2-1,1-1'",
              "model.str_gen='8-1,4-1,2-1,1-1'", "model.str_dec='32-1,16-1,8-1'"]
TINY = {
    "vae": TINY_FC + ["data.set_size=1", "data.set_size_test=1", "data.batch_sets=40"],
    "ns": TINY_FC, "ns_lag": TINY_FC, "hfsgm": TINY_FC, "hfsgm_lag": TINY_FC,
    "cns": TINY_CONV, "cns_lag": TINY_CONV, "chfsgm": TINY_CONV, "chfsgm_lag": TINY_CONV,
    "schavae": TINY_MULTI + ["trainer.lr=2e-3"], "schavae_lag": TINY_MULTI + ["trainer.lr=2e-3"],
}


def main(raw: str, shards: str, out: str) -> None:
    world = distributed.init()
    results = {}
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        for name, extra in TINY.items():
            cfg = load_config(compose("config", overrides=[
                "experiment=smoke", f"model={name}", *extra, f"run_dir={out}/{name}", f"data.raw_dir={raw}",
                f"data.shards_dir={shards}", "data.download=false", "tracking.enabled=false", "trainer.epochs=3",
                "trainer.eval_test=false", "trainer.alpha=0",  # plain ELBO: what validation measures
            ]))
            Trainer(cfg, world).fit()
            epochs = [json.loads(line) for line in (Path(out) / name / "epochs.jsonl").read_text().splitlines()]
            # epochs.jsonl is strict JSON: a NaN validation ELBO is stored as null (its key under "non_finite")
            results[name] = [float("nan") if e["val/vlb"] is None else e["val/vlb"] for e in epochs]
            print(name, results[name], flush=True)
    (Path(out) / "zoo.json").write_text(json.dumps(results))
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
