"""Tests of mmd.py, each against an independent computation: plain python loops over pairs,
closed forms, numpy, permutation tests and torch.autograd.gradcheck."""
import math
import os
import sys

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from mmd import (KERNELS, SIGMA, TAU, alignment_loss, bandwidths, combine, gaussian, gram,  # noqa: E402
                 info_nce, l1_distances, laplacian, mk_mmd, mmd2_unbiased, squared_distances)

MMD_KERNELS = ("gaussian", "laplacian", "linear", "cosine")
CHARACTERISTIC = {"gaussian": (squared_distances, gaussian), "laplacian": (l1_distances, laplacian)}


def randn(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# --- Plain-loop references on python lists -----------------------------------------------


def dot(a, b):
    return sum(ai * bi for ai, bi in zip(a, b))


def cos(a, b):
    return dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))


def loop_kernel(kernel, z, multipliers=SIGMA, beta=None):
    """k(a, b) for one MMD kernel; for the multi-kernels the bandwidth comes from a loop over
    all N x N pairs of the pooled list z, diagonal included."""
    if kernel == "linear":
        return dot
    if kernel == "cosine":
        return cos
    if kernel == "gaussian":
        def dist(a, b):
            return sum((ai - bi) ** 2 for ai, bi in zip(a, b))
    else:
        def dist(a, b):
            return sum(abs(ai - bi) for ai, bi in zip(a, b))
    mean = sum(dist(a, b) for a in z for b in z) / len(z) ** 2
    sigma2 = [2.0**s * mean for s in multipliers]
    beta = beta or [1.0] * len(multipliers)
    scale = 2.0 if kernel == "gaussian" else 1.0  # Eq. (12) divides by 2 sigma^2, Eq. (17) by sigma^2
    return lambda a, b: sum(w * math.exp(-dist(a, b) / (scale * s2)) for w, s2 in zip(beta, sigma2))


def loop_mmd(x, y, k):
    """Unbiased squared MMD (Gretton et al., 2012, Eq. 3) with a loop per sum."""
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def loop_info_nce(x, y, tau):
    """Eq. (16) term by term, divided by n."""
    n, total = len(x), 0.0
    for i in range(n):
        pos = math.exp(cos(x[i], y[i]) / tau)
        neg = sum(math.exp(cos(x[i], y[j]) / tau) for j in range(n) if j != i)
        total -= math.log(pos / (pos + neg))
    return total / n


# --- The estimator against the loops and closed forms --------------------------------------


@pytest.mark.parametrize("m", [7, 4])
@pytest.mark.parametrize("kernel", MMD_KERNELS)
def test_mk_mmd_matches_double_loop(kernel, m):
    x, y = randn(7, 3, seed=1), randn(m, 3, seed=2) * 1.5 + 0.3
    k = loop_kernel(kernel, x.tolist() + y.tolist())
    assert math.isclose(mk_mmd(x, y, kernel).item(), loop_mmd(x.tolist(), y.tolist(), k), rel_tol=1e-10)


@pytest.mark.parametrize("kernel", ["gaussian", "laplacian"])
def test_other_multipliers_and_weights_match_loop(kernel):
    x, y = randn(6, 3, seed=3), randn(5, 3, seed=4)
    multipliers, beta = (-1, 2), (0.25, 0.75)
    k = loop_kernel(kernel, x.tolist() + y.tolist(), multipliers, list(beta))
    ours = mk_mmd(x, y, kernel, multipliers=multipliers, beta=beta).item()
    assert math.isclose(ours, loop_mmd(x.tolist(), y.tolist(), k), rel_tol=1e-10)


