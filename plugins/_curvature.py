"""The Hessian of the training loss through Hessian-vector products: top eigenvalues by Lanczos, the trace by
Hutchinson's estimator with per-block traces from the same probes, the spectral density by stochastic
Lanczos quadrature.

One double-backward graph per batch is built once (loss → gradient with ``create_graph``); each product H·v
is then one backward pass through it. Lanczos with full reorthogonalisation finds the extreme eigenvalues
in far fewer products than power iteration (PyHessian's method), whose convergence depends on the gap
between the first two eigenvalues.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from resinspect import cross_entropy


class HessianOperator:
    """v ↦ H v for the mean loss over fixed ``batches`` (each ``(x, y)``), with respect to ``params``; vectors
    are flat float tensors of ``dim`` entries. The networks' mode is the caller's (eval: BatchNorm fixed)."""

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        params: list[nn.Parameter] | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
        self.params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
        self.sizes = [p.numel() for p in self.params]
        self.dim = sum(self.sizes)
        loss_fn = loss_fn or (lambda out, y: cross_entropy(out, y))
        total = sum(y.numel() for _, y in batches)
        self.grads = []
        for x, y in batches:
            loss = loss_fn(model(x), y) * (y.numel() / total)
            self.grads.append(torch.autograd.grad(loss, self.params, create_graph=True))
        self.products = 0
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        parts = [t.view_as(p) for t, p in zip(v.split(self.sizes), self.params)]
        out = None
        for g in self.grads:
            hv = torch.autograd.grad(g, self.params, grad_outputs=parts, retain_graph=True)
            flat = torch.cat([h.reshape(-1) for h in hv])
            out = flat if out is None else out + flat
        self.products += 1
        assert out is not None  # (one graph per batch, and there is at least one batch)
        return out

    def gradient(self) -> torch.Tensor:
        """The loss gradient (flat), from the graphs already built."""
        return torch.stack([torch.cat([t.detach().reshape(-1) for t in g]) for g in self.grads]).sum(0)

    def release(self) -> None:
        """Drop the double-backward graphs."""
        self.grads = []


def lanczos(
    op: Callable[[torch.Tensor], torch.Tensor], steps: int, start: torch.Tensor, tol: float = 0.0, top_k: int = 1
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Lanczos with full reorthogonalisation from ``start``, for at most ``steps`` products.

    With ``tol > 0`` it stops as soon as each of the ``top_k`` largest Ritz values θ has an estimated error
    below ``tol``·|θ|: with r = β_m |s_m| the residual norm of its Ritz vector (s_m the last component of the
    tridiagonal matrix's eigenvector, β_m the next off-diagonal entry), |λ − θ| ≤ r, and ≈ r²/gap once the
    gap to the neighbouring Ritz value is resolved (Parlett, *The Symmetric Eigenvalue Problem*, §11.7); the
    smaller of the two is used. This is checked after every product, so no product is spent only to see
    that the estimate stopped changing.

    Returns ``(alphas, betas, m)``: the tridiagonal matrix's diagonal (m) and off-diagonal (m − 1)."""
    q = start / start.norm()
    basis = [q]
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    m = 0
    for j in range(steps):
        w = op(q)
        a = torch.dot(w, q)
        alphas.append(a)
        w = w - a * q - (betas[-1] * basis[-2] if betas else 0)
        Q = torch.stack(basis)
        w = w - Q.T @ (Q @ w)  # full reorthogonalisation (twice is enough)
        w = w - Q.T @ (Q @ w)
        m = j + 1
        b = w.norm()
        if tol > 0 and m >= top_k and _converged(alphas, betas, float(b), tol, top_k):
            break
        if m == steps or float(b) < 1e-10 * max(1.0, float(a.abs())):
            break
        betas.append(b)
        q = w / b
        basis.append(q)
    return torch.stack(alphas), torch.stack(betas[: m - 1]) if m > 1 else torch.zeros(0), m


def _converged(alphas: list[torch.Tensor], betas: list[torch.Tensor], b_next: float, tol: float, k: int) -> bool:
    theta, s = torch.linalg.eigh(_tridiagonal(alphas, betas))
    theta, s = theta.flip(0), s.flip(1)
    for i in range(k):
        r = b_next * abs(float(s[-1, i]))
        gaps = [abs(float(theta[i] - theta[j])) for j in (i - 1, i + 1) if 0 <= j < len(theta)]
        err = min(r, r * r / min(gaps)) if gaps and min(gaps) > 0 else r
        if err > tol * abs(float(theta[i])):
            return False
    return True


def _tridiagonal(alphas: list[torch.Tensor], betas: list[torch.Tensor]) -> torch.Tensor:
    m = len(alphas)
    t = torch.diag(torch.stack(alphas).double())
    if m > 1:
        b = torch.stack(betas[: m - 1]).double()
        t = t + torch.diag(b, 1) + torch.diag(b, -1)
    return t


