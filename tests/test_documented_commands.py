"""The commands README.md and docs/ show: every `python -m launch.<tool> ...` names an entry point that exists, and
every `key=value` in it is a key the tool takes (its own options, or the Hydra schema's): a renamed key or a typo
in the docs fails here. Running them, as written at tiny sizes, is tests/test_documented_commands_run.py."""
from __future__ import annotations

import importlib
import re
import shlex

import pytest

from conftest import ROOT
from trainer.config import check_override_keys
from trainer.run.errors import ConfigError

DOCS = [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md"))]
# each tool's own options beside the Hydra overrides (the DEFAULTS / option tables of launch/*.py)
OWN = {"generate": "DEFAULTS", "extract_set": "DEFAULTS", "plan": "PLAN_KEYS", "bench": "BENCH_DEFAULTS",
       "gpu_check": "DEFAULTS", "serve": "DEFAULTS"}
NOT_HYDRA = ("export", "sync_tracking", "torchrun", "quality_report")


def commands():
    found = []
    for doc in DOCS:
        text = doc.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            for m in re.finditer(r"python -m launch\.(\w+)([^`|;&#]*)", line):
                found.append((doc.name, m.group(1), m.group(2).strip()))
    return found


def test_the_docs_show_commands():
    assert len(commands()) >= 30


@pytest.mark.parametrize("doc, tool, args", commands())
def test_a_documented_command_names_a_tool_and_keys_it_takes(doc, tool, args):
    module = importlib.import_module(f"launch.{tool}")
    if tool in NOT_HYDRA:
        return
    try:
        words = shlex.split(args)
    except ValueError:
        words = args.split()
    own = set(getattr(module, OWN[tool])) if tool in OWN else set()
    overrides = [w for w in words if "=" in w and "<" not in w and "..." not in w and w.split("=")[0] not in own
                 and not w.startswith(("[", "-"))]
    try:
        schema = None
        if tool == "train_features":  # a config of its own (configs/train_features.yaml)
            from trainer.evaluation.feature_training import FeatureRunConfig as schema
        check_override_keys([w.strip("[]") for w in overrides], schema)
    except ConfigError as exc:
        pytest.fail(f"{doc}: `python -m launch.{tool} {args}`: {exc}")


def test_a_renamed_key_in_a_doc_would_fail():
    with pytest.raises(pytest.fail.Exception, match="did you mean eval.set_sizes"):
        test_a_documented_command_names_a_tool_and_keys_it_takes("x.md", "evaluate", "eval=elbo eval.set_size=[5]")
