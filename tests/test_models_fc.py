"""Behaviour of the FC family (VAE, NS, NS-LAG, HFSGM, HFSGM-LAG) on tiny configurations."""
import math

import pytest
import torch

from models.attention import TBlock
from models.config import ModelConfig
from models.layers_fc import GlobalBatchNorm, ObservationDecoder, SharedConvEncoder
from models.objective import elbo_terms, training_loss
from models.registry import build_model, paper_config

FC = ["vae", "ns", "ns_lag", "hfsgm", "hfsgm_lag"]
CONTEXT = ["ns", "ns_lag", "hfsgm", "hfsgm_lag"]
LAG = ["ns_lag", "hfsgm_lag"]
B, S = 2, 3


def tiny(name, **kw):
    torch.manual_seed(0)
    cfg = paper_config(name, hidden_dim=32, ch_enc=8, c_dim=4, z_dim=4, n_res=2, **kw)
    return build_model(cfg)


def batch(b=B, s=S, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((b, s, 1, 28, 28), 0.25), generator=g)


def dead_parameter_names(name, n_layers=3):
    """Embeddings the reference builds but never uses (no z above the top layer; no c in the VAE)."""
    dead = {"posterior_z.0.linear_z.weight", "posterior_z.0.linear_z.bias"}
    if name == "vae":
        dead |= {f"posterior_z.{i}.linear_c.{p}" for i in range(n_layers) for p in ("weight", "bias")}
        dead |= {f"prior_z.{i}.linear_c.{p}" for i in range(n_layers - 1) for p in ("weight", "bias")}
        dead |= {"observation_decoder.linear_cs.weight", "observation_decoder.linear_cs.bias"}
    else:
        dead |= {"prior_z.0.linear_z.weight", "prior_z.0.linear_z.bias"}
    return dead


# ---------------------------------------------------------------------------------------------- layers
def test_attention_pools_one_query_per_set():
    torch.manual_seed(0)
    att = TBlock(16)
    assert sum(p.numel() for p in att.parameters()) == 3 * (16 * 16 + 16)
    e = torch.randn(5, 7, 16)
    out, w = att(e)
    assert out.shape == (5, 16) and w.shape == (5, 4, 7)
    torch.testing.assert_close(w.sum(-1), torch.ones(5, 4))
    perm = torch.randperm(7)  # permutation invariant output, equivariant weights
    out_p, w_p = att(e[:, perm])
    torch.testing.assert_close(out_p, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w_p, w[..., perm])
    with torch.no_grad():  # constant query -> uniform weights -> the plain mean of the values
        att.query.weight.zero_()
        att.query.bias.zero_()
        att.key.bias.zero_()
    out, w = att(e)
    torch.testing.assert_close(w, torch.full_like(w, 1 / 7))
    torch.testing.assert_close(out, att.value(e).mean(1), rtol=1e-5, atol=1e-5)


def test_global_batchnorm_and_shapes_of_encoder_decoder():
    gbn = GlobalBatchNorm()
    assert sum(p.numel() for p in gbn.parameters()) == 2
    assert (gbn.bn.eps, gbn.bn.momentum, gbn.bn.num_features) == (1e-3, 1e-2, 1)
    assert gbn(torch.randn(6, 10)).shape == (6, 10)
    enc = SharedConvEncoder(8)
    assert enc(torch.rand(6, 1, 28, 28)).shape == (6, 32, 4, 4) and enc.out_features == 512
    dec = ObservationDecoder(32, 4, 4, n_z=3, n_c=2)
    assert dec(torch.randn(6, 12), torch.randn(2, 8), 2, 3).shape == (6, 1, 28, 28)


def test_fc_models_reject_other_data_and_mismatched_aggregation():
    with pytest.raises(ValueError, match="28x28x1"):
        build_model(ModelConfig(name="ns", hidden_dim=32, image_size=64, image_channels=3))
    with pytest.raises(ValueError, match="hfsgm_lag"):
        build_model(ModelConfig(name="hfsgm", hidden_dim=32, aggregation="lag"))
    with pytest.raises(ValueError, match="attentive"):
        build_model(ModelConfig(name="hfsgm_lag", hidden_dim=32, aggregation="mean"))


# ---------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("name", FC)
def test_forward_terms_shapes_and_finite(name):
    model = tiny(name)
    out = model(batch())
    assert out.logpx.shape == (B, S) and torch.isfinite(out.logpx).all() and (out.logpx < 0).all()
    assert len(out.kl_z) == 3 and all(k.shape == (B, S) and torch.isfinite(k).all() for k in out.kl_z)
    assert all((k >= -1e-4).all() for k in out.kl_z + out.kl_c)
    n_c = {"vae": 0, "ns": 1, "ns_lag": 1}.get(name, 3)
    assert len(out.kl_c) == n_c and all(k.shape == (B,) and torch.isfinite(k).all() for k in out.kl_c)
    assert out.px.shape == (B, S, 1, 28, 28)
    terms = elbo_terms(out)
    assert torch.isfinite(terms.vlb)
    if name in LAG:
        att = out.extras["attention"]
        assert att.shape == (B, 4, S)
        torch.testing.assert_close(att.sum(-1), torch.ones(B, 4))
    else:
        assert "attention" not in out.extras
    if name == "hfsgm_lag":
        layers = out.extras["attention_layers"]
        assert len(layers) == 3 and all(a.shape == (B, 4, S) for a in layers)


