"""Bounded under hostile input: a tampered model package and a folder of huge images are refused with exit 2 and
one line naming the file and the field, before anything large is allocated; the entry points run in a child
process whose peak RSS is measured (os.wait4). Also: torn metrics records, strict evaluation JSON."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from conftest import ROOT

# a child that imports torch (~510 MB here), Hydra and the package is ~650 MB; before these checks the variants
# below took 4-5 GB
PEAK_RSS_MB = 1000  # absolute ceiling; the assertion is against the import baseline


def _high_water_mb(pid: int) -> float:
    """The process's own peak RSS so far (VmHWM of its current program), 0 once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def measured(cmd: list, cwd: Path, timeout: float = 300) -> dict:
    """Run `cmd`; its exit code, stdout, stderr, wall time and the child's own peak RSS (MB).

    The peak is VmHWM read every 50 ms, not wait4's ru_maxrss: Linux counts the forking parent's resident pages
    into the child's maxrss (a pytest worker that grew to 2 GB reports 2 GB for any child it starts)."""
    out, err = cwd / "child.out", cwd / "child.err"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    peak = 0.0
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=o, stderr=e, env=env)
        deadline = t0 + timeout
        while True:
            peak = max(peak, _high_water_mb(proc.pid))
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                pytest.fail(f"{cmd[:4]} ran past {timeout} s:\n{err.read_text()[-3000:]}")
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "stdout": out.read_text(), "stderr": err.read_text(),
            "seconds": time.monotonic() - t0, "peak_mb": peak}


# ------------------------------------------------------------------------------------------------ packages
def _card(directory: Path) -> dict:
    return json.loads((directory / "model.json").read_text())


def _tamper_card(directory: Path, section: str, key: str, value) -> None:
    card = _card(directory)
    card[section][key] = value
    (directory / "model.json").write_text(json.dumps(card))


def _retype(directory: Path, dtype, only: str | None = None, fill: float | None = None) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(directory / "weights.safetensors"))
    for k, v in state.items():
        if v.is_floating_point() and (only is None or k == only):
            state[k] = v.to(dtype) if fill is None else torch.full_like(v, fill)
    save_file(state, str(directory / "weights.safetensors"))


# each: how the package is tampered, and what the one line must say (file and field)
TAMPERED = {
    "n_stochastic": (lambda d: _tamper_card(d, "model", "n_stochastic", 1_000_000),
                     "model.json: model.n_stochastic = 1000000 exceeds the limit of 32"),
    "inputs_size": (lambda d: _tamper_card(d, "inputs", "size", 20000),
                    "model.json: inputs.size = 20000 differs from model.image_size = 28"),
    "max_set_size": (lambda d: _tamper_card(d, "inputs", "max_set_size", 1e9),
                     "model.json: invalid model card (inputs.max_set_size = 1000000000.0 is not int)"),
    "max_set_size_int": (lambda d: _tamper_card(d, "inputs", "max_set_size", 10**9),
                         "model.json: inputs.max_set_size = 1000000000 is outside 1..50"),
    "name": (lambda d: _tamper_card(d, "model", "name", "../../../../etc/passwd"),
             "model.json: model.name '../../../../etc/passwd' is not a model of the installed zoo"),
    "fp16": (lambda d: _retype(d, torch.float16), "is F16, the model's is F32"),
    "one_fp64": (lambda d: _retype(d, torch.float64, only="observation_decoder.conv_final.weight"),
                 "tensor 'observation_decoder.conv_final.weight' is F64, the model's is F32"),
    "all_nan": (lambda d: _retype(d, torch.float32, fill=float("nan")), "tensors hold NaN or infinite values"),
}


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """A real package of a small NS (W_h 32) as launch.export writes it."""
    from models.registry import ZOO, build_model, paper_config
    from data_pipeline.input_spec import InputSpec
    from trainer.registry.package import ModelCard, write_package

    cfg = paper_config("ns", hidden_dim=32)
    torch.manual_seed(0)
    model = build_model(cfg)
    directory = tmp_path_factory.mktemp("package") / "ns"
    card = ModelCard(cfg, InputSpec("omniglot_ns", 1, 28, "high", True, 5), ZOO["ns"].paper_name,
                     sum(p.numel() for p in model.parameters()), {"tag": "step000000010", "step": 10, "epoch": 1})
    write_package(directory, model.state_dict(), card)
    assert "observation_decoder.conv_final.weight" in model.state_dict()
    return directory


