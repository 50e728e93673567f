"""Alignment losses of PAD phase 2 (Wang et al., 2024, Sec. 2.2, 3.2 and 4.5), built bottom-up.

    pairwise distances -> kernels: Gaussian (Eq. 12), Laplacian (Eq. 17), linear (Eq. 14),
    cosine (Eq. 15) -> multi-kernel k = sum_u beta_u k_u (Eq. 3) -> Gram matrix of the pooled
    sample -> unbiased squared MMD (Eq. 2) = L_MK-MMD (Eq. 5); InfoNCE (Eq. 16);
    alignment_loss(): the `--kernel` flag of align.py.

Masks: mk_mmd and info_nce also take a fixed number of rows with a bool mask of the real ones
(align.py's padded slots: one shape for every batch, so a compiled step does not recompile); a
padding row weighs 0 in every sum and in the bandwidth: the loss is that of the real rows alone.

Shapes: x (n, d) and y (m, d) are the two samples, one embedding per row (in align.py the
reduced text embeddings {h^s}_a and the ID embeddings {h^c}_a); z = [x; y] (N, d), N = n + m,
is the pooled sample; K = number of kernels (the paper's m in Eq. 3, here 5).

Reading of "m = 5 and sigma = {-3, -2, -1, 0, 1}" (Sec. 4.1). Read literally, sigma = 0
divides by zero and sigma = -1, 1 give one kernel twice; so, as in the Transfer-Learning-
Library (TLlib) DAN code the authors build on, each s_u is the log2 of a multiplier of a
data-driven bandwidth:

    sigma_u^2 = 2^{s_u} * mean_{i,j} ||z_i - z_j||^2   over all N x N pairs, diagonal included,

recomputed on every batch and detached from the graph. Weights: beta_u = 1 for every u,
so sum_u beta_u = d = K in Eq. (3): TLlib adds its kernels up, and align.py's gamma goes
with that scale (the paper gives no gamma; the authors' release uses 0.2). Pass beta to
choose others (beta_u = 1/K gives d = 1).
The Laplacian family (Eq. 17), for which the paper gives no sigma, uses the same rule with
the mean L1 distance.

Deviations (each marked DEVIATION: where it happens):
    cosine kernel: cosine similarity, not the printed 1 - cos, whose MMD is the negative;
    InfoNCE: mean over the n anchors, not the printed sum;
    authors' code (TLlib) adds the constant 2/(n-1) to the estimate; no gradient changes.

    >>> h_s, h_c = torch.randn(64, 32), torch.randn(64, 32)
    >>> loss = alignment_loss("gaussian", h_s, h_c)   # L_MK-MMD of Eq. (5), default kernels
"""
import torch
import torch.nn.functional as F

KERNELS = ("gaussian", "laplacian", "linear", "cosine", "infonce")  # align.py --kernel
SIGMA = (-3, -2, -1, 0, 1)  # Sec. 4.1: log2 bandwidth multipliers s_u of the K = 5 kernels
TAU = 0.07  # tau of Eq. (16); the paper gives none, 0.07 is the MoCo / CLIP value


# --- Pairwise distances: (n, d), (m, d) -> (n, m) ----------------------------------------


def squared_distances(a, b):
    """||a_i - b_j||^2 for all pairs, as ||a_i||^2 + ||b_j||^2 - 2 a_i.b_j.

    No (n, m, d) tensor, and no norm ||a_i - b_j|| (not differentiable at 0) on the way:
    the gradient, 2 (a_i - b_j), is finite everywhere, a_i = b_j included."""
    sq = a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * a @ b.T  # (n, m)
    return sq.clamp_min(0)  # rounding can leave tiny negatives where a_i ~ b_j


def l1_distances(a, b):
    """||a_i - b_j||_1 for all pairs; (n, m). Its gradient sign(a_i - b_j) is 0 at a_i = b_j."""
    return torch.cdist(a, b, p=1)


