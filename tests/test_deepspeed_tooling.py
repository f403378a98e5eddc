"""DeepSpeed's own recovery tooling on the project's checkpoints: the `zero_to_fp32.py` that DeepSpeed copies into
every ZeRO checkpoint directory runs in the project's environment and rebuilds the same fp32 weights as
the safetensors package `launch.export` writes."""
from __future__ import annotations

import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import ROOT, run_module


def test_zero_to_fp32_script_matches_launch_export(tmp_path, omniglot_raw, omniglot_ns_shards):
    run_dir = tmp_path / "run"
    run_module("launch.train", "experiment=smoke", f"run_dir={run_dir}", f"data.raw_dir={omniglot_raw}",
               f"data.shards_dir={omniglot_ns_shards}", "data.download=false", "data.limit_batches=2",
               "trainer.epochs=1", "trainer.zero_stage=2", "trainer.precision=fp32", "tracking.enabled=false",
               cwd=ROOT)
    ckpt = run_dir / "checkpoints"
    script = ckpt / "zero_to_fp32.py"
    assert script.is_file(), sorted(p.name for p in ckpt.iterdir())
    tag = (ckpt / "latest").read_text().strip()

    # The script as a user runs it: plain python, its default (sharding, which needs huggingface_hub) options.
    out_dir = tmp_path / "fp32"
    proc = subprocess.run([sys.executable, str(script), str(ckpt), str(out_dir), "-t", tag], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (f"zero_to_fp32.py exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-3000:]}")
    from_script = {}
    for f in sorted(out_dir.glob("pytorch_model*.bin")):
        from_script.update(torch.load(f, map_location="cpu", weights_only=True))

    run_module("launch.export", str(run_dir), "--tag", tag, cwd=ROOT)
    exported = load_file(str(run_dir / "export" / tag / "weights.safetensors"))  # the default --out

    assert from_script and from_script.keys() == exported.keys()
    for name, tensor in exported.items():
        assert from_script[name].dtype == tensor.dtype, name
        assert torch.equal(from_script[name], tensor), name
