"""Single-block lesion sweep of resnet56 on the digits test set: fast (shared prefix) vs naive.

Prints both wall times and their ratio (target: fast/naive <= 0.6), after
checking that the two sweeps give identical results.

    python benchmarks/ablation_sweep.py [--model resnet56] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from resinspect.anatomy import residual_blocks
from resinspect.data import load_data, make_loaders
from resinspect.models import build_model
from resinspect_plugins._lesion import Lesion, lesion_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_data("digits")
    model = build_model(args.model, data.in_channels, data.num_classes, data.image_size).eval()
    _, test = make_loaders(data, args.batch_size, 0)
    batches = [(x, y) for x, y in test]
    blocks = residual_blocks(model)
    lesions = [Lesion("bypass", (i,)) for i in range(len(blocks))]
    times = {True: [], False: []}
    results = {}
    for _ in range(args.repeats):
        for fast in (False, True):
            start = time.perf_counter()
            results[fast] = lesion_sweep(model, batches, blocks, lesions, fast=fast)
            times[fast].append(time.perf_counter() - start)
    if results[True] != results[False]:
        raise SystemExit("fast and naive sweeps disagree")
    naive, fast = min(times[False]), min(times[True])
    print(f"{args.model}: {len(blocks)} blocks, {sum(len(y) for _, y in batches)} test images, "
          f"{args.repeats} repeats (best of)")
    print(f"naive sweep: {naive:.3f} s   fast sweep: {fast:.3f} s   results identical: yes")
    print(f"ratio fast/naive: {fast / naive:.3f} (target <= 0.6)")


if __name__ == "__main__":
    main()
