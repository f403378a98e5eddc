"""Discretized likelihoods (SPEC 4.2, 4.3): normalisation over the 256 bins, concentration, PixelCNN++ equality."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.likelihood_discretized import DiscretizedMixLogistic, DiscretizedNormal
from models.likelihoods import Bernoulli, build_likelihood

LEVELS = torch.arange(256, dtype=torch.float32) / 255.0


def test_build_likelihood_and_channel_counts():
    assert isinstance(build_likelihood("bernoulli", 1), Bernoulli)
    dn = build_likelihood("discretized_normal", 3, 10)
    dmol = build_likelihood("discretized_mix_logistic", 3, 10)
    assert isinstance(dn, DiscretizedNormal) and dn.out_channels() == 6
    assert isinstance(dmol, DiscretizedMixLogistic) and dmol.out_channels() == 100  # the reference's 100
    assert DiscretizedMixLogistic(1, 10).out_channels() == 30
    assert DiscretizedMixLogistic(4, 2).out_channels() == 2 * (1 + 8 + 6)


def _dmol_params(c: int, m: int, logits, means, log_scales, coeffs=None) -> torch.Tensor:
    """Assemble one pixel's parameter vector in the documented layout -> (1, K, 1, 1)."""
    p = c * (c - 1) // 2
    coeffs = torch.zeros(p, m) if coeffs is None else coeffs
    vec = torch.cat([logits.reshape(m), means.reshape(c * m), log_scales.reshape(c * m), coeffs.reshape(p * m)])
    return vec.view(1, -1, 1, 1)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("level", [0, 77, 200, 255])
def test_dmol_tiny_scale_concentrates_on_the_right_bin(channels, level):
    lik = DiscretizedMixLogistic(channels, 1)
    y = 2 * level / 255 - 1
    params = _dmol_params(channels, 1, torch.zeros(1), torch.full((channels, 1), y), torch.full((channels, 1), -10.0))
    x = torch.full((1, channels, 1, 1), level / 255)
    lp = lik.log_prob(params, x)
    assert lp.shape == (1,)
    assert lp.item() > -0.035 * channels  # log-scale clamps at -7: ~97% of the mass in the bin
    wrong = torch.full((1, channels, 1, 1), ((level + 3) % 256) / 255)
    assert lik.log_prob(params, wrong).item() < -10.0


@pytest.mark.parametrize("channels,mixtures", [(1, 5), (2, 3)])
def test_dmol_sums_to_one_over_all_values(channels, mixtures):
    """Enumerate every value of a pixel (all 256^C for C <= 2, with channel coupling for C = 2)."""
    torch.manual_seed(0)
    lik = DiscretizedMixLogistic(channels, mixtures)
    for _ in range(3):
        params = torch.randn(1, lik.out_channels(), 1, 1) * 1.5
        grid = torch.cartesian_prod(*([LEVELS] * channels)).reshape(-1, channels, 1, 1)
        lp = lik.log_prob(params.expand(grid.shape[0], -1, -1, -1), grid)
        assert torch.isfinite(lp).all()
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-3)


def test_dmol_rgb_coupled_values_sum_to_the_red_marginal():
    """C = 3, one component, random coupling: for a fixed R the 256 x 256 (G, B) values carry exactly p(R)
    (p(G | R) and p(B | R, G) each sum to one), and p(R) is the single-channel DMoL of R's parameters."""
    torch.manual_seed(1)
    lik = DiscretizedMixLogistic(3, 1)
    params = torch.randn(1, lik.out_channels(), 1, 1)  # [logit | mu R,G,B | log-s R,G,B | coeffs]
    lik_r = DiscretizedMixLogistic(1, 1)
    p_r = _dmol_params(1, 1, params[0, 0:1, 0, 0], params[0, 1:2, 0, 0], params[0, 4:5, 0, 0])
    gb = torch.cartesian_prod(LEVELS, LEVELS)  # (65536, 2)
    for level in (0, 1, 100, 254, 255):
        r = LEVELS[level]
        x = torch.cat([r.expand(gb.shape[0], 1), gb], dim=1).reshape(-1, 3, 1, 1)
        mass = lik.log_prob(params.expand(x.shape[0], -1, -1, -1), x).exp().sum()
        marginal = lik_r.log_prob(p_r, r.view(1, 1, 1, 1)).exp()
        assert mass.item() == pytest.approx(marginal.item(), rel=1e-3, abs=1e-7)