@pytest.mark.parametrize("name", FC)
def test_gradients_reach_every_used_parameter(name):
    model = tiny(name)
    training_loss(elbo_terms(model(batch())), alpha=2.0).backward()
    dead = dead_parameter_names(name)
    for pname, p in model.named_parameters():
        if pname in dead:
            assert p.grad is None, pname
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
            assert p.grad.abs().sum() > 0, pname


def test_ns_max_aggregation_and_any_set_size_in_eval():
    model = tiny("ns", aggregation="max")
    assert torch.isfinite(elbo_terms(model(batch())).vlb)
    model.eval()
    with torch.no_grad():
        for s in (1, 7):
            out = model(batch(b=1, s=s))
            assert out.logpx.shape == (1, s) and torch.isfinite(out.logpx).all()


# ---------------------------------------------------------------------------------------------- log-weights
@pytest.mark.parametrize("name", ["vae", "ns_lag", "hfsgm"])
def test_log_weights_shapes_and_consistency_with_elbo(name):
    model = tiny(name)
    x = batch(s=2)
    model(x)  # one training-mode pass so BatchNorm running statistics are not the init values
    assert model.training
    k = 64
    torch.manual_seed(2)
    logw = model.log_weights(x, k, chunk=24)  # 3 chunks, the last one partial
    assert model.training  # mode restored
    assert logw.shape == (k, B) and torch.isfinite(logw).all() and not logw.requires_grad
    assert model.log_weights(x, 3, chunk=1).shape == (3, B)
    # E_q[log w] is the ELBO of the set (analytic KLs): compare with the mean over as many eval forwards
    model.eval()
    with torch.no_grad():
        out = model(x.repeat(k, 1, 1, 1, 1))
    elbo = out.logpx.sum(1) - sum(kz.sum(1) for kz in out.kl_z) - sum(out.kl_c, torch.zeros(k * B))
    elbo = elbo.view(k, B)
    se = (logw.var(0) / k).sqrt() + (elbo.var(0) / k).sqrt()
    assert ((logw.mean(0) - elbo.mean(0)).abs() < 5 * se + 0.05).all()
    iwae = torch.logsumexp(logw, 0) - math.log(k)
    assert (iwae >= logw.mean(0)).all()


# ---------------------------------------------------------------------------------------------- sampling
def _check_images(t, shape, binary=False):
    assert t.shape == shape and torch.isfinite(t).all()
    assert t.min() >= 0 and t.max() <= 1
    if binary:
        assert set(t.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("name", FC)
def test_unconditional_sampling_and_reconstruction(name):
    model = tiny(name)
    x = batch()
    model(x)
    _check_images(model.sample_unconditional(4, 2), (4, 2, 1, 28, 28))
    _check_images(model.sample_unconditional(1, 1, binary=True), (1, 1, 1, 28, 28), binary=True)
    _check_images(model.reconstruct(x), (B, S, 1, 28, 28))
    _check_images(model.reconstruct(x, binary=True), (B, S, 1, 28, 28), binary=True)
    assert model.training  # sampling runs in eval mode and restores the mode


def test_vae_has_no_conditional_sampling():
    model = tiny("vae")
    with pytest.raises(NotImplementedError):
        model.sample_conditional(batch())
    with pytest.raises(NotImplementedError):
        model.sample_refined(batch())


@pytest.mark.parametrize("name", CONTEXT)
def test_conditional_and_refined_sampling(name):
    model = tiny(name)
    x = batch()
    model(x)
    shape = (B, S, 1, 28, 28)
    for mode in ("top", "posterior"):
        _check_images(model.sample_conditional(x, mode=mode), shape)
        _check_images(model.sample_conditional(x, mode=mode, binary=True), shape, binary=True)
    with pytest.raises(ValueError):
        model.sample_conditional(x, mode="bogus")
    for variant in ("v1", "v2"):
        _check_images(model.sample_refined(x, iterations=2, variant=variant), shape)
        _check_images(model.sample_refined(x, iterations=1, variant=variant, binary=True), shape, binary=True)
        steps = model.sample_refined(x, iterations=3, variant=variant, return_all=True)
        _check_images(steps, (4,) + shape)
    with pytest.raises(ValueError):
        model.sample_refined(x, variant="v3")


@pytest.mark.parametrize("name", ["hfsgm", "hfsgm_lag"])
def test_hierarchical_posterior_mode_uses_the_context_posterior(name):
    model = tiny(name)
    x = batch()
    model(x)
    torch.manual_seed(5)
    top = model.sample_conditional(x, mode="top")
    torch.manual_seed(5)
    post = model.sample_conditional(x, mode="posterior")
    torch.manual_seed(5)
    again = model.sample_conditional(x, mode="posterior")
    torch.testing.assert_close(post, again)  # same z noise, deterministic c means
    assert not torch.allclose(top, post)
