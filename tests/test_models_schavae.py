"""SCHA-VAE and SCHA-VAE-LAG (SPEC 2.5, 3.10-3.13): structure, objective terms, importance weights, sampling."""
from __future__ import annotations

import math

import pytest
import torch

from models.layers_multiscale import DEFAULT_STRINGS_64, resolve_multiscale_strings
from models.objective import elbo_terms, training_loss
from models.registry import build_model, count_parameters, paper_config
from models.schavae import SCHAVAE

# SPEC 3.13, "params that get a gradient" of the reference (its total also counts ~7.3M dead CHFSGM modules)
PAPER_COUNTS = {"schavae": 4_761_793, "schavae_lag": 5_653_441}

TINY = dict(
    hidden_dim=16, c_dim=4, z_dim=4,
    str_enc="32-1,16-1,8-1,4-1,2-1,1-1", str_gen="8-1,4-1,2-1,1-1", str_dec="32-1,16-1,8-1",
)
TINY64 = dict(
    hidden_dim=16, c_dim=4, z_dim=4, image_channels=3, image_size=64, likelihood="discretized_mix_logistic",
    n_mixtures=3, str_enc="64-1,32-1,16-1,8-1,4-1,2-1,1-1", str_gen="8-1,4-1,2-1,1-1", str_dec="64-1,32-1,16-1,8-1",
)
B, S = 2, 3


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(name: str = "schavae", **kw) -> SCHAVAE:
    return build_model(paper_config(name, **{**TINY, **kw}))


def binary_batch(b: int = B, s: int = S, size: int = 28) -> torch.Tensor:
    return (torch.rand(b, s, 1, size, size) > 0.5).float()


def rgb_batch(b: int = B, s: int = S) -> torch.Tensor:
    return torch.randint(0, 256, (b, s, 3, 64, 64)).float() / 255


# --------------------------------------------------------------------------------------------------
# structure


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_paper_parameter_counts(name):
    model = build_model(paper_config(name))
    assert isinstance(model, SCHAVAE)
    assert count_parameters(model) == PAPER_COUNTS[name]
    assert model.n_layers == 18
    assert model.layer_res == [1] * 3 + [2] * 3 + [4] * 6 + [8] * 6
    assert len(model.encoder.blocks) == 33 and len(model.decoder.blocks) == 21
    assert model.blocks_c[0].z_proj is None and all(b.z_proj is not None for b in model.blocks_c[1:])


def test_lag_adds_one_attention_per_context_layer():
    mean = count_parameters(build_model(paper_config("schavae")))
    lag = build_model(paper_config("schavae_lag"))
    assert count_parameters(lag) - mean == 18 * 3 * (128 * 128 + 128)
    assert all(b.att is not None for b in lag.blocks_c)


def test_initialisation():
    model = build_model(paper_config("schavae"))
    scale18, scale33, scale21 = (math.sqrt(1 / n) for n in (18, 33, 21))
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Conv2d) and ".att." not in name:
            assert torch.count_nonzero(mod.bias) == 0, name  # get_conv: zero biases
    for mod in model.modules():
        assert not isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.GroupNorm))
    for blocks in (model.blocks_c, model.blocks_z):
        for blk in blocks:
            assert torch.count_nonzero(blk.prior.c4.weight) == 0  # zero-initialised prior heads
            # 3x3 convs only above 2x2
            assert blk.resnet.c2.kernel_size == ((3, 3) if blk.res > 2 else (1, 1))
    # the sqrt(1/n) scalings shrink the default-init bound 1/sqrt(fan_in) by the factor
    def bound(conv):
        return 1 / math.sqrt(conv.weight[0].numel())

    assert model.blocks_z[5].resnet.c4.weight.abs().max() <= bound(model.blocks_z[5].resnet.c4) * scale18
    assert model.blocks_c[5].c_proj.weight.abs().max() <= bound(model.blocks_c[5].c_proj) * scale18
    assert model.encoder.blocks[0].c4.weight.abs().max() <= bound(model.encoder.blocks[0].c4) * scale33
    assert model.decoder.blocks[0].c4.weight.abs().max() <= bound(model.decoder.blocks[0].c4) * scale21
    assert model.decoder.out_conv.weight.abs().max() <= bound(model.decoder.out_conv) * scale21
    # the encoder group "2" is 1x1 even for its first block, which runs at 4x4 before down-sampling
    first_of_2 = model.encoder.blocks[9 + 6 + 6 + 6]
    assert first_of_2.down and first_of_2.c2.kernel_size == (1, 1)


