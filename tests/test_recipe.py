"""Recipe options beyond the reference (issue 30): threads, the moving average of the weights, per-step learning
rate and alpha schedules. Formulas first, then one recipe run killed and resumed, and what it registered."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_module
from trainer import schedules, threads
from trainer.config import TrainerConfig
from trainer.ema import WeightAverage, decay_at
from trainer.metrics import read_step_records
from trainer.run.errors import ConfigError


# ------------------------------------------------------------------------------------------------ threads
def test_threads_follow_omp_then_the_affinity_share(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(6)))
    assert threads.resolve("auto", 1, env={}) == (6, "auto: 6 usable core(s) / 1 process(es) on this node")
    assert threads.resolve("auto", 4, env={})[0] == 1  # 6 // 4
    assert threads.resolve("auto", 8, env={})[0] == 1  # never 0
    assert threads.resolve("auto", 1, env={"OMP_NUM_THREADS": "3"}) == (3, "auto: OMP_NUM_THREADS=3")
    assert threads.resolve("auto", 1, env={"OMP_NUM_THREADS": ""})[0] == 6
    assert threads.resolve("5", 2, env={"OMP_NUM_THREADS": "1"}) == (5, "trainer.threads=5")


def test_threads_are_applied_and_said(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        assert threads.apply("2", announce=False) == "intra-op threads: 2 (trainer.threads=2)"
        assert torch.get_num_threads() == 2
        assert threads.apply("auto", announce=False) == "intra-op threads: 1 (auto: OMP_NUM_THREADS=1)"
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_busy_node_is_warned_about_before_several_threads_start(monkeypatch, caplog):
    assert threads.busy_warning(2, 2, 0.3) is None
    assert threads.busy_warning(1, 2, 5.0) is None  # one thread cannot wait for another
    assert threads.busy_warning(2, 2, None) is None  # no load average on this OS
    said = threads.busy_warning(2, 2, 3.1)
    assert "load average 3.1 on its 2 core(s)" in said and "trainer.threads=1" in said
    monkeypatch.setattr(threads, "load_average", lambda: 3.1)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    try:
        with caplog.at_level("WARNING", logger="trainer.threads"):
            threads.apply("2")
            assert any("the node is busy" in r.getMessage() for r in caplog.records)
            caplog.clear()
            threads.apply("2", device_type="cuda")  # the host side of a GPU run: not what sets its speed
            assert not caplog.records
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bad", [{"threads": "0"}, {"threads": "many"}, {"ema_decay": 1.0}, {"ema_decay": -0.1},
                                 {"lr_schedule": "step"}, {"alpha_schedule": "cosine"}, {"warmup_steps": -1},
                                 {"warmup_steps": 10},  # with plateau
                                 {"ema_decay": 0.99, "zero_stage": 3},
                                 {"min_lr": 0.1, "lr_schedule": "cosine"}, {"kl_z_weight": 0.0},
                                 {"budget_minutes": -1.0}])
def test_recipe_settings_are_checked_before_any_work(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        TrainerConfig(**bad)


# ------------------------------------------------------------------------------------------------ schedules
def test_learning_rate_follows_warmup_then_cosine_or_linear():
    f = lambda step, kind="cosine": schedules.lr_factor(step, kind, total=110, warmup=10, floor=0.1)
    assert [f(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]  # linear warm-up, 1 at its last step
    assert f(10) == 1.0 and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: the cosine's middle
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(60, "linear") == pytest.approx(0.55) and f(35, "linear") == pytest.approx(0.1 + 0.9 * 0.75)
    assert f(60, "constant") == 1.0 and f(3, "constant") == 0.4


def test_alpha_per_step_meets_the_per_epoch_values_at_epoch_ends():
    per_epoch = [2.0 * 0.5 ** e for e in range(4)]
    assert [schedules.alpha_at(2.0, 0.5, e * 100, 100) for e in range(4)] == per_epoch
    mid = schedules.alpha_at(2.0, 0.5, 150, 100)
    assert per_epoch[2] < mid < per_epoch[1] and mid == pytest.approx(2.0 * 0.5 ** 1.5)


def test_the_per_image_kl_weight_is_the_reference_loss_at_one_and_weighs_only_kl_z():
    from models.objective import ElboTerms, training_loss

    t = ElboTerms(torch.tensor(-90.0), torch.tensor(25.0), torch.tensor(4.0), torch.zeros(2), torch.zeros(2))
    w = 1.0 + 0.7
    assert torch.equal(training_loss(t, 0.7), -(w * t.logpx - (t.kl_z + t.kl_c) / w))  # the reference's, bit for bit
    assert training_loss(t, 0.7, 1.0) == training_loss(t, 0.7)
    assert training_loss(t, 0.7, 3.0).item() == pytest.approx(w * 90.0 + (3 * 25.0 + 4.0) / w)
    assert training_loss(t, 0.0, 3.0).item() == pytest.approx(90.0 + 75.0 + 4.0)


# ------------------------------------------------------------------------------------------------ averaging
def test_weight_average_folds_in_with_the_warmed_up_decay_and_swaps_back_exactly():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = WeightAverage(net, 0.9)
    expected = [p.detach().clone() for p in net.parameters()]
    for n in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        d = decay_at(0.9, n)
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, net.parameters())]
    assert [decay_at(0.9, n) for n in (0, 1, 100)] == [0.1, 2 / 11, 0.9]
    for e, s in zip(expected, ema.shadow):
        torch.testing.assert_close(s, e, rtol=1e-6, atol=1e-6)
    trained = copy.deepcopy(net.state_dict())
    with ema.swapped_in():
        for p, s in zip(net.parameters(), ema.shadow):
            assert torch.equal(p, s)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in trained.items())  # bit for bit
    other = WeightAverage(net, 0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 30 and all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))


# ------------------------------------------------------------------------------------------------ a recipe run
RECIPE = ("trainer.ema_decay=0.9", "trainer.lr_schedule=cosine", "trainer.warmup_steps=4", "trainer.min_lr=1e-4",
          "trainer.alpha_schedule=step", "trainer.alpha_step=0.5")


def recipe_args(run_dir: Path, raw: Path, shards: Path, *extra: str) -> list[str]:
    return ["experiment=smoke", f"run_dir={run_dir}", f"data.raw_dir={raw}", f"data.shards_dir={shards}",
            "data.download=false", f"tracking.root={run_dir.parent / 'mlruns'}", "trainer.epochs=3",
            "trainer.log_every=1", "tracking.model_name=recipe", *RECIPE, *extra]


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory, omniglot_raw, omniglot_ns_shards) -> Path:
    """An uninterrupted 3-epoch (18-step) smoke run with every recipe option on, registered."""
    run_dir = tmp_path_factory.mktemp("recipe") / "run"
    proc = run_module("launch.train", *recipe_args(run_dir, omniglot_raw, omniglot_ns_shards), cwd=ROOT)
    (run_dir / "console.txt").write_text(proc.stdout + proc.stderr)
    return run_dir


def test_the_run_says_its_threads_and_follows_its_schedules(recipe_run):
    assert "intra-op threads: 1 (auto: OMP_NUM_THREADS=1)" in (recipe_run / "console.txt").read_text()
    records = read_step_records(recipe_run / "metrics.jsonl")
    assert sorted(records) == list(range(18))
    for step, r in records.items():
        assert r["lr"] == pytest.approx(1e-3 * schedules.lr_factor(step, "cosine", 18, 4, 0.1), rel=1e-9), step
        assert r["alpha"] == pytest.approx(2.0 * 0.5 ** (step / 6), rel=1e-9), step


def test_the_averaged_weights_are_checkpointed_registered_and_evaluated(recipe_run, omniglot_raw,
                                                                       omniglot_ns_shards):
    import mlflow

    from trainer.checkpoint import consolidated_state_dict, load_state_file
    from trainer.registry.package import read_package
    from trainer.registry.resolve import download_package

    tag = (recipe_run / "checkpoints" / "latest").read_text().strip()
    states = load_state_file(recipe_run / "checkpoints" / tag / "mp_rank_00_model_states.pt")
    assert states["ema"]["updates"] == 18 and states["ema"]["decay"] == 0.9
    averaged = consolidated_state_dict(recipe_run / "checkpoints", tag)
    raw = consolidated_state_dict(recipe_run / "checkpoints", tag, averaged=False)
    names = set(states["ema"]["weights"])
    assert names and all(torch.equal(averaged[n], states["ema"]["weights"][n]) for n in names)
    assert any(not torch.equal(averaged[n], raw[n]) for n in names)  # the average is not the last weights
    assert all(torch.equal(averaged[k], raw[k]) for k in raw if k not in names)  # buffers as trained

    mlflow.set_tracking_uri(f"sqlite:///{recipe_run.parent / 'mlruns' / 'mlflow.db'}")
    model, card = read_package(download_package("models:/recipe@last"))
    assert card.checkpoint["tag"] == tag
    registered = model.state_dict()
    assert all(torch.equal(registered[n].float(), averaged[n]) for n in names)

    # validation ran on the averaged weights: the registered model reproduces the run's last validation ELBO
    run_module("launch.evaluate", "eval=elbo", "model_uri=models:/recipe@last", "eval.split=val",
               "eval.set_sizes=[5]", f"run_dir={recipe_run}", f"tracking.root={recipe_run.parent / 'mlruns'}",
               f"data.raw_dir={omniglot_raw}", f"data.shards_dir={omniglot_ns_shards}", "data.download=false",
               cwd=ROOT)
    row = json.loads((recipe_run / "eval_elbo.json").read_text())["rows"][0]
    last = json.loads((recipe_run / "epochs.jsonl").read_text().splitlines()[-1])
    assert row["vlb"] == pytest.approx(last["val/vlb"], rel=2e-3)


def test_a_recipe_run_killed_at_a_random_step_resumes_exactly(tmp_path, recipe_run, omniglot_raw,
                                                              omniglot_ns_shards):
    from test_reliability import killed_at_a_random_step_and_resumed, val_elbos

    run_dir = tmp_path / "run"
    argv = recipe_args(run_dir, omniglot_raw, omniglot_ns_shards, "tracking.enabled=false")
    b = killed_at_a_random_step_and_resumed(argv, run_dir)
    a = read_step_records(recipe_run / "metrics.jsonl")
    assert sorted(a) == sorted(b) == list(range(18))
    assert all(b[s]["loss"] == a[s]["loss"] and b[s]["lr"] == a[s]["lr"] and b[s]["alpha"] == a[s]["alpha"]
               for s in a)  # to the last digit
    assert val_elbos(run_dir) == val_elbos(recipe_run)  # validation of the averaged weights too