# --- Characteristic kernels (Eq. 12, 17) and the multi-kernel of Eq. (3) ----------------


@torch.no_grad()
def bandwidths(dist, multipliers=SIGMA, w=None):
    """sigma_u^2 = 2^{s_u} * mean(dist), one per multiplier s_u; (K,), outside the graph.

    dist is the (N, N) distance matrix of the pooled sample, diagonal included in the mean
    (TLlib). The bandwidth is a statistic of the batch, not a path for the gradient: the
    loss cannot lower itself by stretching sigma. Under P = Q it keeps the estimator of
    mmd2_unbiased exactly unbiased, since a symmetric function of the pooled sample treats
    within- and cross-sample pairs alike.

    w (N,): 0/1 row weights (None: all 1). The mean is over the pairs of rows of weight 1,
    sum_ij w_i w_j dist_ij / (sum_i w_i)^2: padding rows (weight 0) do not move sigma."""
    s = torch.as_tensor(multipliers, dtype=dist.dtype, device=dist.device)  # (K,)
    w = torch.ones(len(dist), dtype=dist.dtype, device=dist.device) if w is None else w.to(dist.dtype)  # (N,)
    mean = (w @ dist @ w) / w.sum().square().clamp_min(1)
    # a sample collapsed to one point has mean 0: keep sigma > 0, so k = exp(-0) = 1, not 0/0
    return 2.0**s * mean.clamp_min(torch.finfo(dist.dtype).eps)  # (K,)


def gaussian(sq_dist, sigma2):
    """Eq. (12): k_u(x, x') = exp(-||x - x'||^2 / (2 sigma_u^2)); (K, N, N) from (N, N)."""
    return torch.exp(-sq_dist / (2 * sigma2[:, None, None]))  # (K, N, N)


def laplacian(l1_dist, sigma2):
    """Eq. (17): k_u(x, x') = exp(-||x - x'||_1 / sigma_u^2); (K, N, N) from (N, N)."""
    return torch.exp(-l1_dist / sigma2[:, None, None])  # (K, N, N)


def combine(k_u, beta=None):
    """Eq. (3): k = sum_u beta_u k_u with beta_u >= 0; (N, N) from (K, N, N).

    beta=None gives beta_u = 1 (sum beta_u = d = K), as TLlib adds its kernels up."""
    # checked as Python numbers, before beta becomes a tensor: a compiled step has no branch on data
    beta = [1.0] * len(k_u) if beta is None else [float(b) for b in beta]
    if len(beta) != len(k_u) or any(b < 0 for b in beta):
        raise ValueError(f"beta needs {len(k_u)} weights >= 0 (Eq. 3), got {beta}")
    beta = torch.tensor(beta, dtype=k_u.dtype, device=k_u.device)  # (K,)
    return torch.einsum("u,uij->ij", beta, k_u)  # (N, N)


# --- Non-characteristic kernels (Eq. 14, 15): (n, d), (m, d) -> (n, m) ------------------


def linear(a, b):
    """Eq. (14): k(x, x') = x^T x'. Its MMD compares means only."""
    return a @ b.T  # (n, m)


def cosine(a, b):
    """Eq. (15), as a similarity: k(x, x') = <x/|x|, x'/|x'|>. Its MMD compares mean directions.

    DEVIATION: Eq. (15) prints 1 - <x/|x|, x'/|x'|>. A constant cancels in the MMD (its
    three terms weigh it +1, +1, -2), so the printed kernel gives exactly -MMD_cos, and
    minimising it would push the two samples apart. Read instead as the distance
    rho = 1 - cos of Sejdinovic et al. (2013, the paper's [38]), the energy distance
    2 E rho(x, y) - E rho(x, x') - E rho(y, y') equals MMD_cos, which this kernel computes."""
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T  # (n, m)


