"""All-pairs linear CKA (unbiased minibatch estimator) between the 28 block outputs (stem + 27 blocks) of
resnet56, on 512 shapes images (32×32, RGB) in batches of 128: torch-cka against plugin similarity, in one
process, alternating. Checks that the two matrices agree and prints the time ratio torch-cka / ours
(target: >= 10).

torch-cka loops over layer pairs in Python per batch (rebuilding the second layer's Gram matrix and its
self-HSIC for every row, a full n×n product per pair, .item() per term); ours takes every layer's U-centred
Gram matrix once per batch and all pairs' HSIC in one matrix product.

    pip install torch-cka      # the bench extra: pip install -e ".[bench]"
    python benchmarks/cka_all_pairs.py [--images 512] [--batch 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

from resinspect.data import DataBundle, load_data
from resinspect.testing import make_context
from _alternate import alternate
from resinspect_plugins import similarity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch_cka

    shapes = load_data("shapes", size=32, train_count=args.images, test_count=16)
    x, y = shapes.train.tensors
    bundle = DataBundle(name="shapes", train=shapes.test, test=TensorDataset(x, y), in_channels=3, image_size=32,
                        num_classes=shapes.num_classes, class_names=shapes.class_names)
    torch.manual_seed(0)
    ctx = make_context(args.model, data=bundle)
    ctx.test_loader = DataLoader(bundle.test, batch_size=args.batch, shuffle=False)
    ctx.model.eval()
    layers = ["stem"] + [b.name for b in ctx.blocks("model")]

    def ours():
        return similarity.measure(ctx, 0, branches=False).cka

    def theirs():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = copy.deepcopy(ctx.model)  # torch-cka never removes its hooks: a fresh copy each time
            cka = torch_cka.CKA(net, net, "model", "model copy", layers, layers)
            cka.compare(ctx.test_loader)
        return cka.hsic_matrix

    times, last = alternate({"ours": ours, "torch-cka": theirs}, args.repeats)
    a, b = last["ours"], last["torch-cka"]
    diff = float((a.float() - b).abs().max())
    t_ref, t_ours = statistics.median(times["torch-cka"]), statistics.median(times["ours"])
    print(f"{args.model}: {len(layers)} layers ({len(layers) ** 2} pairs), {args.images} images in batches of "
          f"{args.batch}, torch threads={torch.get_num_threads()}, {args.repeats} alternating repeats")
    print(f"torch-cka: median {t_ref:.2f} s   ours: median {t_ours:.2f} s   max |difference| {diff:.1e} "
          "(torch-cka computes in float32)")
    print(f"ratio torch-cka/ours: {t_ref / t_ours:.1f} median wall time (target >= 10)")


if __name__ == "__main__":
    main()
