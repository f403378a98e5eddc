"""`trainer.compile=auto`'s rule (trainer/compile_choice.py): compile only where this machine's bench measured the
configuration faster compiled and the run's planned steps repay the compile; the file is data, checked."""
from __future__ import annotations

import json
import logging

import pytest

from trainer import compile_choice
from trainer.compile_choice import decide, key_of, read, record


def fingerprint(**changes) -> dict:
    base = {"device": "Some CPU (2 cpus, 2 torch threads)", "torch": "2.14.1", "model": {"name": "schavae"},
            "micro_sets": 16, "set_size": 5, "grad_accum": 1, "world_size": 1, "precision": "fp32",
            "channels_last": False, "zero_stage": 0, "offload_optimizer": "none", "backend": "inductor"}
    return {**base, **changes}


def measured(path, eager: float, compiled: float, compile_s: float, fp=None) -> None:
    fp = fp or fingerprint()
    record(fp, False, eager, None, path)
    record(fp, True, compiled, compile_s, path)


def test_nothing_measured_means_eager_and_the_log_names_the_bench_command(tmp_path):
    path = tmp_path / "m.json"
    choice = decide(fingerprint(), 10_000, path=path)
    assert not choice.on
    assert "not measured on this device" in choice.reason and "trainer.compile=false,true" in choice.reason
    record(fingerprint(), False, 9.0, None, path)  # only the eager half
    assert not decide(fingerprint(), 10_000, path=path).on


def test_compiles_when_the_planned_steps_repay_the_measured_compile(tmp_path):
    path = tmp_path / "m.json"
    measured(path, eager=9.0, compiled=7.0, compile_s=230.0)  # 2 s a step saved: 115 steps repay it
    assert not decide(fingerprint(), 115, path=path).on
    long = decide(fingerprint(), 116, path=path)
    assert long.on and "116 planned steps save 232 s" in long.reason
    # a wall-clock budget caps the steps at what it holds of eager steps: 1,000 s hold 111
    assert not decide(fingerprint(), 10_000, budget_s=1000.0, path=path).on
    assert decide(fingerprint(), 10_000, budget_s=1100.0, path=path).on


def test_a_configuration_measured_slower_compiled_stays_eager(tmp_path):
    path = tmp_path / "m.json"
    measured(path, eager=8.8, compiled=9.1, compile_s=10.0)
    choice = decide(fingerprint(), 10**6, path=path)
    assert not choice.on and "8.8 s a step eager, 9.1 s compiled" in choice.reason


def test_a_measurement_speaks_only_for_the_configuration_it_timed(tmp_path):
    path = tmp_path / "m.json"
    measured(path, eager=9.0, compiled=7.0, compile_s=20.0)
    assert decide(fingerprint(), 1000, path=path).on
    for other in (fingerprint(device="Some CPU (2 cpus, 1 torch threads)"), fingerprint(micro_sets=8),
                  fingerprint(precision="amp_bf16"), fingerprint(model={"name": "schavae", "hidden_dim": 32})):
        assert not decide(other, 1000, path=path).on


def test_the_latest_measurement_of_each_half_wins_and_both_share_one_entry(tmp_path):
    path = tmp_path / "m.json"
    measured(path, eager=9.0, compiled=7.0, compile_s=230.0)
    record(fingerprint(), True, 6.9, 21.0, path)  # a second compiled row, cache warm
    (entry,) = read(path).values()
    assert (entry["eager_step_s"], entry["compiled_step_s"], entry["compile_s"]) == (9.0, 6.9, 21.0)
    assert entry["config"] == fingerprint()


@pytest.mark.parametrize("text", ["not json", json.dumps([1, 2]), json.dumps({"version": 99, "records": {}})])
def test_a_file_that_is_not_ours_is_ignored_with_a_warning(tmp_path, caplog, text):
    path = tmp_path / "m.json"
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger=compile_choice.__name__):
        assert not decide(fingerprint(), 10**6, path=path).on
    assert f"ignoring {path}" in caplog.text
    measured(path, eager=9.0, compiled=7.0, compile_s=20.0)  # and a measurement replaces it
    assert decide(fingerprint(), 1000, path=path).on


def test_entries_with_figures_that_are_not_durations_are_dropped(tmp_path):
    path = tmp_path / "m.json"
    bad = {key_of(fingerprint()): {"eager_step_s": 9.0, "compiled_step_s": -1.0, "compile_s": 0.0},
           "other": {"eager_step_s": "9", "compiled_step_s": 1.0, "compile_s": 0.0}}
    path.write_text(json.dumps({"version": compile_choice.VERSION, "records": bad}))
    assert read(path) == {}
    assert not decide(fingerprint(), 10**6, path=path).on


def test_the_file_lives_beside_the_inductor_cache_unless_named(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_choice.PATH_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_choice.measurements_path() == tmp_path / "scha-vae" / "measured_compile.json"
    monkeypatch.setenv(compile_choice.PATH_ENV, str(tmp_path / "x.json"))
    assert compile_choice.measurements_path() == tmp_path / "x.json"
