"""Weight spectra of every convolution and linear layer of torchvision's resnet50 (random weights):
weightwatcher's analyze() against plugin spectra, in one process, alternating. Checks that alpha and the
stable rank agree on every layer and prints the time ratio weightwatcher / ours (target: >= 5).

weightwatcher decomposes each kernel position's matrix with its own SVD call and tries every cut-off
candidate of the power-law fit in a Python loop; ours takes a layer's slices in one batched
torch.linalg.svdvals call and evaluates all candidates at once.

    pip install weightwatcher  # the bench extra: pip install -e ".[bench]"
    python benchmarks/spectra_resnet50.py [--model resnet50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import warnings

import torch
import torchvision

from _alternate import alternate
from resinspect_plugins import spectra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", help="a torchvision model name")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import weightwatcher

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)()

    def ours():
        return spectra.analyse(model)[0]

    def theirs():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return weightwatcher.WeightWatcher(model=model).analyze()

    times, last = alternate({"ours": ours, "weightwatcher": theirs}, args.repeats)
    layers, frame = last["ours"], last["weightwatcher"]
    d_alpha = max(abs(sp.alpha - row.alpha) for sp, (_, row) in zip(layers, frame.iterrows()))
    d_rank = max(abs(sp.stable_rank / row.stable_rank - 1) for sp, (_, row) in zip(layers, frame.iterrows()))
    t_ref, t_ours = statistics.median(times["weightwatcher"]), statistics.median(times["ours"])
    print(f"{args.model}: {len(layers)} layers ({len(frame)} in weightwatcher), torch threads="
          f"{torch.get_num_threads()}, {args.repeats} alternating repeats")
    print(f"weightwatcher: median {t_ref:.2f} s   ours: median {t_ours:.2f} s   max |Δ alpha| {d_alpha:.1e}, "
          f"max relative Δ stable rank {d_rank:.1e}")
    print(f"ratio weightwatcher/ours: {t_ref / t_ours:.1f} median wall time (target >= 5)")


if __name__ == "__main__":
    main()
