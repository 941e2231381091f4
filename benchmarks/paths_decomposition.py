"""The exact path-length decomposition of the input gradient (plugin paths) vs one ordinary input-gradient
pass over the same images, resnet56 (27 blocks) on 256 digits test images, in one process, alternating.

N + 1 = 28 independent backward passes would cost ~28; the level stack touches only the levels that can be
non-zero. Prints the ratio decomposition / one gradient pass (target: <= 16) and checks Σ_k g_k = g.

    python benchmarks/paths_decomposition.py [--images 256] [--batch 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from resinspect import eval_mode, residual_blocks
from resinspect.data import load_data
from resinspect.models import build_model
from resinspect_plugins._paths import path_gradients


def batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def input_gradient_pass(model, data):
    with eval_mode(model):
        for x, y in data:
            x = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return g


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bundle = load_data("digits")
    x, y = bundle.test.tensors
    data = batches(x[: args.images], y[: args.images], args.batch)
    torch.manual_seed(0)
    model = build_model(args.model, bundle.in_channels, bundle.num_classes, bundle.image_size)
    blocks = residual_blocks(model)
    sums = path_gradients(model, blocks, data[:1])  # warm-up (builds the split graphs)
    times = {"gradient": [], "paths": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        input_gradient_pass(model, data)
        times["gradient"].append(time.perf_counter() - t)
        t = time.perf_counter()
        sums = path_gradients(model, blocks, data)
        times["paths"].append(time.perf_counter() - t)
    g, p = statistics.median(times["gradient"]), statistics.median(times["paths"])
    print(f"{args.model}: {len(blocks)} blocks, {args.images} images in batches of {args.batch}, "
          f"{args.repeats} alternating repeats, torch threads={torch.get_num_threads()}")
    print(f"one input-gradient pass: {g:.2f} s   exact decomposition: {p:.2f} s   "
          f"max |Σ_k g_k − g| / |g| = {sums.max_rel_error:.1e}")
    print(f"ratio decomposition/gradient: {p / g:.2f} (target <= 16)")


if __name__ == "__main__":
    main()
