"""Conv family (SPEC 2.3, 2.4, 3.4, 3.5, 3.8, 3.9): CNS, CNS-LAG, CHFSGM, CHFSGM-LAG and ConvLAG."""
from __future__ import annotations

import math

import pytest
import torch

from models.attention_conv import ConvLAG
from models.chfsgm import CHFSGM
from models.cns import ConvNeuralStatistician
from models.objective import elbo_terms, training_loss
from models.registry import build_model, count_parameters, paper_config

CONV_MODELS = ["cns", "cns_lag", "chfsgm", "chfsgm_lag"]

# SPEC 3.13: trainable parameters of the reference models at the omniglot_ns script settings
PAPER_COUNTS = {
    "cns": 16_984_897,
    "cns_lag": 17_182_273,
    "chfsgm": 9_231_297,
    "chfsgm_lag": 9_379_905,
}

# (image_channels, image_size, likelihood)
DATA = {
    "bernoulli28": (1, 28, "bernoulli"),
    "normal64": (3, 64, "discretized_normal"),
    "mixlog64": (3, 64, "discretized_mix_logistic"),
}

B, S = 2, 3


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(name: str, data: str = "bernoulli28", **kw):
    c, size, lik = DATA[data]
    cfg = paper_config(
        name, hidden_dim=16, c_dim=4, z_dim=4, n_stochastic=3, n_res=2, ch_enc=8,
        image_channels=c, image_size=size, likelihood=lik, n_mixtures=3, **kw,
    )
    return build_model(cfg)


def batch(data: str = "bernoulli28", b: int = B, s: int = S) -> torch.Tensor:
    c, size, lik = DATA[data]
    if lik == "bernoulli":
        return (torch.rand(b, s, c, size, size) > 0.5).float()
    return torch.randint(0, 256, (b, s, c, size, size)).float() / 255


@pytest.mark.parametrize("name", CONV_MODELS)
def test_paper_parameter_counts(name):
    model = build_model(paper_config(name))
    assert count_parameters(model) == PAPER_COUNTS[name]


def test_registry_classes():
    assert isinstance(tiny("cns"), ConvNeuralStatistician)
    assert isinstance(tiny("cns_lag"), ConvNeuralStatistician)
    assert isinstance(tiny("chfsgm"), CHFSGM)
    assert isinstance(tiny("chfsgm_lag"), CHFSGM)


@pytest.mark.parametrize("data", list(DATA))
@pytest.mark.parametrize("name", CONV_MODELS)
def test_forward_shapes_elbo_and_gradients(name, data):
    model = tiny(name, data)
    x = batch(data)
    out = model(x)
    c, size, _ = DATA[data]
    n_layers = model.cfg.n_stochastic
    assert out.logpx.shape == (B, S)
    assert len(out.kl_z) == n_layers and all(k.shape == (B, S) for k in out.kl_z)
    n_c = 1 if name.startswith("cns") else n_layers
    assert len(out.kl_c) == n_c and all(k.shape == (B,) for k in out.kl_c)
    assert out.px.shape == (B, S, model.likelihood.out_channels(), size, size)
    for t in [out.logpx, *out.kl_z, *out.kl_c]:
        assert torch.isfinite(t).all()
    assert all((k >= -1e-4).all() for k in [*out.kl_z, *out.kl_c])
    if name.endswith("_lag"):
        att = out.extras["attention"]
        assert len(att) == n_c  # statistic (+ every PosteriorC for CHFSGM-LAG), top first
        for w in att:
            assert w.shape == (B, 4, S)
            assert torch.allclose(w.sum(-1), torch.ones(B, 4))
    else:
        assert "attention" not in out.extras
    terms = elbo_terms(out)
    assert torch.isfinite(terms.vlb)
    loss = training_loss(terms, alpha=2.0)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["cns", "chfsgm"])
def test_max_aggregation(name):
    out = tiny(name, aggregation="max")(batch())
    assert torch.isfinite(elbo_terms(out).vlb)


def test_only_the_top_z_embeddings_get_no_gradient():
    """As in the reference (SPEC 3.13: CNS 16,984,897 trainable vs 16,968,001 with a gradient), the z embedding
    of the top PriorZ / PosteriorZ is registered but unused."""
    model = tiny("chfsgm")
    training_loss(elbo_terms(model(batch())), alpha=0.0).backward()
    unused = {n for n, p in model.named_parameters() if p.grad is None}
    assert unused == {f"{m}.0.embed_z.{w}" for m in ("prior_z", "posterior_z") for w in ("weight", "bias")}


