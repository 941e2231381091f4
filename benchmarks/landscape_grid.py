"""The 2-D loss surface of resnet20 on digits (trained one epoch) around its weights, filter-normalised
directions, on 256 training images: the naive way (deep copy of the model and load_state_dict per grid point,
as loss-landscape does) against plugin landscape (weights stepped in place, channels-last sub-batches of 64;
--chunk N for N grid points per vectorised forward pass), in one process, alternating. Checks that the losses agree to 1e-5 (relative) and
prints the time ratio naive / ours (target: >= 3).

    python benchmarks/landscape_grid.py [--resolution 15] [--samples 256] [--repeats 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.nn.functional as F

from _alternate import alternate
from resinspect.data import load_data
from resinspect.testing import make_context
from resinspect.training import TrainConfig, train_model
from resinspect_plugins._landscape import Surface, filter_normalised_direction, grid


def naive(model, batches, d1, d2, coords):
    """A fresh copy of the model per point, the perturbed weights loaded into it."""
    names = [n for n, _ in model.named_parameters()]
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = []
    for a, b in coords.tolist():
        net = copy.deepcopy(model)
        state = net.state_dict()
        for n, u, v in zip(names, d1, d2):
            state[n] = base[n] + a * u + b * v
        net.load_state_dict(state)
        net.eval()
        loss, count = 0.0, 0
        with torch.no_grad():
            for x, y in batches:
                loss += float(F.cross_entropy(net(x), y, reduction="sum"))
                count += len(y)
        out.append(loss / count)
    return torch.tensor(out, dtype=torch.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--resolution", type=int, default=15)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    data = load_data("digits")
    torch.manual_seed(0)
    ctx = make_context(args.model, data=data)
    train_model(ctx.model, ctx.train_loader, ctx.test_loader, TrainConfig(epochs=1), ctx.device)
    model = ctx.model.eval()
    x, y = data.train.tensors
    batches = [(x[: args.samples], y[: args.samples])]
    gen = torch.Generator().manual_seed(0)
    params = list(model.parameters())
    d1, d2 = filter_normalised_direction(params, gen), filter_normalised_direction(params, gen)
    xs = grid(args.resolution)
    coords = torch.cartesian_prod(xs, xs)

    def ours():
        return Surface(model, batches, [d1, d2], chunk=args.chunk).evaluate(coords).loss

    times, last = alternate({"ours": ours, "naive": lambda: naive(model, batches, d1, d2, coords)}, args.repeats)
    rel = float(((last["ours"] - last["naive"]).abs() / last["naive"].abs().clamp_min(1e-12)).max())
    t_ref, t_ours = statistics.median(times["naive"]), statistics.median(times["ours"])
    print(f"{args.model} on digits: {len(coords)} grid points, {args.samples} images, chunks of {args.chunk}, "
          f"torch threads={torch.get_num_threads()}, {args.repeats} alternating repeats")
    print(f"naive: median {t_ref:.2f} s   ours: median {t_ours:.2f} s   max relative difference {rel:.1e} "
          f"({'agree' if rel < 1e-5 else 'DISAGREE'} to 1e-5)")
    print(f"ratio naive/ours: {t_ref / t_ours:.2f} median wall time (target >= 3)")


if __name__ == "__main__":
    main()