def test_weights_scale_the_estimate():
    """beta_u = 1/K (d = 1 in Eq. 3) is the default beta_u = 1 (d = K) divided by K."""
    x, y = randn(8, 3, seed=5), randn(9, 3, seed=6)
    K = len(SIGMA)
    assert torch.allclose(mk_mmd(x, y, beta=[1 / K] * K), mk_mmd(x, y) / K)
    with pytest.raises(ValueError, match="Eq. 3"):
        mk_mmd(x, y, beta=[1.0, 1.0])
    with pytest.raises(ValueError, match="Eq. 3"):
        mk_mmd(x, y, beta=[1.0, -1.0, 1.0, 1.0, 1.0])


def test_linear_mmd_closed_form():
    """sum_{i!=j} x_i.x_j = ||sum_i x_i||^2 - sum_i ||x_i||^2 turns the linear-kernel estimator into
    ||mean(x) - mean(y)||^2 - tr(S_x)/n - tr(S_y)/m, S the unbiased sample covariance."""
    x, y = randn(50, 4, seed=7) * 2 + 1, randn(30, 4, seed=8)
    xn, yn = x.numpy(), y.numpy()
    expected = (np.sum((xn.mean(0) - yn.mean(0)) ** 2)
                - np.trace(np.cov(xn, rowvar=False)) / len(xn) - np.trace(np.cov(yn, rowvar=False)) / len(yn))
    assert math.isclose(mk_mmd(x, y, "linear").item(), expected, rel_tol=1e-10)


@pytest.mark.parametrize("kernel", MMD_KERNELS)
def test_same_sample(kernel):
    """With y = x the biased (V-statistic) estimate is exactly 0, while the unbiased one is
    -2/(n-1) * (1/n) sum_i ||phi(x_i) - mu_x||^2 = -2/(n-1) * (mean k(x_i, x_i) - mean k(x_i, x_j)),
    small and never positive: the two diagonals it drops are all that separates them."""
    n = 20
    x = randn(n, 4, seed=9)
    k = gram(torch.cat([x, x]), kernel)  # (2n, 2n)
    biased = k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()
    assert abs(biased.item()) < 1e-12
    spread = k[:n, :n].diagonal().mean() - k[:n, :n].mean()
    assert spread > 0
    assert torch.allclose(mk_mmd(x, x.clone(), kernel), -2 / (n - 1) * spread, rtol=1e-10, atol=0)


@pytest.mark.parametrize("kernel", MMD_KERNELS)
def test_zero_in_expectation_positive_for_different_distributions(kernel):
    """Unbiased under P = Q, even with the data-driven bandwidth (a symmetric function of the
    pooled sample); clearly positive for a shifted Q."""
    draws = 40
    same = torch.stack([mk_mmd(randn(30, 4, seed=2 * r), randn(30, 4, seed=2 * r + 1), kernel) for r in range(draws)])
    shifted = torch.stack([mk_mmd(randn(30, 4, seed=2 * r), randn(30, 4, seed=2 * r + 1) + 0.5, kernel)
                           for r in range(draws)])
    standard_error = same.std() / math.sqrt(draws)
    assert same.mean().abs() < 3 * standard_error
    assert shifted.mean() > 10 * same.mean().abs() and shifted.mean() > 10 * standard_error


def test_estimate_can_be_negative():
    values = torch.stack([mk_mmd(randn(10, 2, seed=2 * r), randn(10, 2, seed=2 * r + 1)) for r in range(10)])
    assert (values < 0).any() and (values > 0).any()


# --- What "characteristic" buys (Sec. 2.2): equal means, different variances -------------


def permutation_test(x, y, kernel, permutations=100):
    """p-value and standardised statistic of the MMD two-sample test. The bandwidth is a mean
    over the pooled sample, so permuting the pooled rows only permutes the Gram matrix."""
    n = len(x)
    k = gram(torch.cat([x, y]), kernel)  # (N, N)
    observed = mmd2_unbiased(k, n)
    g = torch.Generator().manual_seed(0)
    null = torch.stack([mmd2_unbiased(k[p][:, p], n)
                        for p in (torch.randperm(len(k), generator=g) for _ in range(permutations))])
    p_value = (1 + (null >= observed).sum().item()) / (1 + permutations)
    return p_value, ((observed - null.mean()) / null.std()).item()


