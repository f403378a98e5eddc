"""Evaluation building blocks without a trained model: the IWAE estimator against an exact marginal likelihood,
the MNIST / Double / TripleMNIST sets, context posteriors and attention of every model family, few-shot scoring,
figures, and the eval configs."""
from __future__ import annotations

import gzip
import math
import struct

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.distributions import MultivariateNormal

from conftest import ROOT, SHARED_DATA
from data_pipeline.errors import DataError
from data_pipeline.mnist import (CLASS_SPLITS, DigitDataset, TransferSets, check_raw, load_digits, missing_files,
                                 read_idx)
from launch.app import CONFIG_DIR
from models.objective import gaussian_kl
from models.registry import build_model, paper_config
from trainer.config import EVAL_JOBS, load_config
from trainer.evaluation.common import EvalError
from trainer.evaluation.fewshot import classify, wilson_interval
from trainer.evaluation.figures import bars_figure, confusion_figure, grids_figure, lines_figure
from trainer.evaluation.marginal import group_bounds, marginal_nll
from trainer.evaluation.posteriors import attention_weights, context_posteriors, pairwise_kl

MNIST = SHARED_DATA / "mnist"
F64 = torch.float64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def mnist_dir():
    if missing_files(MNIST):
        pytest.fail(f"real test data missing: expected the MNIST IDX files in {MNIST}")
    return MNIST


# ------------------------------------------------------------------------------------------------ marginal
class LinearGaussianSets(torch.nn.Module):
    """Sets of S vectors x_i = A c + W z_i + b + noise, c ~ N(0, I), z_i ~ N(0, I), noise ~ N(0, sigma^2 I).

    log p(X) is Gaussian and exact. log_weights importance-samples the joint latent (c, z_1..z_S) from the exact
    posterior shifted by 0.3 posterior standard deviations and widened 1.2x, so K matters (K=1 is off by ~0.5 nat).
    """

    def __init__(self, d=4, dc=2, dz=2, s=3, sigma=0.5, tau=1.2, shift=0.3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        a, w = torch.randn(d, dc, generator=g, dtype=F64), torch.randn(d, dz, generator=g, dtype=F64)
        self.mean = torch.randn(d, generator=g, dtype=F64).repeat(s)
        self.s, self.d, self.sigma, self.tau, self.shift = s, d, sigma, tau, shift
        m = torch.zeros(s * d, dc + s * dz, dtype=F64)
        for i in range(s):
            m[i * d:(i + 1) * d, :dc] = a
            m[i * d:(i + 1) * d, dc + i * dz:dc + (i + 1) * dz] = w
        self.m = m
        n = m.shape[1]
        self.post_cov = torch.linalg.inv(torch.eye(n, dtype=F64) + m.T @ m / sigma ** 2)
        self.marginal = MultivariateNormal(self.mean, m @ m.T + sigma ** 2 * torch.eye(s * d, dtype=F64))
        self.prior = MultivariateNormal(torch.zeros(n, dtype=F64), torch.eye(n, dtype=F64))
        self.noise = MultivariateNormal(torch.zeros(s * d, dtype=F64), sigma ** 2 * torch.eye(s * d, dtype=F64))

    def sample_sets(self, b):
        return self.marginal.sample((b,)).view(b, self.s, self.d)

    def log_marginal(self, x):
        return self.marginal.log_prob(x.reshape(len(x), -1).double())

    def log_weights(self, x, k, chunk=100):
        r = x.reshape(len(x), -1).double() - self.mean
        mu = r @ self.m @ self.post_cov / self.sigma ** 2  # posterior means (B, n)
        q = MultivariateNormal(mu + self.shift * self.post_cov.diagonal().sqrt(), self.tau ** 2 * self.post_cov)
        out = []
        for start in range(0, k, chunk):
            u = q.sample((min(chunk, k - start),))  # (k', B, n)
            out.append(self.noise.log_prob(r - u @ self.m.T) + self.prior.log_prob(u) - q.log_prob(u))
        return torch.cat(out)


def test_marginal_matches_the_exact_likelihood_at_k1000():
    model = LinearGaussianSets()
    x = model.sample_sets(16)
    truth = (-model.log_marginal(x) / model.s).mean().item()  # nats per image
    result = marginal_nll(model, [x[:8], x[8:]], torch.device("cpu"), k=1000, chunk=100, ks=[1, 10, 100])
    assert result["importance_samples"] == 1000 and result["sets"] == 16
    per_set_error = (result["nll"] - truth) * model.s
    assert abs(per_set_error) < 0.1, (result["nll"], truth)
    by_k = {row["k"]: row["nll"] for row in result["by_k"]}
    assert by_k[1000] == result["nll"]
    assert (by_k[1] - truth) * model.s > 0.1  # the 1-sample bound is measurably looser: K matters here
    assert by_k[1] >= by_k[10] >= by_k[100] >= by_k[1000]


def test_group_bounds_never_increase_the_nll_with_k():
    log_w = torch.randn(1000, 7, dtype=F64) * 3.0  # heavy spread: single prefixes would be noisy
    bounds = group_bounds(log_w, [1, 10, 100, 1000])
    for small, large in ((1, 10), (10, 100), (100, 1000)):
        assert torch.all(bounds[large] >= bounds[small] - 1e-12)
    assert torch.allclose(bounds[1], log_w.mean(0))
    assert torch.allclose(bounds[1000], torch.logsumexp(log_w, 0) - math.log(1000))
    with pytest.raises(ValueError, match="divide"):
        group_bounds(log_w, [3])


# ------------------------------------------------------------------------------------------------ MNIST data
def write_idx(path, array: np.ndarray, compress: bool):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def test_idx_reader_and_missing_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, compress=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(7) % 10, compress=False)
    assert np.array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), images)
    assert read_idx(tmp_path / "t10k-labels-idx1-ubyte").tolist() == list(range(7))
    check_raw(tmp_path, ["test"])  # .gz or uncompressed both count
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz") as err:
        check_raw(tmp_path, ["train"])
    assert str(tmp_path) in str(err.value)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", images, compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-5])
    with pytest.raises(DataError, match="bytes of data"):
        read_idx(tmp_path / "short")


