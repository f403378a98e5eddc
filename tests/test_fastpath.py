"""The speed settings (trainer/fastpath.py): how `auto` resolves, config errors, the GELU-recomputing convolution,
the device-side non-finite guard, and bf16 against fp32 on the same weights and batch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.gelu_conv import GeluConv2d
from trainer import fastpath
from trainer.config import TrainerConfig
from trainer.guard import NonFiniteGuard


@pytest.mark.parametrize("fast_cpu", [True, False])
def test_auto_settings_resolve_by_device(monkeypatch, fast_cpu):
    monkeypatch.setattr(fastpath, "cpu_has_fast_bf16", lambda: fast_cpu)
    cpu = fastpath.resolve(TrainerConfig(), "cpu")
    assert cpu.precision == ("amp_bf16" if fast_cpu else "fp32")
    assert cpu.channels_last == fast_cpu and cpu.guard_every == 1 and not cpu.compile  # NHWC pays with bf16 only
    assert cpu.input_dtype == torch.float32 and cpu.autocast == fast_cpu
    # ZeRO >= 1 and DeepSpeed's bf16 mode keep weights in flat buffers: no channels-last there
    assert not fastpath.resolve(TrainerConfig(zero_stage=1), "cpu").channels_last
    assert fastpath.resolve(TrainerConfig(channels_last="true", precision="fp32"), "cpu").channels_last
    bf16 = fastpath.resolve(TrainerConfig(precision="bf16"), "cpu")
    assert not bf16.channels_last and bf16.input_dtype == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    gpu = fastpath.resolve(TrainerConfig(), "cuda")
    assert gpu.precision == "amp_bf16" and gpu.guard_every == fastpath.GPU_GUARD_EVERY and gpu.channels_last
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    assert fastpath.resolve(TrainerConfig(), "cuda").precision == "fp32"  # V100: no bf16 tensor cores
    assert fastpath.resolve(TrainerConfig(guard_every=5, compile="true"), "cuda").guard_every == 5


@pytest.mark.parametrize("kwargs, message", [
    ({"channels_last": "true", "zero_stage": 2}, "trainer.channels_last=true needs trainer.zero_stage=0"),
    ({"channels_last": "true", "precision": "bf16"}, "a precision other than bf16"),
    ({"compile": "true", "zero_stage": 3}, "trainer.compile=true needs trainer.zero_stage <= 2"),
    ({"compile": "yes"}, "trainer.compile must be one of"),
    ({"guard_every": -1}, "trainer.guard_every must be >= 0"),
    ({"precision": "fp16"}, "trainer.precision must be one of"),
])
def test_impossible_speed_settings_fail_naming_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainerConfig(**kwargs)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("amp", [False, True])
def test_gelu_conv_matches_the_plain_composition_bit_for_bit(channels_last, amp):
    torch.manual_seed(0)
    layer = GeluConv2d(8, 16, 3, padding=1)
    x = torch.randn(4, 8, 10, 10, requires_grad=True)
    if channels_last:
        layer = layer.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        fused = layer(x)
        plain = torch.nn.Conv2d.forward(layer, F.gelu(x))
    assert fused.dtype == (torch.bfloat16 if amp else torch.float32)
    assert torch.equal(fused, plain)
    g = torch.randn_like(fused)
    for a, b in zip(torch.autograd.grad(fused, (x, layer.weight, layer.bias), g),
                    torch.autograd.grad(plain, (x, layer.weight, layer.bias), g)):
        assert torch.equal(a, b)


def test_gelu_conv_keeps_only_its_input_for_backward():
    layer = GeluConv2d(8, 16, 1)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    activations = [t for t in saved if t.dim() == 4 and t.shape[0] == 2]
    assert len(activations) == 1 and activations[0] is x  # autograd would keep x and gelu(x)


def test_device_guard_zeroes_a_bad_update_and_counts_runs():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    guard = NonFiniteGuard(model, max_consecutive=3, every=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard.attach(opt)
    x = torch.randn(8, 4)
    for step in range(8):
        before = [p.detach().clone() for p in model.parameters()]
        loss = model(x).pow(2).mean() * (float("nan") if step in (1, 5, 6) else 1.0)
        loss.backward()
        bad = guard.mark(loss)
        opt.step()
        opt.zero_grad()
        after = list(model.parameters())
        assert bad.item() == float(step in (1, 5, 6))
        assert all(torch.isfinite(p).all() for p in after)
        assert all(torch.equal(a, b) for a, b in zip(before, after)) == (step in (1, 5, 6))  # SGD: zero grad, no move
        if step == 3:
            assert guard.check() == (1, False) and guard.consecutive == 1
    guard.request_stop()
    assert guard.check() == (2, True) and guard.consecutive == 2
    assert guard.check() == (0, True) and guard.consecutive == 0


def test_bf16_and_fp32_give_the_same_elbo_on_the_same_weights_and_batch(omniglot_ns_shards):
    """The paper SCHA-VAE, a real Omniglot batch, weights moved off their zero-initialised heads by a few fp32
    steps: fp32, autocast bf16 (amp_bf16, channels-last) and bf16 weights (DeepSpeed's bf16 mode) agree within
    0.5% per image."""
    from hydra import compose, initialize_config_dir

    from data_pipeline.loaders import make_set_loader
    from launch.app import CONFIG_DIR
    from models.objective import elbo_terms, training_loss
    from models.registry import build_model
    from trainer.config import load_config

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = load_config(compose("config", overrides=[
            "model=schavae", "data.batch_sets=4", f"data.shards_dir={omniglot_ns_shards}", "data.download=false"]))
    loader = make_set_loader(cfg.data, "val")
    loader.set_epoch(0)
    x = next(iter(loader))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        training_loss(elbo_terms(model(x)), 1.0).backward()
        opt.step()
        opt.zero_grad()
    model.eval()

    def vlb(m, inp, amp=False):
        torch.manual_seed(1)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return elbo_terms(m(inp)).vlb.item()

    fp32 = vlb(model, x)
    amp = vlb(model.to(memory_format=torch.channels_last), x, amp=True)
    bf16 = vlb(model.to(memory_format=torch.contiguous_format).bfloat16(), x.bfloat16())
    assert fp32 < -50  # nats per image: a real likelihood, not a degenerate one
    assert amp == pytest.approx(fp32, rel=0.005) and bf16 == pytest.approx(fp32, rel=0.005)