def gram(z, kernel="gaussian", multipliers=SIGMA, beta=None, w=None):
    """Gram matrix k(z_i, z_j) of the pooled sample z (N, d) for an MMD kernel; (N, N).

    "gaussian" and "laplacian" are the multi-kernels of Eq. (3) with one k_u per
    multiplier, their bandwidths from the rows of weight 1 in w (N,) (None: every row);
    multipliers, beta and w are ignored by the single kernels "linear", "cosine"."""
    if kernel == "linear":
        return linear(z, z)
    if kernel == "cosine":
        return cosine(z, z)
    if kernel == "gaussian":
        dist = squared_distances(z, z)  # (N, N)
        return combine(gaussian(dist, bandwidths(dist, multipliers, w)), beta)
    if kernel == "laplacian":
        dist = l1_distances(z, z)  # (N, N)
        return combine(laplacian(dist, bandwidths(dist, multipliers, w)), beta)
    raise ValueError(f"unknown MMD kernel {kernel!r}; choose one of gaussian, laplacian, linear, cosine")


# --- Eq. (2)-(5): the squared MK-MMD -----------------------------------------------------


def pair_mean(k, w):
    """sum_{i!=j} w_i w_j k_ij / sum_{i!=j} w_i w_j for a square k (n, n) and 0/1 weights w (n,):
    the mean of k over the ordered pairs of distinct rows of weight 1 (n(n-1) of them when
    every w_i = 1), as sum_{i!=j} w_i w_j = (sum_i w_i)^2 - sum_i w_i^2. Without such a pair
    (fewer than two rows of weight 1) the sum is empty and the mean is taken as 0, not 0/0."""
    pairs = w.sum().square() - w.square().sum()
    return (w @ k @ w - (w.square() * k.diagonal()).sum()) / pairs.clamp_min(1)


def mmd2_unbiased(k, n, w=None):
    """Eq. (2) squared, D_k^2(P, Q) = ||mu_P - mu_Q||^2, estimated without bias from the Gram
    matrix k (N, N) of z = [x; y], x the first n rows (Gretton et al., 2012, Eq. 3):

        1/(n(n-1)) sum_{i!=j} k(x_i, x_j) + 1/(m(m-1)) sum_{i!=j} k(y_i, y_j)
            - 2/(nm) sum_{i,j} k(x_i, y_j)

    Dropping the diagonals k(x_i, x_i) removes the bias of the plug-in ||mu_x - mu_y||^2:
    for a fixed kernel the expectation is exactly D_k^2, so when P = Q the estimate is
    often slightly negative. For y = x it is -2/(n-1) * (1/n) sum_i ||phi(x_i) - mu_x||^2, not the 0 of
    the biased estimate.

    w (N,): 0/1 row weights (None: all 1), for a fixed number of rows of which only some are
    real (align.py's padded slots, one shape for a compiled step). Each sum weighs the pair
    (i, j) by w_i w_j and is divided by the number of pairs of weight 1 (pair_mean): the
    estimate of the rows of weight 1 alone, n and m their counts.

    DEVIATION: TLlib, the authors' code, adds the constant 2/(n-1) to this estimate; the
    gradient is the same, logged values differ by that constant."""
    w = torch.ones(len(k), dtype=k.dtype, device=k.device) if w is None else w.to(k.dtype)  # (N,)
    k_xx, k_yy, k_xy = k[:n, :n], k[n:, n:], k[:n, n:]  # (n, n), (m, m), (n, m)
    w_x, w_y = w[:n], w[n:]  # (n,), (m,)
    xy = (w_x @ k_xy @ w_y) / (w_x.sum() * w_y.sum()).clamp_min(1)
    return pair_mean(k_xx, w_x) + pair_mean(k_yy, w_y) - 2 * xy


