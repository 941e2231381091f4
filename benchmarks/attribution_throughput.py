"""Integrated Gradients throughput: resinspect's attribution path vs calling captum directly.

Same model (resnet20 on shapes), same images, same IG steps and internal batch size; prints images per
second for both and their ratio (target: ours/captum >= 0.95), checks the maps are identical, and times
the batched deletion/insertion scoring of those maps.

    python benchmarks/attribution_throughput.py [--images 64] [--steps 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from captum.attr import IntegratedGradients

from resinspect.data import load_data
from resinspect.models import build_model
from resinspect_plugins._attribution_methods import attribute
from resinspect_plugins._attribution_scores import deletion_insertion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256, help="internal batch size")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_data("shapes", test_count=args.images)
    model = build_model("resnet20", 3, data.num_classes, data.image_size).eval()
    x = data.test.tensors[0][: args.images]
    target = model(x).argmax(1)
    opts = {"ig_steps": args.steps, "internal_batch_size": args.batch}
    ours_t, theirs_t = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        theirs = IntegratedGradients(model).attribute(x.clone().requires_grad_(True), baselines=torch.zeros_like(x),
                                                      target=target, n_steps=args.steps,
                                                      internal_batch_size=args.batch).sum(1).detach()
        theirs_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        ours = attribute(model, "integrated_gradients", x, target, opts)
        ours_t.append(time.perf_counter() - start)
    if not torch.allclose(ours, theirs, atol=1e-6):
        raise SystemExit("maps differ from captum's")
    ours_ips, theirs_ips = args.images / min(ours_t), args.images / min(theirs_t)
    print(f"IntegratedGradients, resnet20, {args.images} images 3x{data.image_size}x{data.image_size}, "
          f"{args.steps} steps, internal batch {args.batch}, best of {args.repeats}")
    print(f"captum directly: {theirs_ips:.1f} images/s   resinspect: {ours_ips:.1f} images/s   maps identical: yes")
    print(f"ratio resinspect/captum: {ours_ips / theirs_ips:.3f} (target >= 0.95)")
    start = time.perf_counter()
    _, _, d, i = deletion_insertion(model, x, target, ours, steps=20, batch_size=args.batch)
    elapsed = time.perf_counter() - start
    print(f"deletion+insertion scoring, 20 steps: {elapsed:.2f} s for {args.images} images "
          f"({2 * 21 * args.images / elapsed:.0f} forward images/s); mean AUCs deletion {d.mean():.3f}, "
          f"insertion {i.mean():.3f}")


if __name__ == "__main__":
    main()
