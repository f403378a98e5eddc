"""trainer/run/exits.py, the one exit policy: anticipated failures become their table code and a one-line
message; anything else is exit 1 with its traceback."""
from __future__ import annotations

import pytest

from data_pipeline.errors import DataError, StoreUnavailable
from trainer.guard import NonFiniteLoss
from trainer.registry.package import PackageError
from trainer.run import exit_codes
from trainer.run.errors import (CollectiveFailed, ConfigError, ModelNotFound, RunDirBusy, RunIOError, RunMismatch,
                                TrackingUnavailable)
from trainer.run.exits import exit_with, run


@pytest.mark.parametrize("exc, code, prefix", [
    (ConfigError("bad key"), exit_codes.CONFIG_ERROR, "config error: bad key"),
    (RunMismatch("model differs"), exit_codes.CONFIG_ERROR, "config error: model differs"),
    (DataError("shard gone"), exit_codes.CONFIG_ERROR, "data error: shard gone"),
    (PackageError("pickle"), exit_codes.CONFIG_ERROR, "model error: pickle"),
    (NonFiniteLoss("5 steps"), exit_codes.DIVERGED, "training stopped: 5 steps"),
    (RunIOError("writing", "/x", OSError(28, "No space left on device")), exit_codes.IO_ERROR, "I/O error: writing /x"),
    (RunDirBusy("held by pid 1"), exit_codes.RUN_DIR_BUSY, "refused: held by pid 1"),
    (CollectiveFailed("rank 1"), exit_codes.COLLECTIVE_FAILED, "collective failed: rank 1"),
    (TrackingUnavailable("down"), exit_codes.TRACKING_UNAVAILABLE, "tracking unavailable: down"),
    (ModelNotFound("no alias"), exit_codes.MODEL_NOT_FOUND, "model error: no alias"),
    (StoreUnavailable("s3://b/x: read failed 5 times"), exit_codes.DATA_UNAVAILABLE,
     "data store unavailable: s3://b/x"),
])
def test_anticipated_failures_exit_with_their_code_and_one_line(capsys, exc, code, prefix):
    told = []

    def work():
        raise exc

    assert run(work, on_failure=lambda c, m: told.append((c, m))) == code
    err = capsys.readouterr().err
    assert err.startswith(prefix) and "Traceback" not in err
    assert told == [(code, err.strip())]


def test_our_own_bug_is_exit_1_with_its_traceback_never_a_config_error(capsys):
    def work():
        return {}["missing"]

    assert run(work) == exit_codes.UNEXPECTED
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err and "config error" not in err
    assert run(lambda: int("x")) == exit_codes.UNEXPECTED  # a plain ValueError is a bug too


def test_codes_and_system_exit_pass_through():
    assert run(lambda: None) == exit_codes.OK and run(lambda: exit_codes.PREEMPTED) == exit_codes.PREEMPTED
    with pytest.raises(SystemExit) as stop:
        run(lambda: (_ for _ in ()).throw(SystemExit(3)))
    assert stop.value.code == 3
    exit_with(lambda: 0)  # a Hydra task that succeeded returns normally
    with pytest.raises(SystemExit) as stop:
        exit_with(lambda: exit_codes.MODEL_NOT_FOUND)
    assert stop.value.code == exit_codes.MODEL_NOT_FOUND


def test_no_literal_exit_numbers_in_launch():
    import re

    from conftest import ROOT

    offenders = []
    for path in sorted((ROOT / "launch").glob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\breturn [1-9]\d*\b|SystemExit\([1-9]|sys\.exit\(", line):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert not offenders, offenders