def _pixelcnnpp_loss(x: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """The PixelCNN++ discretized logistic mixture log-likelihood for RGB in [-1, 1], written from the paper's
    formulas in its own parameter layout: per pixel [M logits | R, G, B blocks of (M means, M log-scales,
    M coefficients)], coefficients (a, b, c) with mean_G += a R, mean_B += b R + c G. x (N, 3, H, W) -> (N,)."""
    m = l.shape[1] // 10
    x = x.permute(0, 2, 3, 1)
    l = l.permute(0, 2, 3, 1)
    logit = l[..., :m]
    rest = l[..., m:].reshape(*l.shape[:3], 3, 3 * m)
    mu, ls, co = rest[..., :m], rest[..., m : 2 * m].clamp(min=-7.0), torch.tanh(rest[..., 2 * m :])
    xr, xg = x[..., 0:1], x[..., 1:2]
    mu_r = mu[..., 0, :]
    mu_g = mu[..., 1, :] + co[..., 0, :] * xr
    mu_b = mu[..., 2, :] + co[..., 1, :] * xr + co[..., 2, :] * xg
    total = torch.log_softmax(logit, -1)
    for ch, mean in enumerate((mu_r, mu_g, mu_b)):
        xc = x[..., ch : ch + 1]
        s = ls[..., ch, :]
        hi = (xc - mean + 1 / 255) * torch.exp(-s)
        lo = (xc - mean - 1 / 255) * torch.exp(-s)
        mid = (xc - mean) * torch.exp(-s)
        delta = torch.sigmoid(hi) - torch.sigmoid(lo)
        inner = torch.where(delta > 1e-5, delta.clamp(min=1e-12).log(), mid - s - 2 * F.softplus(mid) - math.log(127.5))
        lp = torch.where(xc < -0.999, hi - F.softplus(hi), torch.where(xc > 0.999, -F.softplus(lo), inner))
        total = total + lp
    return torch.logsumexp(total, -1).sum((1, 2))


def test_dmol_rgb_equals_pixelcnnpp_formula():
    torch.manual_seed(2)
    m, n, hw = 4, 3, 5
    lik = DiscretizedMixLogistic(3, m)
    ref = torch.randn(n, 10 * m, hw, hw)
    x = torch.randint(0, 256, (n, 3, hw, hw)).float() / 255
    x[0, :, 0, 0] = 0.0
    x[1, :, 1, 1] = 1.0
    # map the reference layout to ours: [logits | means (3, M) | log-scales (3, M) | coeffs (3, M)]
    logits = ref[:, :m]
    rest = ref[:, m:].reshape(n, 3, 3 * m, hw, hw)
    ours = torch.cat(
        [logits, rest[:, :, :m].reshape(n, 3 * m, hw, hw), rest[:, :, m : 2 * m].reshape(n, 3 * m, hw, hw),
         rest[:, :, 2 * m :].reshape(n, 3 * m, hw, hw)],
        dim=1,
    )
    expected = _pixelcnnpp_loss(x * 2 - 1, ref)
    assert torch.allclose(lik.log_prob(ours, x), expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("channels", [1, 3])
def test_dmol_sample_mean_ranges_and_grad(channels):
    torch.manual_seed(3)
    lik = DiscretizedMixLogistic(channels, 10)
    params = (torch.randn(2, 4, lik.out_channels(), 6, 6) * 3).requires_grad_()
    x = torch.randint(0, 256, (2, 4, channels, 6, 6)).float() / 255
    lp = lik.log_prob(params, x)
    assert lp.shape == (2, 4)
    lp.sum().backward()
    assert torch.isfinite(params.grad).all()
    for out in (lik.sample(params.detach()), lik.mean(params.detach())):
        assert out.shape == x.shape
        assert out.min() >= 0 and out.max() <= 1


def test_discretized_normal_sums_to_one_and_concentrates():
    torch.manual_seed(4)
    lik = DiscretizedNormal(1)
    for mean, logvar in [(0.3, -2.0), (-0.95, -6.0), (0.0, 1.0), (2.5, 0.5), (0.4, -30.0)]:
        params = torch.tensor([mean, logvar]).view(1, 2, 1, 1).expand(256, -1, -1, -1)
        lp = lik.log_prob(params, LEVELS.view(-1, 1, 1, 1))
        assert torch.isfinite(lp).all()
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-4)
    level = 93
    y = 2 * level / 255 - 1
    params = torch.tensor([y, -20.0] * 1).view(1, 2, 1, 1)
    assert lik.log_prob(params, torch.full((1, 1, 1, 1), level / 255)).item() > -1e-4
    # logvar is clamped to <= 1 as in the reference
    wide = lik.log_prob(torch.tensor([0.0, 50.0]).view(1, 2, 1, 1), torch.full((1, 1, 1, 1), 0.5))
    clamped = lik.log_prob(torch.tensor([0.0, 1.0]).view(1, 2, 1, 1), torch.full((1, 1, 1, 1), 0.5))
    assert wide.item() == pytest.approx(clamped.item())


def test_discretized_normal_shapes_and_grad():
    torch.manual_seed(5)
    lik = DiscretizedNormal(3)
    params = (torch.randn(2, 3, 6, 8, 8) * 4).requires_grad_()
    x = torch.randint(0, 256, (2, 3, 3, 8, 8)).float() / 255
    lp = lik.log_prob(params, x)
    assert lp.shape == (2, 3)
    lp.sum().backward()
    assert torch.isfinite(params.grad).all()
    for out in (lik.sample(params.detach()), lik.mean(params.detach())):
        assert out.shape == x.shape
        assert out.min() >= 0 and out.max() <= 1


def test_bernoulli_log_prob_matches_the_closed_form():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 1, 5, 5) * 3
    x = torch.bernoulli(torch.full_like(logits, 0.4))
    p = torch.sigmoid(logits.double())
    expected = (x * p.log() + (1 - x) * (1 - p).log()).flatten(-3).sum(-1)
    got = Bernoulli(1).log_prob(logits, x)
    assert got.shape == (3, 4)
    assert torch.allclose(got.double(), expected, atol=1e-4)
    assert torch.equal(Bernoulli(1).mean(logits), torch.sigmoid(logits))
