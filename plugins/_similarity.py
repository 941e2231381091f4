"""Linear CKA with the unbiased minibatch estimator (Nguyen, Raghu & Kornblith 2021), all layer pairs at once.

Per batch of n ≥ 4 images, each layer's Gram matrix K = X Xᵀ (X: the layer's responses, flattened per image)
gets a zeroed diagonal and is U-centred; the unbiased HSIC of two layers is then the dot product of their
U-centred Gram matrices over n(n − 3). Stacking every layer's flattened matrix as the rows of G, one product
G Gᵀ gives every pair's HSIC for the batch. The sums over batches are kept (so that batches can also be
spread over processes and the sums added), and CKA = ΣHSIC(K, L) / √(ΣHSIC(K, K) · ΣHSIC(L, L)) is taken
once at the end. Memory holds one batch's Gram matrices: n² numbers per layer.
"""

from __future__ import annotations

import torch

MIN_BATCH = 4  # the unbiased estimator divides by n(n − 3)


def u_centred_gram(features: torch.Tensor) -> torch.Tensor:
    """The flattened U-centred Gram matrix (n² values, float64) of ``features`` ``[n, ...]``.

    With K's diagonal set to zero, Ũ_ij = K_ij − r_i/(n−2) − r_j/(n−2) + s/((n−1)(n−2)) off the diagonal
    and 0 on it (r: row sums, s: the total), so that Σ_ij Ũ(K)_ij Ũ(L)_ij / (n(n−3)) is the unbiased HSIC
    estimator of Song et al. (2012) that torch-cka and Nguyen et al. use."""
    x = _rows(features.detach())
    n = x.shape[0]
    if n < MIN_BATCH:
        raise ValueError(f"the unbiased CKA estimator needs batches of at least {MIN_BATCH} images, got {n}")
    k = (x @ x.T).double()
    k.fill_diagonal_(0)
    rows = k.sum(1)
    total = rows.sum()
    u = k - rows[:, None] / (n - 2) - rows[None, :] / (n - 2) + total / ((n - 1) * (n - 2))
    u.fill_diagonal_(0)
    return u.flatten()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """One row per image. A Gram matrix does not depend on the order of the features, so a channels-last
    tensor is flattened in its own memory order (a view, no copy)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(len(t), -1)
    return t.reshape(len(t), -1)


class HSICSums:
    """Running sums of the unbiased HSIC of every pair of ``size`` layers over batches."""

    def __init__(self, size: int, device: torch.device | str = "cpu"):
        self.sums = torch.zeros(size, size, dtype=torch.float64, device=device)
        self.batches = 0
        self.images = 0

    def add(self, grams: list[torch.Tensor]) -> None:
        """Add one batch: ``grams`` are the layers' :func:`u_centred_gram` rows, in a fixed layer order."""
        g = torch.stack(grams)
        n = int(round(g.shape[1] ** 0.5))
        self.sums += (g @ g.T) / (n * (n - 3))
        self.batches += 1
        self.images += n

    def cka(self) -> torch.Tensor:
        """The CKA matrix (NaN where a layer's self-HSIC sum is not positive: a constant layer)."""
        d = self.sums.diagonal()
        denom = (d[:, None] * d[None, :]).sqrt()
        ok = (d[:, None] > 0) & (d[None, :] > 0)
        return torch.where(ok, self.sums / denom.clamp_min(1e-300), torch.full_like(self.sums, float("nan")))


def cka_pair(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased linear CKA of two sets of features of the same n ≥ 4 images (one batch)."""
    sums = HSICSums(2)
    sums.add([u_centred_gram(x), u_centred_gram(y)])
    return float(sums.cka()[0, 1])