def mk_mmd(x, y, kernel="gaussian", multipliers=SIGMA, beta=None, x_mask=None, y_mask=None):
    """Eq. (5): L_MK-MMD = D_k^2(x, y), the unbiased squared MK-MMD between x (n, d) and
    y (m, d); rows need not be paired and m may differ from n.

    Defaults: the paper's K = 5 Gaussian kernels (Eq. 12, Sec. 4.1) with sigma_u^2 =
    2^{s_u} * mean squared distance for s_u in {-3, -2, -1, 0, 1} (the reading in the module
    docstring); beta_u = 1 (not given by the paper; TLlib's).

    x_mask (n,), y_mask (m,): bool, True for the rows that enter (None: all). The estimate,
    its bandwidths and its gradient are those of mk_mmd on the rows where True alone; a row
    where False (padding) is zeroed first, so nothing in it (inf, NaN) reaches them, and its
    gradient is 0. Masks keep n and m fixed for a compiled step: the count of real rows is
    not checked (no host read), and a sample with fewer than two has a within-sample term 0."""
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"the unbiased MMD needs >= 2 rows per sample, got {len(x)} and {len(y)}")
    x_mask = torch.ones(len(x), dtype=torch.bool, device=x.device) if x_mask is None else x_mask  # (n,)
    y_mask = torch.ones(len(y), dtype=torch.bool, device=y.device) if y_mask is None else y_mask  # (m,)
    real = torch.cat([x_mask, y_mask])  # (N,)
    z = torch.cat([x, y]).where(real[:, None], 0.0)  # (N, d)
    w = real.to(z.dtype)  # (N,) 0/1
    return mmd2_unbiased(gram(z, kernel, multipliers, beta, w), len(x), w)


# --- Eq. (16): InfoNCE, the contrastive alternative of Sec. 4.5 ---------------------------


def info_nce(x, y, tau=TAU, mask=None):
    """Eq. (16): L_CL with the cosine kernel; x_i and y_i are a positive pair, x_i and y_j
    (j != i) negatives, so the rows must be paired: x, y (n, d).

        -log exp(k(x_i, y_i)/tau) / sum_j exp(k(x_i, y_j)/tau)   averaged over i

    mask (n,): bool, True for the pairs that enter (None: all); a pair where False (padding)
    is neither an anchor nor a negative, its rows zeroed first: the loss and its gradient are
    those of info_nce on the pairs where True alone, for a fixed n (a compiled step).

    DEVIATION: mean over the n anchors where Eq. (16) sums, so that gamma does not
    scale with the batch size."""
    if x.shape != y.shape:
        raise ValueError(f"InfoNCE needs paired rows of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    real = torch.ones(len(x), dtype=torch.bool, device=x.device) if mask is None else mask  # (n,)
    x, y = x.where(real[:, None], 0.0), y.where(real[:, None], 0.0)
    logits = cosine(x, y) / tau  # (n, n), positives on the diagonal
    # exp(-inf) = 0: a padding column leaves a real anchor's denominator; a padding anchor's row
    # stays finite (its loss weighs 0, so it needs no mask)
    logits = logits.masked_fill(real[:, None] & ~real[None, :], float("-inf"))
    loss = F.cross_entropy(logits, torch.arange(len(x), device=x.device), reduction="none")  # (n,)
    w = real.to(loss.dtype)  # (n,) 0/1
    return (w @ loss) / w.sum().clamp_min(1)


# --- Phase-2 entry point -------------------------------------------------------------------


def alignment_loss(kernel, x, y, mask=None, **kw):
    """The alignment term of Eq. (4) for align.py's --kernel (Sec. 4.5, Fig. 5a): mk_mmd of
    Eq. (5) with that kernel, or info_nce of Eq. (16) for "infonce". mask (n,) marks the real
    rows of paired x (n, d), y (n, d), the same on both sides (None: all); kw go to that
    function (multipliers, beta; or tau)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown --kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if kernel == "infonce":
        return info_nce(x, y, mask=mask, **kw)
    return mk_mmd(x, y, kernel, x_mask=mask, y_mask=mask, **kw)