def test_mnist_splits_and_transfer_datasets_are_deterministic_and_binary():
    raw = mnist_dir()
    train, val, test = (load_digits(raw, s) for s in ("train", "val", "test"))
    assert (len(train[0]), len(val[0]), len(test[0])) == (54000, 6000, 10000)
    for name, n_classes in (("mnist", 10), ("doublemnist", CLASS_SPLITS[2][2]), ("triplemnist", CLASS_SPLITS[3][2])):
        a = TransferSets(name, raw, "test", set_size=5, batch_sets=6, max_batches=2, seed=3)
        b = TransferSets(name, raw, "test", set_size=5, batch_sets=6, max_batches=2, seed=3)
        assert len(a) == 2 and len(a.data.classes) == n_classes
        xa, xb = list(a), list(b)
        assert xa[0].shape == (6, 5, 1, 28, 28) and xa[0].dtype == torch.float32
        assert torch.equal(xa[0], xb[0]) and torch.equal(xa[1], xb[1])
        assert set(torch.unique(xa[0]).tolist()) == {0.0, 1.0}
        assert len({ci for ci, _ in a.sets[:12]}) > 1  # a capped evaluation still mixes classes
    # class splits are disjoint and complete; every image of a class shows its digits in order
    splits = {s: DigitDataset("doublemnist", raw, s).classes for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == list(CLASS_SPLITS[2])
    assert len(set().union(*splits.values())) == 100
    triple = DigitDataset("triplemnist", raw, "test")
    first = triple.class_images(0, np.arange(4))
    assert first.shape == (4, 28, 28) and first.dtype == np.uint8 and first.max() > 100
    assert np.array_equal(first, triple.class_images(0)[:4])
    assert not np.array_equal(first, triple.class_images(1, np.arange(4)))
    # each third of the width holds ink (one digit per column band, box-averaged 3x)
    bands = [first[:, :, i * 28 // 3:(i + 1) * 28 // 3].sum() for i in range(3)]
    assert min(bands) > 0


# ------------------------------------------------------------------------------------------------ posteriors
FAMILIES = {
    "ns": dict(hidden_dim=32, ch_enc=8, c_dim=4, z_dim=4, n_res=1),
    "ns_lag": dict(hidden_dim=32, ch_enc=8, c_dim=4, z_dim=4, n_res=1),
    "hfsgm": dict(hidden_dim=32, ch_enc=8, c_dim=4, z_dim=4, n_res=1),
    "hfsgm_lag": dict(hidden_dim=32, ch_enc=8, c_dim=4, z_dim=4, n_res=1),
    "cns_lag": dict(hidden_dim=16, ch_enc=8, c_dim=4, z_dim=4, n_res=1),
    "chfsgm": dict(hidden_dim=16, ch_enc=8, c_dim=4, z_dim=4, n_res=1),
    "chfsgm_lag": dict(hidden_dim=16, ch_enc=8, c_dim=4, z_dim=4, n_res=1),
    "schavae_lag": dict(hidden_dim=16, c_dim=4, z_dim=4, str_enc="32-1,16-1,8-1,4-1,2-1,1-1",
                        str_gen="8-1,4-1,2-1,1-1", str_dec="32-1,16-1,8-1"),
}


def tiny(name):
    return build_model(paper_config(name, **FAMILIES[name])).eval()


def binary(b, s):
    return (torch.rand(b, s, 1, 28, 28) > 0.7).float()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_context_posteriors_and_attention_of_every_family(name):
    model = tiny(name)
    x = binary(3, 4)
    posts = context_posteriors(model, x)
    with torch.no_grad():
        out = model(x)
    assert len(posts) == len(out.kl_c) >= 1
    for mean, logvar in posts:
        assert mean.shape == logvar.shape and mean.shape[0] == 3
    top_mean, top_logvar = posts[0]
    again = context_posteriors(model, x)[0]
    assert torch.allclose(top_mean, again[0]) and torch.allclose(top_logvar, again[1])  # q(c_top | X) is deterministic
    if not name.startswith("schavae"):  # FC/conv: the top prior is N(0, I), so its KL is the forward's kl_c[0]
        kl = gaussian_kl(top_mean, top_logvar, torch.zeros_like(top_mean), torch.zeros_like(top_logvar))
        assert torch.allclose(kl.flatten(1).sum(1), out.kl_c[0].float(), rtol=1e-4, atol=1e-4)
    scores = pairwise_kl(posts, context_posteriors(model, x))
    assert scores.shape == (3, 3) and torch.all(scores >= -1e-4)
    if name.endswith("_lag"):
        layers = attention_weights(model, x)
        assert layers and all(w.shape[0] == 3 and w.shape[2] == 4 for _, w in layers)
        for _, w in layers:
            assert torch.allclose(w.sum(-1), torch.ones(w.shape[:2]), atol=1e-5)
    else:
        with pytest.raises(EvalError, match="LAG"):
            attention_weights(model, x)


def test_models_without_context_are_refused():
    vae = build_model(paper_config("vae", hidden_dim=32, ch_enc=8, c_dim=4, z_dim=4, n_res=1)).eval()
    with pytest.raises(EvalError, match="context"):
        context_posteriors(vae, binary(2, 1))


def test_fewshot_rules_pick_the_matching_support():
    """1-shot supports and queries equal to them: a query's context posterior equals its own support's (KL 0)
    and differs from the others', so the KL rule must pick its own support; the ELBO-gain rule runs."""
    model = tiny("ns")
    support = binary(10, 1)
    preds = classify(model, support, support[:, 0], ["kl", "elbo_gain"], batch=4)
    assert preds["kl"].tolist() == list(range(10))
    assert preds["elbo_gain"].shape == (10,) and set(preds["elbo_gain"].tolist()) <= set(range(10))


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_figures_render_to_non_empty_png(tmp_path):
    figs = {
        "grid": grids_figure({"a": torch.rand(2, 3, 1, 28, 28), "b": torch.rand(2, 3, 1, 28, 28)}, "t"),
        "lines": lines_figure("K", "nll", {"S=5": ([1, 10], [3.0, 2.0], [0.1, 0.1])}, "t", log_x=True,
                              dashed={"S=5": ([1, 10], [4.0, 4.0])}, dashed_suffix=" NELBO"),
        "bars": bars_figure({"KL_z": {"S=5": [1.0, 2.0]}, "KL_c": {"S=5": [0.5]}}, "layer", "kl", "t"),
        "confusion": confusion_figure({"r": np.eye(10, dtype=np.int64) * 3}, [str(i) for i in range(10)], "t"),
    }
    for name, fig in figs.items():
        path = tmp_path / f"{name}.png"
        fig.savefig(path)
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name


# ------------------------------------------------------------------------------------------------ configs
def cfg_for(*overrides):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return load_config(compose("config", overrides=list(overrides)))


def test_every_eval_config_composes_and_names_its_job():
    files = sorted(p.stem for p in (ROOT / "configs" / "eval").glob("*.yaml"))
    assert files == sorted(EVAL_JOBS)
    for job in files:
        assert cfg_for(f"eval={job}").eval.job == job
    marginal = cfg_for("eval=marginal")
    assert marginal.eval.importance_samples == 1000 and marginal.eval.set_sizes == [2, 5, 10, 20]
    assert cfg_for("eval=cardinality").eval.set_sizes == [1, 2, 5, 10, 20]
    assert cfg_for("eval=transfer").eval.transfer_datasets == ["mnist", "doublemnist", "triplemnist"]
    assert cfg_for("eval=marginal", "eval.importance_samples=100").eval.importance_samples == 100  # K' >= K ignored


@pytest.mark.parametrize("override, needle", [
    ("eval.k_values=[3]", "k_values"),
    ("eval.transfer_datasets=[fashion]", "transfer_datasets"),
    ("eval.rules=[nearest]", "rules"),
    ("eval.splits=[dev]", "splits"),
    ("eval.sources=[celeba]", "sources"),
    ("eval.shots=0", "shots"),
])
def test_bad_eval_values_name_their_key(override, needle):
    with pytest.raises(Exception, match=needle):
        cfg_for("eval=marginal", override)
