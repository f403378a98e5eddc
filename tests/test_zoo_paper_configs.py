"""Every model at its paper configuration, batch of 2 sets: forward, loss, backward, gradients, sampling."""
import pytest
import torch

from models.objective import elbo_terms, training_loss
from models.registry import PAPER_MODELS, build_model, paper_config

# SPEC 3.13, "params that get a gradient" (SCHA-VAE: its dead CHFSGM modules are not built at all)
GRADIENT_PARAMS = {
    "vae": 13_226_827, "ns": 14_729_167, "ns_lag": 15_517_135, "cns": 16_968_001, "cns_lag": 17_165_377,
    "hfsgm": 6_000_343, "hfsgm_lag": 6_072_151, "chfsgm": 9_222_849, "chfsgm_lag": 9_371_457,
    "schavae": 4_761_793, "schavae_lag": 5_653_441,
}


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_paper_config_forward_backward_and_sampling(name):
    torch.manual_seed(0)
    model = build_model(paper_config(name))
    s = 1 if name == "vae" else 5
    x = torch.bernoulli(torch.full((2, s, 1, 28, 28), 0.3))
    out = model(x)
    assert out.logpx.shape == (2, s)
    assert all(k.shape == (2, s) for k in out.kl_z) and all(k.shape == (2,) for k in out.kl_c)
    terms = elbo_terms(out)
    assert torch.isfinite(torch.stack([terms.logpx, terms.kl_z, terms.kl_c])).all()
    training_loss(terms, alpha=2.0).backward()
    with_grad = sum(p.numel() for p in model.parameters() if p.grad is not None)
    assert with_grad == GRADIENT_PARAMS[name]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        samples = [model.sample_unconditional(2, s)]
        if name != "vae":
            samples += [model.reconstruct(x), model.sample_conditional(x), model.sample_refined(x, iterations=2)]
    for img in samples:
        assert img.shape == x.shape and 0 <= img.min() and img.max() <= 1