@pytest.mark.parametrize("name", CONV_MODELS)
def test_log_weights(name):
    model = tiny(name)
    model.train()
    x = batch()
    lw = model.log_weights(x, k=7, chunk=3)
    assert model.training  # mode restored
    assert lw.shape == (7, B)
    assert torch.isfinite(lw).all()
    iwae = torch.logsumexp(lw, dim=0) - math.log(7)
    assert (iwae >= lw.mean(0) - 1e-4).all()


def test_log_weights_match_the_single_sample_elbo_on_average():
    """E_q[log w] = ELBO per set: the mean of many log-weights approaches the analytic-KL bound."""
    model = tiny("chfsgm")
    x = batch()
    model.eval()
    with torch.no_grad():
        vlb = torch.stack([_per_set_vlb(model(x)) for _ in range(200)]).mean(0)
        lw = model.log_weights(x, k=400, chunk=200).mean(0)
    assert torch.allclose(lw, vlb, rtol=0.0, atol=12.0)  # ~4 standard errors


def _per_set_vlb(out):
    return out.logpx.sum(1) - sum(k.sum(1) for k in out.kl_z) - sum(out.kl_c)


def _check_images(img, shape, binary=False):
    assert img.shape == shape
    assert torch.isfinite(img).all()
    assert img.min() >= 0 and img.max() <= 1
    if binary:
        assert set(img.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("data", ["bernoulli28", "mixlog64"])
@pytest.mark.parametrize("name", CONV_MODELS)
def test_sampling_modes(name, data):
    model = tiny(name, data)
    x = batch(data)
    shape = tuple(x.shape)
    binary = data == "bernoulli28"
    _check_images(model.reconstruct(x), shape)
    _check_images(model.reconstruct(x, binary=binary), shape, binary)
    _check_images(model.sample_unconditional(3, 4), (3, 4, *shape[2:]))
    _check_images(model.sample_unconditional(3, 4, binary=binary), (3, 4, *shape[2:]), binary)
    for mode in ("top", "posterior"):
        _check_images(model.sample_conditional(x, mode=mode), shape)
    _check_images(model.sample_conditional(x, binary=binary), shape, binary)
    for variant in ("v1", "v2"):
        _check_images(model.sample_refined(x, iterations=2, variant=variant), shape)
        steps = model.sample_refined(x, iterations=2, variant=variant, binary=binary, return_all=True)
        _check_images(steps, (3, *shape), binary)
    if isinstance(model, CHFSGM):
        hier = model.sample_conditional_hierarchy(x)
        _check_images(hier, (model.cfg.n_stochastic, *shape))
        _, att = model.sample_conditional_hierarchy(x, return_attention=True)
        assert len(att) == (model.cfg.n_stochastic if name.endswith("_lag") else 0)
    with pytest.raises(ValueError):
        model.sample_conditional(x, mode="nope")


def test_sampling_restores_training_mode_and_needs_no_grad():
    model = tiny("cns")
    model.train()
    img = model.sample_refined(batch(), iterations=1)
    assert model.training and not img.requires_grad


def test_rejects_wrong_image_shape():
    with pytest.raises(ValueError):
        tiny("cns")(torch.rand(B, S, 1, 32, 32))


def test_conv_lag_pools_sets():
    torch.manual_seed(0)
    lag = ConvLAG(8, heads=4)
    e = torch.randn(2, 5, 8, 3, 3)
    out, w = lag(e)
    assert out.shape == (2, 8, 3, 3) and w.shape == (2, 4, 5)
    assert torch.allclose(w.sum(-1), torch.ones(2, 4))
    perm = torch.randperm(5)
    out_p, w_p = lag(e[:, perm])
    assert torch.allclose(out, out_p, atol=1e-6)  # invariant to member order
    assert torch.allclose(w[:, :, perm], w_p, atol=1e-6)
    # identical members: uniform weights and the value map of that member
    same = e[:, :1].expand(-1, 5, -1, -1, -1)
    out_s, w_s = lag(same)
    assert torch.allclose(w_s, torch.full_like(w_s, 0.2))
    assert torch.allclose(out_s, lag.value(e[:, 0]), atol=1e-6)
    with pytest.raises(ValueError):
        ConvLAG(6, heads=4)


def test_conv_lag_scaling_is_per_head_full_map():
    """Similarity of a head = dot product over its (C/heads, H, W) block scaled by 1/sqrt(C/heads * H * W)."""
    torch.manual_seed(0)
    lag = ConvLAG(8, heads=2)
    e = torch.randn(1, 3, 8, 2, 2)
    _, w = lag(e)
    q = lag.query(e.mean(1)).reshape(2, -1)
    k = lag.key(e[0]).reshape(3, 2, -1)
    sim = torch.einsum("hd,shd->hs", q, k) / math.sqrt(4 * 2 * 2)
    assert torch.allclose(w[0], sim.softmax(-1), atol=1e-6)