def test_resolution_strings():
    # 64x64 with the 32-level defaults: the model switches to its documented 64-level strings
    cfg32 = paper_config("schavae")
    enc, gen, dec = resolve_multiscale_strings(64, cfg32.str_enc, cfg32.str_gen, cfg32.str_dec)
    assert enc[0] == (64, 3) and dec[-1] == (64, 3) and sum(n for _, n in gen) == 18
    assert resolve_multiscale_strings(64, None, None, None)[0][0][0] == 64
    assert DEFAULT_STRINGS_64["str_enc"].startswith("64-")
    # inconsistent strings fail clearly, naming the field
    with pytest.raises(ValueError, match="model.str_enc"):
        resolve_multiscale_strings(64, "32-1,16-1,8-1,4-1,2-1,1-1", "8-1,4-1,2-1,1-1", "64-1,32-1,16-1,8-1")
    with pytest.raises(ValueError, match="model.str_enc"):  # generator needs 2 and 1, encoder stops at 4
        tiny(str_enc="32-1,16-1,8-1,4-1")
    with pytest.raises(ValueError, match="model.str_dec"):
        tiny(str_dec="32-1,16-1")
    with pytest.raises(ValueError, match="model.str_gen"):
        tiny(str_gen="8-x")


# --------------------------------------------------------------------------------------------------
# forward and objective


def check_output(out, b, s, n_layers, out_ch, size):
    assert out.logpx.shape == (b, s)
    assert len(out.kl_z) == n_layers and len(out.kl_c) == n_layers
    assert all(k.shape == (b, s) for k in out.kl_z) and all(k.shape == (b,) for k in out.kl_c)
    assert out.px.shape == (b, s, out_ch, size, size)
    for t in [out.logpx, out.px, *out.kl_z, *out.kl_c]:
        assert torch.isfinite(t).all()
    assert all((k >= -1e-4).all() for k in out.kl_z + out.kl_c)


@pytest.mark.parametrize("aggregation", ["mean", "max", "lag"])
def test_forward_tiny_binary(aggregation):
    model = tiny(aggregation=aggregation)
    out = model(binary_batch())
    check_output(out, B, S, 4, 1, 28)
    assert (out.logpx <= 0).all()
    if aggregation == "lag":
        att = out.extras["attention"]
        assert len(att) == 4 and all(a.shape == (B, 4, S) for a in att)
        assert torch.allclose(att[0].sum(-1), torch.ones(B, 4))