def test_permuting_the_gram_matrix_is_permuting_the_sample():
    x, y = randn(6, 3, seed=10), randn(5, 3, seed=11)
    z = torch.cat([x, y])
    p = torch.randperm(11, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(mk_mmd(z[p][:6], z[p][6:]), mmd2_unbiased(gram(z)[p][:, p], 6))


def test_characteristic_kernels_see_a_variance_change_linear_and_cosine_do_not():
    """N(0, I) against N(0, 4I), d = 8, n = 200: the Gaussian and Laplacian MK-MMD reject with
    the smallest p-value 100 permutations allow, tens of null standard deviations out; the
    linear (means only) and cosine (mean directions only) MMD see nothing."""
    x, y = randn(200, 8, seed=12), 2 * randn(200, 8, seed=13)
    result = {kernel: permutation_test(x, y, kernel) for kernel in MMD_KERNELS}
    for kernel in ("gaussian", "laplacian"):
        p_value, z_score = result[kernel]
        assert p_value == 1 / 101 and z_score > 20, (kernel, result)
    for kernel in ("linear", "cosine"):
        p_value, z_score = result[kernel]
        assert p_value > 0.05 and abs(z_score) < 3, (kernel, result)


# --- Gradients ---------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["gaussian", "laplacian"])
def test_gradcheck_with_fixed_bandwidth(kernel):
    distances, k_u = CHARACTERISTIC[kernel]
    sigma2 = torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64)

    def mmd_fixed(x, y):
        z = torch.cat([x, y])
        return mmd2_unbiased(combine(k_u(distances(z, z), sigma2)), len(x))

    x, y = randn(6, 3, seed=14).requires_grad_(), randn(5, 3, seed=15).requires_grad_()
    assert gradcheck(mmd_fixed, (x, y))


@pytest.mark.parametrize("kernel", ["linear", "cosine", "infonce"])
def test_gradcheck_single_kernels(kernel):
    x, y = randn(6, 3, seed=16).requires_grad_(), randn(6, 3, seed=17).requires_grad_()
    assert gradcheck(lambda x, y: alignment_loss(kernel, x, y), (x, y))