def _big_png(path: Path, width: int, height: int) -> None:
    """A valid 1-bit greyscale PNG of width x height pixels (all black), written row by row: a few KB on disk,
    width * height pixels when decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("huge_images")
    big = root / "big.png"
    _big_png(big, 10000, 10000)
    folders = {}
    for name, count in (("sixty", 60), ("twenty_one", 21)):
        folders[name] = root / name
        folders[name].mkdir()
        for i in range(count):
            os.link(big, folders[name] / f"{i:02d}.png")
    folders["one_big"] = root / "one_big"
    folders["one_big"].mkdir()
    os.link(big, folders["one_big"] / "huge.png")
    folders["bomb"] = root / "bomb"
    folders["bomb"].mkdir()
    _big_png(folders["bomb"] / "bomb.png", 20000, 20000)
    return folders


CHILD = r"""
import contextlib, io, json, resource, sys, time
import launch.generate as g
plan = json.loads(sys.argv[1])
results = {}
for name, argv in plan.items():
    err = io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stderr(err):
        rc = g.main(argv)
    results[name] = {"rc": rc, "stderr": err.getvalue(), "seconds": time.monotonic() - t0,
                     "peak_mb_after": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
print(json.dumps(results))
"""


def test_tampered_packages_and_huge_images_are_refused_within_a_few_hundred_mb(package, image_folders, tmp_path):
    """launch.generate on each tampered variant and each folder of huge PNGs, in one child process: exit 2, one
    line naming the file and the field, in seconds; the child's peak RSS stays within PEAK_RSS_MB throughout."""
    plan = {}
    good = [str(f) for f in sorted(image_folders["one_big"].parent.glob("sixty/0[0-4].png"))]
    small = tmp_path / "small"
    small.mkdir()
    from PIL import Image

    Image.new("L", (105, 105), 255).save(small / "a.png")
    for name, (tamper, _) in TAMPERED.items():
        variant = tmp_path / name
        shutil.copytree(package, variant)
        tamper(variant)
        plan[name] = [f"model_uri={variant}", f"images={small}", f"out={tmp_path / 'out' / name}"]
    for name in ("sixty", "twenty_one", "one_big", "bomb"):
        plan[f"images_{name}"] = [f"model_uri={package}", f"images={image_folders[name]}",
                                  f"out={tmp_path / 'out' / name}"]
    assert good
    child = measured([sys.executable, "-c", CHILD, json.dumps(plan)], tmp_path)
    assert child["rc"] == 0, child["stderr"][-3000:]
    results = json.loads(child["stdout"].strip().splitlines()[-1])
    expected = {name: needle for name, (_, needle) in TAMPERED.items()}
    expected.update(images_sixty="60 images given; the model conditions on at most 20",
                    images_twenty_one="21 images given; the model conditions on at most 20",
                    images_one_big="huge.png: 10000 x 10000 pixels (100,000,000) is above the limit of 25,000,000",
                    images_bomb="bomb.png: too large to decode")
    report = {n: (r["rc"], round(r["seconds"], 2), round(r["peak_mb_after"]), r["stderr"].strip()[-160:])
              for n, r in results.items()}
    print(json.dumps(report, indent=1))
    for name, needle in expected.items():
        r = results[name]
        lines = [line for line in r["stderr"].splitlines() if line.strip()]
        assert r["rc"] == 2 and len(lines) == 1 and needle in lines[0], (name, r["stderr"][-2000:])
        assert "Traceback" not in r["stderr"]
        assert r["seconds"] < 30, (name, r["seconds"])  # seconds on an idle machine; bounded when loaded
        where = str(tmp_path / name) if name in TAMPERED else str(image_folders[name[len("images_"):]])
        assert where in lines[0] or name in ("images_sixty", "images_twenty_one"), lines[0]
        assert not (tmp_path / "out" / name).exists()
    # the same interpreter with what launch.generate imports (torch alone is ~500 MB): the refusals add little
    baseline = measured([sys.executable, "-c", "import launch.generate, trainer.registry.package, "
                         "trainer.serving.generation, models.registry, PIL.Image"], tmp_path)
    assert child["peak_mb"] < min(PEAK_RSS_MB, baseline["peak_mb"] + 300), (report, baseline["peak_mb"])


def test_evaluate_refuses_a_tampered_card_before_the_data(package, tmp_path, omniglot_ns_shards):
    """The issue's first fault through launch.evaluate (4.5 GB and a MemoryError before): exit 2, one line."""
    variant = tmp_path / "n_stochastic"
    shutil.copytree(package, variant)
    TAMPERED["n_stochastic"][0](variant)
    child = measured([sys.executable, "-m", "launch.evaluate", "eval=kl_layer", f"model_uri={variant}",
                      f"run_dir={tmp_path / 'eval'}", f"data.shards_dir={omniglot_ns_shards}", "data.download=false",
                      f"tracking.root={tmp_path / 'mlruns'}"], tmp_path)
    lines = [line for line in child["stderr"].splitlines() if line.strip() and "WARNING" not in line]
    # the same interpreter with what launch.evaluate imports (torch, MLflow, Hydra, DeepSpeed's CPU parts)
    baseline = measured([sys.executable, "-c", "import launch.evaluate, trainer.evaluation.jobs, mlflow"], tmp_path)
    print({k: child[k] for k in ("rc", "seconds", "peak_mb")}, "baseline", round(baseline["peak_mb"]), lines[-1:])
    assert child["rc"] == 2 and "model.n_stochastic = 1000000 exceeds the limit of 32" in lines[-1], child["stderr"]
    assert str(variant / "model.json") in lines[-1] and "Traceback" not in child["stderr"]
    assert child["peak_mb"] < baseline["peak_mb"] + 300 and child["seconds"] < 60, (child["peak_mb"], baseline)


def test_the_untampered_package_and_images_within_the_limits_still_work(package, tmp_path):
    """The bounds refuse nothing the project itself writes: the package reads back, a set loads as before."""
    from PIL import Image

    from data_pipeline.user_images import MAX_PIXELS, list_images, load_set, open_images, prepare_set
    from trainer.registry.package import read_package

    model, card = read_package(package)
    assert card.model.name == "ns"
    for i, side in enumerate((105, 400)):
        img = Image.new("L", (side, side), 255)
        img.paste(0, (side // 4, side // 4, side // 2, side // 2))
        img.save(tmp_path / f"{i}.png")
    files = list_images([tmp_path])
    assert torch.equal(load_set(files, card.inputs, seed=3), prepare_set(open_images(files), card.inputs, seed=3))
    _big_png(tmp_path / "limit.png", 5000, MAX_PIXELS // 5000)  # exactly at the limit: accepted
    assert load_set([tmp_path / "limit.png"], card.inputs).shape == (1, 1, 28, 28)


@pytest.mark.parametrize("case", ["missing", "tampered"])
def test_prepare_on_bad_raw_data_exits_2_with_one_line(tmp_path, case):
    """launch.prepare, as the prepare Job runs it (which fails fast on 2): no Hydra traceback, exit 2, one line."""
    from conftest import run_module

    raw = tmp_path / "raw"
    raw.mkdir()
    if case == "tampered":
        for name in ("images_background.zip", "images_evaluation.zip"):
            (raw / name).write_bytes(b"PK\x03\x04" + b"\x00" * 200)  # a zip's magic, then nothing of one
    proc = run_module("launch.prepare", "data=omniglot_ns", f"data.raw_dir={raw}", f"data.shards_dir={tmp_path / 's'}",
                      "data.download=false", f"hydra.run.dir={tmp_path / 'hydra'}", cwd=tmp_path, check=False,
                      timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("data error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert str(raw) in errors[0]
    assert not (tmp_path / "s" / "omniglot_ns" / "manifest.json").exists()
