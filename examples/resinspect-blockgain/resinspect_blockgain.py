"""How much each residual block amplifies the signal: ||y|| / ||x|| over the test set."""

from torch import nn

from resinspect import Section, capture_batches, hookimpl, residual_blocks

@hookimpl
def resinspect_addoptions(options):
    options.add("samples", int, 128, "test images to use", bounds="[1, 100_000]")


class TinyBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())

    def forward(self, x):
        return x + self.f(x)


def tiny_resnet(in_channels=1, num_classes=10, width=8, depth=3):
    """A stem, ``depth`` residual blocks and a linear head: the model this package adds to ``--model``."""
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                         *[TinyBlock(width) for _ in range(depth)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


@hookimpl
def resinspect_register_models(registry):
    registry.add("blockgain-tiny", tiny_resnet, "a three-block residual convnet (from resinspect-blockgain)")


@hookimpl
def resinspect_analyze(ctx):
    opts = ctx.options()
    blocks = residual_blocks(ctx.model)
    section = Section("Block gain", explanation="||y|| / ||x|| per residual block, averaged over test images. "
                      "Values near 1 mean the block passes its input on nearly unchanged in size.")
    if not blocks:
        section.finding("No residual blocks: nothing to measure.")
        return section
    sums = {b.name: 0.0 for b in blocks}
    count = 0
    # capture_batches: eval mode, no gradients, the blocks' inputs and outputs per batch, hooks removed after;
    # ctx.shard: under torchrun each process takes its share of the batches (in one process: all of them)
    for x, _, _, seen in capture_batches(ctx.model, blocks, ctx.shard(ctx.test_batches(opts["samples"]))):
        for name in sums:
            gain = seen.outputs[name].flatten(1).norm(dim=1) / seen.inputs[name].flatten(1).norm(dim=1).clamp_min(1e-12)
            sums[name] += gain.sum().item()
        count += len(x)
    sums, count = ctx.all_reduce((sums, count))  # every process's sums added up (one process: unchanged)
    for name, total in sums.items():
        section.metrics[name] = total / count
    section.block_column("gain", section.metrics)  # a column of the run's per-block dossier
    section.table("Gain per block", ["block", "gain"], [[n, v] for n, v in section.metrics.items()])
    top = max(section.metrics, key=section.metrics.get)
    section.finding(f"{top} amplifies its input most (×{section.metrics[top]:.2f}).")
    for i, value in enumerate(section.metrics.values()):
        ctx.log_scalar("gain", value, i)  # TensorBoard tag blockgain/gain, in the model's run
    return section