@pytest.mark.parametrize("kernel", ["gaussian", "laplacian"])
def test_bandwidth_is_outside_the_graph(kernel):
    """mk_mmd's gradient is that of the same estimator with sigma_u^2 precomputed as
    constants, and differs from the one with sigma_u^2 inside the graph."""
    distances, k_u = CHARACTERISTIC[kernel]
    x, y = randn(8, 3, seed=18).requires_grad_(), randn(7, 3, seed=19).requires_grad_()
    grad = torch.autograd.grad(mk_mmd(x, y, kernel), (x, y))

    z = torch.cat([x, y]).detach()
    sigma2 = bandwidths(distances(z, z))  # (K,)
    assert not sigma2.requires_grad

    def estimate(sigma2_of):
        z = torch.cat([x, y])
        dist = distances(z, z)
        return mmd2_unbiased(combine(k_u(dist, sigma2_of(dist))), len(x))

    fixed = torch.autograd.grad(estimate(lambda dist: sigma2), (x, y))
    live = torch.autograd.grad(estimate(lambda dist: 2.0 ** torch.tensor(SIGMA) * dist.mean()), (x, y))
    for ours, constant, in_graph in zip(grad, fixed, live):
        assert ours.abs().sum() > 0
        assert torch.allclose(ours, constant, rtol=1e-12, atol=1e-14)
        assert not torch.allclose(ours, in_graph, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel", KERNELS)
def test_finite_gradients_when_x_equals_y(kernel, dtype):
    x = randn(8, 4, seed=20).to(dtype).requires_grad_()
    y = x.detach().clone().requires_grad_()
    loss = alignment_loss(kernel, x, y)
    loss.backward()
    assert loss.dtype == dtype and loss.isfinite()
    assert x.grad.isfinite().all() and y.grad.isfinite().all()


@pytest.mark.parametrize("kernel", ["gaussian", "laplacian"])
def test_collapsed_sample_gives_zero_not_nan(kernel):
    """All N points equal: mean distance 0, sigma kept > 0, every k = 1, MMD = 1 + 1 - 2 = 0 (x K)."""
    x, y = torch.ones(5, 3, requires_grad=True), torch.ones(4, 3, requires_grad=True)
    loss = mk_mmd(x, y, kernel)
    loss.backward()
    assert loss.item() == 0 and x.grad.isfinite().all() and y.grad.isfinite().all()


# --- Deviations, said out loud ------------------------------------------------------------


def test_printed_cosine_kernel_gives_the_negated_mmd():
    """Eq. (15) as printed, k = 1 - cos, gives -MMD_cos: minimising it would push the samples
    apart. mmd.cosine uses the similarity cos (DEVIATION)."""
    x, y = randn(7, 3, seed=21), randn(6, 3, seed=22) + 3
    printed = loop_mmd(x.tolist(), y.tolist(), lambda a, b: 1 - cos(a, b))
    ours = mk_mmd(x, y, "cosine").item()
    assert ours > 0 and math.isclose(printed, -ours, rel_tol=1e-10)


def tllib_mk_mmd(z_s, z_t):
    """The authors' estimate, transcribed from TLlib (tllib/alignment/dan.py,
    MultipleKernelMaximumMeanDiscrepancy(linear=False).forward with _update_index_matrix, and
    tllib/modules/kernels.py, GaussianKernel(alpha=2 ** k) for k in range(-3, 2), as in the DAN
    example the authors build on); nothing of mmd.py is used."""
    features = torch.cat([z_s, z_t], dim=0)
    batch_size = int(z_s.size(0))
    index_matrix = torch.zeros(2 * batch_size, 2 * batch_size, dtype=features.dtype)
    for i in range(batch_size):
        for j in range(batch_size):
            if i != j:
                index_matrix[i][j] = 1. / float(batch_size * (batch_size - 1))
                index_matrix[i + batch_size][j + batch_size] = 1. / float(batch_size * (batch_size - 1))
    for i in range(batch_size):
        for j in range(batch_size):
            index_matrix[i][j + batch_size] = -1. / float(batch_size * batch_size)
            index_matrix[i + batch_size][j] = -1. / float(batch_size * batch_size)
    kernel_matrix = 0
    for alpha in (2. ** k for k in range(-3, 2)):
        l2_distance_square = ((features.unsqueeze(0) - features.unsqueeze(1)) ** 2).sum(2)
        sigma_square = alpha * torch.mean(l2_distance_square.detach())
        kernel_matrix = kernel_matrix + torch.exp(-l2_distance_square / (2 * sigma_square))
    # Add 2 / (n-1) to make up for the value on the diagonal (TLlib's comment)
    return (kernel_matrix * index_matrix).sum() + 2. / float(batch_size - 1)


@pytest.mark.parametrize("n,constant", [(3, 1.0), (6, 0.4), (11, 0.2)])
def test_authors_estimate_is_ours_plus_a_constant(n, constant):
    """DEVIATION (mmd2_unbiased): the authors' TLlib estimate is ours plus the constant 2/(n-1)
    (here 1, 0.4, 0.2), with the same gradient: against a transcription of TLlib's code, so a
    wrong kernel, bandwidth or weighting in ours, or a wrong constant here, fails."""
    x, y = randn(n, 3, seed=23), randn(n, 3, seed=24) + 0.5
    x_ours, y_ours = x.clone().requires_grad_(), y.clone().requires_grad_()
    x_tllib, y_tllib = x.clone().requires_grad_(), y.clone().requires_grad_()
    ours, tllib = mk_mmd(x_ours, y_ours), tllib_mk_mmd(x_tllib, y_tllib)
    assert math.isclose(tllib.item() - ours.item(), constant, rel_tol=1e-9, abs_tol=1e-12)
    (ours + tllib).backward()
    assert torch.allclose(x_ours.grad, x_tllib.grad, rtol=1e-9, atol=1e-12)
    assert torch.allclose(y_ours.grad, y_tllib.grad, rtol=1e-9, atol=1e-12)


# --- InfoNCE (Eq. 16) ---------------------------------------------------------------------


@pytest.mark.parametrize("tau", [TAU, 0.5])
def test_info_nce_matches_loop(tau):
    x, y = randn(6, 4, seed=25), randn(6, 4, seed=26)
    assert math.isclose(info_nce(x, y, tau).item(), loop_info_nce(x.tolist(), y.tolist(), tau), rel_tol=1e-10)


def test_info_nce_closed_form_for_orthonormal_pairs():
    """x_i = y_i = e_i: cos = 1 on the pair, 0 elsewhere, each term log(1 + (n-1) e^{-1/tau})."""
    n, tau = 5, 0.2
    eye = torch.eye(n, dtype=torch.float64)
    assert math.isclose(info_nce(eye, eye.clone(), tau).item(), math.log(1 + (n - 1) * math.exp(-1 / tau)))


def test_info_nce_symmetries():
    """Cosine similarity ignores row norms and a common rotation; relabelling the pairs jointly
    only reorders the mean; with y = x the similarity matrix is symmetric, so x and y swap."""
    x, y = randn(6, 4, seed=27), randn(6, 4, seed=28)
    loss = info_nce(x, y)
    rotation, _ = torch.linalg.qr(randn(4, 4, seed=29))
    scale = randn(6, 1, seed=30).abs() + 0.1
    assert torch.allclose(info_nce(scale * x @ rotation, y @ rotation), loss)
    p = torch.randperm(6, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(info_nce(x[p], y[p]), loss)
    y_equal = 2 * x
    assert torch.allclose(info_nce(x, y_equal), info_nce(y_equal, x))


def test_info_nce_prefers_aligned_pairs():
    x = randn(32, 8, seed=31)
    aligned = info_nce(x, x + 0.1 * randn(32, 8, seed=32))
    unrelated = info_nce(x, randn(32, 8, seed=33))
    assert aligned < 0.1 < math.log(32) / 2 < unrelated


def test_info_nce_needs_paired_rows():
    with pytest.raises(ValueError, match="paired rows"):
        info_nce(randn(6, 4), randn(5, 4))


# --- Entry point ---------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_runs_through_the_entry_point(kernel):
    x, y = randn(10, 4, seed=34), randn(10, 4, seed=35) + 1
    loss = alignment_loss(kernel, x, y)
    direct = info_nce(x, y) if kernel == "infonce" else mk_mmd(x, y, kernel)
    assert loss.shape == () and loss.isfinite() and loss > 0 and torch.equal(loss, direct)


def test_entry_point_passes_keywords():
    x, y = randn(10, 4, seed=36), randn(10, 4, seed=37)
    assert torch.equal(alignment_loss("infonce", x, y, tau=0.5), info_nce(x, y, 0.5))
    assert torch.equal(alignment_loss("laplacian", x, y, multipliers=(0,), beta=(2.0,)),
                       mk_mmd(x, y, "laplacian", (0,), (2.0,)))


def test_unknown_kernel_names_the_choices():
    x = randn(4, 2)
    with pytest.raises(ValueError) as error:
        alignment_loss("rbf", x, x)
    assert all(name in str(error.value) for name in KERNELS)
    with pytest.raises(ValueError, match="gaussian, laplacian, linear, cosine"):
        mk_mmd(x, x, "infonce")


def test_too_few_rows():
    with pytest.raises(ValueError, match=">= 2 rows"):
        mk_mmd(randn(1, 3), randn(5, 3))
