"""Weight spectra as WeightWatcher computes them (Martin & Mahoney 2021), batched and vectorised.

A layer's empirical spectral density (ESD) is the set of eigenvalues of W Wᵀ, i.e. its squared singular
values. A convolution with a k×k kernel gives k² matrices ``W[:, :, i, j]`` (out × in), whose eigenvalues are
pooled into one ESD, after WeightWatcher's ``conv2d_norm`` (each slice scaled by 1/√2, so its eigenvalues are
halved). The tail of the
ESD is fitted with a power law p(λ) ∝ λ^(−α) for λ ≥ λ_min by maximum likelihood, λ_min chosen among the
eigenvalues themselves by the smallest Kolmogorov–Smirnov distance (Clauset, Shalizi & Newman 2009); under 20
eigenvalues, WeightWatcher's bias-corrected small-sample fit. Where WeightWatcher loops over layers, slices
and cut-off candidates in Python, here each layer's slices go through one batched ``eigvalsh`` call and all
candidates of a fit are evaluated at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EVALS_THRESH = 1e-5  # eigenvalues at or below this are left out of the fit (WeightWatcher's thresh)
SMALL_N = 20  # fewer eigenvalues than this: the small-sample fit
SMALL_N_MIN_TAIL = 8  # the small-sample fit's shortest tail (k_min)
_CHUNK = 1 << 22  # candidate × eigenvalue entries evaluated at once (32 MiB of float64)


@dataclass
class PowerLawFit:
    """The fitted tail: exponent ``alpha``, cut-off ``xmin``, KS distance ``D``, standard error ``sigma``
    ((α − 1)/√n), ``n_tail`` eigenvalues at or above the cut-off."""

    alpha: float
    xmin: float
    D: float
    sigma: float
    n_tail: int


@dataclass
class LayerSpectrum:
    """One layer's ESD and its summary numbers (named as WeightWatcher names its columns)."""

    name: str
    kind: str  # "conv" or "linear"
    N: int  # the larger side of each matrix
    M: int  # the smaller side: eigenvalues per matrix
    rf: int  # matrices per layer (the kernel's positions)
    evals: torch.Tensor  # ascending, float64, on the CPU
    fit: PowerLawFit | None

    @property
    def num_evals(self) -> int:
        return int(self.evals.numel())

    @property
    def spectral_norm(self) -> float:
        return float(self.evals[-1])

    @property
    def log_spectral_norm(self) -> float:
        return math.log10(self.spectral_norm) if self.spectral_norm > 0 else float("-inf")

    @property
    def norm(self) -> float:
        """Σλ: the squared Frobenius norm of the (normalised) matrices."""
        return float(self.evals.sum())

    @property
    def log_norm(self) -> float:
        return math.log10(self.norm) if self.norm > 0 else float("-inf")

    @property
    def stable_rank(self) -> float:
        """Σλ / λ_max."""
        return self.norm / self.spectral_norm if self.spectral_norm > 0 else float("nan")

    @property
    def alpha(self) -> float:
        return self.fit.alpha if self.fit is not None else float("nan")

    @property
    def alpha_weighted(self) -> float:
        """α · log10 λ_max."""
        return self.alpha * self.log_spectral_norm