def top_eigenvalues(
    op: HessianOperator,
    k: int = 1,
    steps: int = 100,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    from_gradient: bool = True,
) -> tuple[list[float], int]:
    """The ``k`` largest eigenvalues of the Hessian (Ritz values of a Lanczos run that stops once they change
    by less than ``tol``, relative, in one step), and the number of Hessian-vector products used."""
    start = torch.randn(op.dim, generator=generator, dtype=op.dtype).to(op.device)
    if from_gradient:
        # the gradient lies mostly in the span of the top eigenvectors (Gur-Ari, Roberts & Dyer 2018): a
        # Krylov space grown from it finds them in fewer products; a little noise keeps every direction
        g = op.gradient()
        start = g / g.norm().clamp_min(1e-30) + 0.1 * start / start.norm()
    before = op.products
    alphas, betas, m = lanczos(op, min(steps, op.dim), start, tol, k)
    ritz = torch.linalg.eigvalsh(_tridiagonal(list(alphas), list(betas))).flip(0)
    return [float(v) for v in ritz[:k]], op.products - before


@dataclass
class TraceEstimate:
    """Hutchinson's estimate of tr(H): ``mean`` ± ``stderr`` over ``probes`` Rademacher vectors, and the same
    for each parameter group (``groups``: name → (mean, stderr)); the groups' means add up to ``mean``."""

    mean: float
    stderr: float
    probes: int
    groups: dict[str, tuple[float, float]]
    samples: torch.Tensor  # [probes]: vᵀHv of each probe


def hutchinson(
    op: HessianOperator,
    probes: int,
    groups: dict[str, list[int]] | None = None,
    generator: torch.Generator | None = None,
) -> TraceEstimate:
    """tr(H) ≈ mean of vᵀHv over Rademacher v. With ``groups`` (name → indices into ``op.params``), the same
    probes give each group's trace: Σ over the group's entries of v·(Hv), whose expectation is the trace of
    the group's diagonal block of H. Every parameter belongs to exactly one group, or to none listed (then
    it goes to ``"other"``)."""
    groups = dict(groups or {})
    listed = {i for idx in groups.values() for i in idx}
    rest = [i for i in range(len(op.params)) if i not in listed]
    if rest:
        groups["other"] = rest
    owner = torch.empty(len(op.params), dtype=torch.long)
    names = list(groups)
    for gi, name in enumerate(names):
        owner[groups[name]] = gi
    seg = torch.repeat_interleave(owner, torch.tensor(op.sizes)).to(op.device)
    per_group = torch.zeros(probes, len(names), dtype=torch.float64)
    for i in range(probes):
        v = (torch.randint(0, 2, (op.dim,), generator=generator) * 2 - 1).to(op.device, op.dtype)
        hv = op(v)
        per_group[i] = (
            torch.zeros(len(names), dtype=torch.float64, device=op.device).index_add_(0, seg, (v * hv).double()).cpu()
        )
    samples = per_group.sum(1)

    def stats(x: torch.Tensor) -> tuple[float, float]:
        return float(x.mean()), float(x.std(unbiased=True) / math.sqrt(len(x))) if len(x) > 1 else float("nan")

    mean, err = stats(samples)
    return TraceEstimate(mean, err, probes, {n: stats(per_group[:, j]) for j, n in enumerate(names)}, samples)


def density(
    op: HessianOperator,
    steps: int = 80,
    runs: int = 1,
    width: float | None = None,
    points: int = 400,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al. 2019): ``runs`` Lanczos runs
    from Rademacher vectors; each tridiagonal matrix's eigenvalues are nodes weighted by the squared first
    components of its eigenvectors, smoothed by Gaussians. Returns ``(grid, density)``."""
    nodes, weights = [], []
    for _ in range(runs):
        v = (torch.randint(0, 2, (op.dim,), generator=generator) * 2 - 1).to(op.device, op.dtype)
        alphas, betas, m = lanczos(op, min(steps, op.dim), v)
        evals, evecs = torch.linalg.eigh(_tridiagonal(list(alphas), list(betas)))
        nodes.append(evals)
        weights.append(evecs[0] ** 2 / runs)
    nodes_t, weights_t = torch.cat(nodes), torch.cat(weights)
    lo, hi = float(nodes_t.min()), float(nodes_t.max())
    pad = 0.05 * max(hi - lo, 1e-12)
    grid = torch.linspace(lo - pad, hi + pad, points, dtype=torch.float64)
    sigma = width if width is not None else max((hi - lo) / 100, 1e-12)
    dens = (weights_t[None, :] * torch.exp(-((grid[:, None] - nodes_t[None, :]) ** 2) / (2 * sigma**2))).sum(1)
    return grid, dens / (sigma * math.sqrt(2 * math.pi))
