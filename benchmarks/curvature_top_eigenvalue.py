"""The top Hessian eigenvalue of resnet20's training loss on one batch of 128 digits images: PyHessian's
power iteration against plugin curvature's Lanczos, both stopping when the estimate changes by less than
1e-3 (relative) in one step, in one process, alternating. Checks that the two eigenvalues agree within 2%,
counts the Hessian-vector products and prints the time ratio PyHessian / ours (target: >= 1.5).

    pip install pyhessian       # the bench extra: pip install -e ".[bench]"
    python benchmarks/curvature_top_eigenvalue.py [--batch 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch
from torch import nn

from _alternate import alternate
from resinspect.data import load_data
from resinspect.testing import make_context
from resinspect_plugins._curvature import HessianOperator, top_eigenvalues


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import sys

    import pyhessian

    ph = sys.modules["pyhessian.hessian"]  # the module (the package exports the class under the same name)

    data = load_data("digits")
    torch.manual_seed(0)
    ctx = make_context(args.model, data=data)
    model = ctx.model.eval()
    x, y = data.train.tensors
    x, y = x[: args.batch], y[: args.batch]
    counts = {"pyhessian": 0}
    original = ph.hessian_vector_product

    def counted(*a, **k):
        counts["pyhessian"] += 1
        return original(*a, **k)

    ph.hessian_vector_product = counted
    seeds = iter(range(1000))

    def theirs():
        torch.manual_seed(next(seeds))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            h = pyhessian.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
            value = h.eigenvalues(top_n=1, tol=args.tol)[0][0]
        model.zero_grad(set_to_none=True)
        return value

    def ours():
        op = HessianOperator(model, [(x, y)])
        value, used = top_eigenvalues(op, 1, tol=args.tol, generator=torch.Generator().manual_seed(next(seeds)))
        op.release()
        counts.setdefault("ours", []).append(used)
        return value[0]

    op = HessianOperator(model, [(x, y)])
    exact = top_eigenvalues(op, 1, steps=80, tol=1e-10, generator=torch.Generator().manual_seed(999))[0][0]
    op.release()
    times, last = alternate({"ours": ours, "pyhessian": theirs}, args.repeats)
    t_ref, t_ours = statistics.median(times["pyhessian"]), statistics.median(times["ours"])
    rel = abs(last["ours"] - last["pyhessian"]) / abs(last["pyhessian"])
    print(f"{args.model}: batch of {args.batch} digits images, tol {args.tol:g}, torch threads="
          f"{torch.get_num_threads()}, {args.repeats} alternating repeats")
    print(f"pyhessian: median {t_ref:.2f} s, {counts['pyhessian'] / args.repeats:.0f} products per run, "
          f"λ_max {last['pyhessian']:.4f}   ours: median {t_ours:.2f} s, {statistics.median(counts['ours']):.0f} "
          f"products, λ_max {last['ours']:.4f}   relative difference {rel:.1e} "
          f"({'within' if rel < 0.02 else 'NOT within'} 2%)")
    print(f"error against the converged λ_max {exact:.4f} (Lanczos to 1e-10): pyhessian "
          f"{abs(last['pyhessian'] - exact) / exact:.1e}, ours {abs(last['ours'] - exact) / exact:.1e}")
    print(f"ratio pyhessian/ours: {t_ref / t_ours:.2f} median wall time (target >= 1.5)")


if __name__ == "__main__":
    main()