def test_forward_tiny_rgb64_mixlog():
    model = build_model(paper_config("schavae_lag", **TINY64))
    x = rgb_batch()
    out = model(x)
    check_output(out, B, S, 4, model.likelihood.out_channels(), 64)
    loss = training_loss(elbo_terms(out), 2.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.sample_unconditional(2, 2).shape == (2, 2, 3, 64, 64)
    xs = model.sample_refined(x, iterations=1, variant="v2")
    assert xs.shape == x.shape and xs.min() >= 0 and xs.max() <= 1


def test_64_defaults_build_and_run():
    cfg = paper_config("schavae", hidden_dim=8, c_dim=2, z_dim=2, image_channels=3, image_size=64,
                       likelihood="discretized_mix_logistic", n_mixtures=2)
    model = build_model(cfg)
    assert model.enc_groups[0] == (64, 3) and model.n_layers == 18
    out = model(rgb_batch(1, 2))
    check_output(out, 1, 2, 18, model.likelihood.out_channels(), 64)


def test_kl_near_zero_at_init():
    """Zero-initialised prior heads make every prior N(0, I) at init, and the small default-init posterior
    heads keep the KLs near zero (SPEC 8 item 5: SCHA-VAE's KLs start ~ 0)."""
    model = build_model(paper_config("schavae"))
    x = binary_batch(2, 3)
    h = model.encoder(x.flatten(0, 1))
    pm, pv, xpp = model.blocks_c[0].prior_params(model.x_c.expand(2, -1, -1, -1))
    assert torch.count_nonzero(pm) == 0 and torch.count_nonzero(pv) == 0 and torch.count_nonzero(xpp) == 0
    terms = elbo_terms(model(x))
    assert terms.kl_z.item() < 1.0 and terms.kl_c.item() < 1.0  # nats per image, over 18 layers
    assert terms.logpx.item() < -100  # the likelihood dominates
    assert h[1].shape == (6, 128, 1, 1)


@pytest.mark.parametrize("name", ["schavae", "schavae_lag"])
def test_gradients_reach_every_parameter(name):
    model = tiny(name)
    x = binary_batch()
    training_loss(elbo_terms(model(x)), 2.0).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    # at init the zero last conv of each prior head blocks the gradient to the head's first three convs (and
    # the zero top state x_c gives the top prior's first conv a zero input); once they move off zero, every
    # parameter gets a non-zero gradient
    with torch.no_grad():
        model.x_c.normal_(0.0, 0.01)
        for blk in [*model.blocks_c, *model.blocks_z]:
            blk.prior.c4.weight.normal_(0.0, 0.01)
    model.zero_grad()
    training_loss(elbo_terms(model(x)), 2.0).backward()
    for pname, p in model.named_parameters():
        assert p.grad.abs().sum() > 0, pname


def test_limit_layer():
    model = tiny()
    x = binary_batch()
    torch.manual_seed(1)
    full = model(x)
    torch.manual_seed(1)
    same = model(x, limit_layer=model.n_layers - 1)
    torch.manual_seed(1)
    top = model(x, limit_layer=0)
    assert torch.equal(full.px, same.px)
    assert not torch.allclose(full.px, top.px)
    check_output(top, B, S, 4, 1, 28)
    # the top layer's terms do not depend on the limit
    assert torch.allclose(full.kl_c[0], top.kl_c[0]) and torch.allclose(full.kl_z[0], top.kl_z[0])


def test_decoder_reads_top_left_pixel_of_c_state():
    """Reference semantics kept on purpose (SPEC 8 item 3): only x_c[..., 0, 0] reaches the decoder."""
    model = tiny()
    x_z = torch.randn(B * S, 16, 8, 8)
    x_c = torch.randn(B, 16, 8, 8)
    x_c2 = x_c.clone()
    x_c2[..., 1:, :] += 1.0
    x_c2[..., 0, 1:] += 1.0
    assert torch.allclose(model.decoder(x_z, x_c, S), model.decoder(x_z, x_c2, S))


# --------------------------------------------------------------------------------------------------
# importance weights


def test_log_weights():
    model = tiny()
    model.train()
    x = binary_batch()
    lw = model.log_weights(x, k=7, chunk=3)
    assert lw.shape == (7, B) and torch.isfinite(lw).all()
    assert model.training  # mode restored
    iwae = torch.logsumexp(lw, 0) - math.log(7)
    assert (iwae >= lw.mean(0)).all()
    # each weight is a single-sample ELBO of the whole set: same scale as the analytic per-set ELBO
    out = model(x)
    elbo = out.logpx.sum(1) - torch.stack(out.kl_z).sum((0, 2)) - torch.stack(out.kl_c).sum(0)
    assert torch.allclose(lw.mean(0), elbo, rtol=0.02)


# --------------------------------------------------------------------------------------------------
# sampling


def in_unit(x):
    return bool((x >= 0).all() and (x <= 1).all())


@pytest.mark.parametrize("name", ["schavae", "schavae_lag"])
def test_sampling_modes(name):
    model = tiny(name)
    x = binary_batch()
    shape = (B, S, 1, 28, 28)
    outs = {
        "reconstruct": model.reconstruct(x),
        "unconditional": model.sample_unconditional(B, S),
        "posterior": model.sample_conditional(x, mode="posterior"),
        "top": model.sample_conditional(x, mode="top"),
        "v1": model.sample_refined(x, iterations=2, variant="v1"),
        "v2": model.sample_refined(x, iterations=2, variant="v2"),
    }
    for key, out in outs.items():
        assert out.shape == shape, key
        assert in_unit(out), key
    every = model.sample_refined(x, iterations=2, variant="v2", return_all=True)
    assert every.shape == (3, *shape) and in_unit(every)
    binary = model.sample_unconditional(4, 2, binary=True)
    assert binary.shape == (4, 2, 1, 28, 28) and set(binary.unique().tolist()) <= {0.0, 1.0}
    assert set(model.sample_conditional(x, binary=True).unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError):
        model.sample_conditional(x, mode="bottom")
    with pytest.raises(ValueError):
        model.sample_refined(x, variant="v3")


def test_conditional_modes_use_the_context():
    """'top' takes only the first context layer from q; 'posterior' takes every one (SPEC 3.12)."""
    model = tiny()
    x = binary_batch()
    h = model.encoder(x.flatten(0, 1))
    # the first layer's q(c) reads X, so conditioning changes what is decoded compared with the prior
    torch.manual_seed(3)
    x_z, x_c, *_ = model._top_down(B, S, h, None, "top", "p")
    torch.manual_seed(3)
    x_z2, x_c2, *_ = model._top_down(B, S, None, None, "p", "p")
    assert not torch.allclose(x_c, x_c2)