def _slices(weight: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    """``(slices [rf, out, in], rf, scale)``: a linear layer's weight as one matrix, a convolution's as one
    matrix per kernel position (contiguous), and the factor WeightWatcher's conv2d normalisation applies to
    the eigenvalues of 2-D convolutions (each slice × 1/√2: its ``sqrt(conv2d_count / 2)`` with the count
    reset to 1 per slice)."""
    w = weight.detach()
    if w.dim() == 2:
        return w.unsqueeze(0), 1, 1.0
    out, inp = w.shape[:2]
    rf = math.prod(w.shape[2:])
    return w.reshape(out, inp, rf).permute(2, 0, 1).contiguous(), rf, 0.5 if w.dim() == 4 else 1.0


def eigenvalues(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, int, int, int]:
    """``(evals ascending float64 on the CPU, N, M, rf)``: the pooled eigenvalues of WᵀW (the squared singular
    values) of every slice, on the weight's device: each slice's Gram matrix on its smaller side, all of a
    layer's slices in one batched ``torch.linalg.eigvalsh`` call.

    In float32 (the default: about four times faster than a float64 SVD on a CPU) the eigenvalues are
    accurate to about 1e-6 of λ_max, which is what the fit's tail and the norms need; the smallest
    eigenvalues of a near-singular matrix are not. ``dtype=torch.float64`` gives them to 1e-14."""
    mats, rf, scale = _slices(weight)
    mats = mats.to(dtype)
    tall = mats.shape[1] >= mats.shape[2]
    gram = torch.bmm(mats.transpose(1, 2), mats) if tall else torch.bmm(mats, mats.transpose(1, 2))
    evals = torch.linalg.eigvalsh(gram.mul_(scale)).clamp_min(0).flatten().double().sort().values.cpu()
    return evals, max(mats.shape[1:]), min(mats.shape[1:]), rf


def fit_power_law(evals: torch.Tensor) -> PowerLawFit | None:
    """WeightWatcher's power-law fit of ``evals`` (any order), vectorised over the cut-off candidates.

    Each eigenvalue above :data:`EVALS_THRESH` but the largest is a candidate cut-off x_i; on the tail
    x ≥ x_i (n values) the MLE is α = 1 + n / Σ ln(x/x_i) and the KS distance is max |F_fit − F_emp| with
    F_fit = 1 − (x/x_i)^(1−α), F_emp(k-th tail value) = k/n. The candidate with the smallest distance wins.
    Returns None when fewer than two eigenvalues are left."""
    x = evals.double().flatten().sort().values
    x = x[x > EVALS_THRESH].cpu()
    n_all = len(x)
    if n_all < 2:
        return None
    logx = x.log()
    suffix = logx.flip(0).cumsum(0).flip(0)  # Σ_{k ≥ i} ln x_k
    idx = torch.arange(n_all - 1)
    n = (n_all - idx).double()
    s = suffix[:-1] - n * logx[:-1]  # Σ ln(x_k / x_i) over the tail
    small = n_all < SMALL_N
    with torch.no_grad():
        alpha = 1 + ((n - 1) if small else n) / s
        if small:
            usable = (n >= SMALL_N_MIN_TAIL) & (s > 1e-12)
            alpha = torch.where(usable, alpha, torch.zeros_like(alpha))
        D = _ks_distances(logx, alpha, n)
        if small:
            D = torch.where(usable, D, torch.ones_like(D))
            if not bool((usable & (alpha > 1)).any()):
                _small_fallback(x, logx, alpha, D)
        # WeightWatcher's WWFit keeps the smallest KS distance in the end, also after the small-sample fit
        # (whose own objective, D − 0.868/√n, only decides its intermediate choice)
        best = int(torch.argmin(D))
    a = float(alpha[best])
    return PowerLawFit(
        alpha=a,
        xmin=float(x[best]),
        D=float(D[best]),
        sigma=(a - 1) / math.sqrt(n_all - best),
        n_tail=int(n_all - best),
    )


def _ks_distances(logx: torch.Tensor, alpha: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """KS distance of every candidate's fitted tail (1 where α ≤ 1), or for the candidates that can still win:
    first a lower bound for every candidate from every 8th eigenvalue (a maximum over fewer points), then the
    exact distance for the candidates whose bound does not already exceed the best exact distance found among
    the most promising ones. The minimum (and its first index) is the one an exhaustive search finds; the
    entries of candidates ruled out hold their lower bound."""
    m = len(alpha)
    if m <= 256:
        return _ks_exact(logx, alpha, n, torch.arange(m))
    bound = _ks_exact(logx, alpha, n, torch.arange(m), stride=8)
    promising = torch.argsort(bound)[:32].sort().values
    best = float(_ks_exact(logx, alpha, n, promising).min())
    keep = (bound <= best).nonzero().flatten()
    out = bound.clone()
    out[keep] = _ks_exact(logx, alpha, n, keep)
    return out


def _ks_exact(
    logx: torch.Tensor, alpha: torch.Tensor, n: torch.Tensor, cands: torch.Tensor, stride: int = 1
) -> torch.Tensor:
    """max over the tail's eigenvalues (every ``stride``-th of them, and the largest) of |F_fit − F_emp| for
    the candidate cut-offs ``cands`` (ascending), in chunks, in place."""
    n_all = len(logx)
    cols = torch.arange(0, n_all, stride)
    if stride > 1 and cols[-1] != n_all - 1:
        cols = torch.cat([cols, torch.tensor([n_all - 1])])
    lx, k = logx[cols], cols.double()
    out = torch.ones(len(cands), dtype=torch.float64)
    step = max(1, _CHUNK // len(cols))
    for lo in range(0, len(cands), step):
        i = cands[lo : lo + step]
        first = int(torch.searchsorted(cols, i[0]))  # columns before the first candidate are in no tail
        a, inv_n = alpha[i], 1.0 / n[i]
        gap = lx[None, first:] - logx[i, None]  # ln(x_k / x_i), ≥ 0 on the tail
        gap.mul_((1 - a)[:, None]).exp_().neg_().add_(1)  # fitted CDF 1 − (x_k/x_i)^(1−α)
        gap.addcmul_(k[None, first:], inv_n[:, None], value=-1).add_((i.double() * inv_n)[:, None])  # − (k − i)/n
        gap.abs_()
        gap.masked_fill_(k[None, first:] < i[:, None].double(), 0)  # k < i: not in the tail
        d = gap.max(1).values
        out[lo : lo + step] = torch.where(a > 1, d, torch.ones_like(d))
    return out


def _small_fallback(x: torch.Tensor, logx: torch.Tensor, alpha: torch.Tensor, D: torch.Tensor) -> None:
    """WeightWatcher's small-sample fallback: no usable cut-off, so the whole ESD from its smallest value."""
    n = float(len(x))
    s = float(logx.sum() - n * logx[0])
    alpha[0] = 1.0 + (n - 1.0) / s if s > 1e-12 else 1.0
    if alpha[0] > 1:
        fitted = 1 - torch.exp((1 - alpha[0]) * (logx - logx[0]))
        D[0] = (fitted - torch.arange(len(x), dtype=torch.float64) / n).abs().max()
    else:
        D[0] = 1.0


def spectrum(
    name: str, weight: torch.Tensor, min_evals: int = 8, max_evals: int = 15000, dtype: torch.dtype = torch.float32
) -> tuple[LayerSpectrum | None, str | None]:
    """The spectrum of a layer's ``weight``, or ``(None, reason)`` when WeightWatcher's size rules leave it
    out (fewer than ``min_evals`` or more than ``max_evals`` eigenvalues)."""
    w = weight
    kind = "linear" if w.dim() == 2 else "conv"
    rf = 1 if w.dim() == 2 else math.prod(w.shape[2:])
    count = min(w.shape[0], w.shape[1]) * rf
    if count < min_evals:
        return None, f"{count} eigenvalues (fewer than {min_evals})"
    if count > max_evals:
        return None, f"{count} eigenvalues (more than {max_evals})"
    evals, N, M, rf = eigenvalues(w, dtype)
    return LayerSpectrum(name, kind, N, M, rf, evals, fit_power_law(evals)), None
