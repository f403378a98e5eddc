"""trainer/measure/: the memory probes, FLOP counting and device peaks, the plain-torch engine, the synthetic
batch, and the ours-vs-reference report of launch.gpu_check (numbers checked by hand)."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from trainer.config import TrainerConfig
from trainer.fastpath import FastPath
from trainer.measure import reference
from trainer.measure.bench import cpu_threads, synthetic_batch, timed
from trainer.measure.flops import count_flops, peak_flops
from trainer.measure.memory import PeakMemory, fixed_mmap_threshold, release_free_memory
from trainer.measure.plain import PlainEngine

MiB = 1 << 20
FP32 = FastPath("fp32", channels_last=False, guard_every=1, compile=False)


def test_cpu_peak_memory_follows_a_freed_tensor():
    assert fixed_mmap_threshold()  # glibc: large blocks by mmap, so a freed tensor leaves the resident set
    mem = PeakMemory(torch.device("cpu"))
    assert mem.method == "cpu_vmhwm_reset"
    mem.start()
    x = torch.ones(64 * MiB // 4)  # 64 MiB, written (resident), then freed
    del x
    release_free_memory()
    peak = mem.peak()
    assert 60 * MiB <= peak <= 80 * MiB and mem.held() == peak
    mem.reset_peak()
    y = torch.ones(16 * MiB // 4)
    assert 14 * MiB <= mem.peak() <= 30 * MiB  # a new peak: the 64 MiB are forgotten, the base kept
    del y


def test_sampled_rss_method_sees_a_tensor_held_while_sampling(monkeypatch):
    monkeypatch.setattr(PeakMemory, "_can_reset_hwm", staticmethod(lambda: False))
    mem = PeakMemory(torch.device("cpu"))
    assert mem.method == "cpu_rss_sampled_1ms"
    fixed_mmap_threshold()
    mem.start()
    x = torch.ones(32 * MiB // 4)
    assert timed(lambda: time.sleep(0.05), torch.device("cpu")) >= 0.05  # the sampler thread runs meanwhile
    peak = mem.peak()
    mem.stop()
    del x
    assert 30 * MiB <= peak <= 48 * MiB


def test_flop_count_of_a_linear_layer_and_failures_give_none():
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64)
    assert count_flops(lambda: layer(x)) == 2 * 8 * 64 * 32
    # forward + the weight gradient (the input needs none)
    assert count_flops(lambda: layer(x).sum().backward()) == 2 * 2 * 8 * 64 * 32

    def broken():
        raise RuntimeError("not countable")

    assert count_flops(broken) is None


def test_peak_flops_by_device_name_and_precision(monkeypatch):
    cuda = torch.device("cuda")
    assert peak_flops(cuda, "NVIDIA H200", "amp_bf16") == (989e12, "bf16 tensor")
    assert peak_flops(cuda, "NVIDIA H100 PCIe", "bf16") == (756e12, "bf16 tensor")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert peak_flops(cuda, "NVIDIA A100-SXM4-80GB", "fp32") == (156e12, "tf32 tensor (cudnn.allow_tf32)")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert peak_flops(cuda, "NVIDIA H100 80GB HBM3", "fp32") == (66.9e12, "fp32")
    assert peak_flops(cuda, "Tesla T4", "fp32") == (None, None)
    assert peak_flops(torch.device("cpu"), "NVIDIA H200", "fp32") == (None, None)


def test_plain_engine_accumulates_clamps_and_clips():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    cfg = SimpleNamespace(trainer=TrainerConfig(grad_clamp=0.01, grad_clip_norm=0.0, lr=0.1, weight_decay=0.0))
    engine = PlainEngine(model, cfg, grad_accum=2, fast=FP32, device=torch.device("cpu"))
    seen = []
    engine.optimizer.register_step_post_hook(lambda opt, *_: seen.append(max(p.grad.abs().max().item()
                                                                              for p in engine.params)))
    x = torch.randn(16, 4) * 100  # gradients far above the clamp
    before = model.weight.detach().clone()
    engine.backward(engine(x).pow(2).mean())
    assert not engine.is_gradient_accumulation_boundary()
    engine.step()
    assert torch.equal(model.weight, before) and model.weight.grad is not None  # accumulating, no update yet
    assert engine.is_gradient_accumulation_boundary()
    engine.backward(engine(x).pow(2).mean())
    engine.step()
    assert seen == [pytest.approx(0.01)]  # one optimizer step, with every gradient clamped to +-0.01
    assert not torch.equal(model.weight, before) and model.weight.grad is None
    # the global-norm clip (no clamp) bounds the gradient norm the optimizer steps with
    cfg = SimpleNamespace(trainer=TrainerConfig(grad_clamp=0.0, grad_clip_norm=0.5))
    engine = PlainEngine(torch.nn.Linear(4, 1), cfg, grad_accum=1, fast=FP32, device=torch.device("cpu"))
    norms = []
    engine.optimizer.register_step_pre_hook(
        lambda opt, *_: norms.append(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in engine.params]))))
    engine.backward(engine(x).pow(2).mean())
    engine.step()
    assert norms[0].item() == pytest.approx(0.5, rel=1e-5)


def test_synthetic_batches_have_the_likelihoods_values():
    gen = torch.Generator().manual_seed(0)
    bern = SimpleNamespace(model=SimpleNamespace(image_channels=1, image_size=28, likelihood="bernoulli"),
                           data=SimpleNamespace(set_size=5))
    x = synthetic_batch(bern, 3, gen)
    assert x.shape == (3, 5, 1, 28, 28) and set(x.unique().tolist()) == {0.0, 1.0}
    assert 0.25 < x.mean().item() < 0.35
    rgb = SimpleNamespace(model=SimpleNamespace(image_channels=3, image_size=8, likelihood="discretized_logistic"),
                          data=SimpleNamespace(set_size=2))
    y = synthetic_batch(rgb, 2, gen)
    assert y.shape == (2, 2, 3, 8, 8) and 0 <= y.min() and y.max() <= 1
    assert torch.equal((y * 255).round() / 255, y)  # 8-bit intensities


def test_cpu_threads(monkeypatch):
    assert cpu_threads("3") == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert cpu_threads("auto") == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert cpu_threads("auto") == 1


# -- the ours-vs-reference report -------------------------------------------------------------------------------
def cuda_record(row: reference.Row, train: float, evaluation: float) -> dict:
    return {"device": "cuda", "batch_sets": row.batch_sets, "set_size": row.set_size, "train_img_s": train,
            "eval_img_s": evaluation, "precision": "amp_bf16", "peak_mem_train_bytes": 10,
            "predicted": {"peak_train_bytes": 11}}


def test_reference_table_is_designs_table():
    rows = {r.key: r for r in reference.ROWS}
    assert len(rows) == 8
    assert (rows["schavae_16x5"].train_img_s, rows["schavae_16x5"].eval_img_s) == (307, 1482)
    assert rows["schavae_128x5"].eval_img_s is None and rows["vae_100x1"].set_size == 1
    assert reference.bench_overrides(rows["schavae_large_100x5"], compiled=True, reduced=False) == [
        "model=schavae", "model.hidden_dim=256", "data.batch_sets=100", "data.set_size=5", "trainer.compile=true",
        "trainer.data_parallel=sharded"]
    assert reference.bench_overrides(rows["vae_100x1"], compiled=False, reduced=True)[1:3] == [
        "data.batch_sets=2", "data.set_size=1"]
    order = reference.rows_in_order()
    assert [c for _, c in order] == [False] * 8 + [True] * 8  # the eager table first


def test_ratios_only_for_full_size_cuda_measurements():
    row, lag = reference.ROWS[0], reference.ROWS[2]  # SCHA-VAE 16x5 (307 / 1,482), 128x5 (1,827 / -)
    r = reference.result(row, False, False, cuda_record(row, 3070.0, 7410.0), "measured", None, "cmd")
    assert r["ratio_train"] == pytest.approx(10.0) and r["ratio_eval"] == pytest.approx(5.0)
    assert r["meets_target"] is False  # eval is 5x of the 10x asked
    ok = reference.result(lag, True, False, cuda_record(lag, 5481.0, 9000.0), "measured", None, "cmd")
    assert ok["ratio_train"] == pytest.approx(3.0) and ok["ratio_eval"] is None and ok["meets_target"] is True
    cpu = reference.result(row, False, True, {**cuda_record(row, 30.0, 70.0), "device": "cpu", "batch_sets": 2},
                           "measured", None, "cmd")
    assert cpu["ratio_train"] is None and cpu["meets_target"] is None and cpu["measured_batch_sets"] == 2
    missing = reference.result(row, True, False, None, "timed out", "over its 150 s cap", "cmd")
    assert missing["train_img_s"] is None and missing["ratio_train"] is None


def test_markdown_report_states_whether_gpu_figures_were_taken():
    row = reference.ROWS[0]
    lines = [reference.result(row, False, False, cuda_record(row, 614.0, 2964.0), "measured", None, "c"),
             reference.result(row, True, False, None, "timed out", "over its 150 s cap", "c")]
    report = {"device_name": "NVIDIA H200", "gpu_figures_taken": True, "notice": None,
              "bench_options": "warmup=3 steps=10", "wall_s": 400.0, "budget_s": 480.0, "rows": lines,
              "tests": {"command": "pytest -m gpu", "passed": 9, "failed": 1, "errors": 0, "skipped": 0,
                        "skip_reasons": [], "failures": ["tests.test_gpu::test_x"]}}
    md = reference.markdown(report)
    assert "| SCHA-VAE, 16x5 (paper config) | off | 614.0 | 307 | 2.00x | 2,964.0 | 1,482 | 2.00x | 10x |" in md
    assert "| on | - | 307 | - |" in md and "timed out: over its 150 s cap" in md
    assert "9 passed, 1 failed" in md and "FAILED: tests.test_gpu::test_x" in md and "NOT taken" not in md
    md_cpu = reference.markdown({**report, "gpu_figures_taken": False, "notice": reference.NOT_TAKEN})
    assert reference.NOT_TAKEN in md_cpu
