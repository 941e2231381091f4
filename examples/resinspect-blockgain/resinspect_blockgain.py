"""How much each residual block amplifies the signal: ||y|| / ||x|| over the test set."""

import torch

from resinspect import Section, hookimpl
from resinspect.anatomy import residual_blocks

NAME = "blockgain"


@hookimpl
def resinspect_addoptions(options):
    options.add("samples", int, 128, "test images to use", check=lambda v: "must be >= 1" if v < 1 else None)


@hookimpl
def resinspect_analyze(ctx):
    opts = ctx.options(NAME)
    blocks = residual_blocks(ctx.model)
    section = Section("Block gain", explanation="||y|| / ||x|| per residual block, averaged over test images. "
                      "Values near 1 mean the block passes its input on nearly unchanged in size.")
    if not blocks:
        section.finding("No residual blocks: nothing to measure.")
        return section
    sums = {b.name: 0.0 for b in blocks}
    count = 0

    def record(name, inputs, output):
        gain = output.flatten(1).norm(dim=1) / inputs[0].flatten(1).norm(dim=1).clamp_min(1e-12)
        sums[name] += gain.sum().item()

    handles = [b.module.register_forward_hook(lambda m, i, o, n=b.name: record(n, i, o)) for b in blocks]
    try:
        with torch.no_grad():
            for x, _ in ctx.test_batches(opts["samples"]):
                ctx.model(x)
                count += len(x)
    finally:
        for h in handles:
            h.remove()
    for name, total in sums.items():
        section.metrics[name] = total / count
    section.table("Gain per block", ["block", "gain"], [[n, v] for n, v in section.metrics.items()])
    top = max(section.metrics, key=section.metrics.get)
    section.finding(f"{top} amplifies its input most (×{section.metrics[top]:.2f}).")
    if ctx.writer is not None:
        for i, (name, value) in enumerate(section.metrics.items()):
            ctx.writer.add_scalar(f"{NAME}/gain", value, i)
    return section
