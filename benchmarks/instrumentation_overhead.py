"""Training resnet20 on digits, bare vs with the gradflow and weights plugins attached.

Same seed, same process, alternating runs; prints the wall-time ratio
instrumented/bare (target: <= 1.05). The ratio of the fastest runs is the
headline (timing noise on a shared machine only ever adds time); the ratio of
medians is printed too.

    python benchmarks/instrumentation_overhead.py [--epochs 2] [--repeats 7] [--model resnet20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch.utils.tensorboard import SummaryWriter

from resinspect.plugins import PluginHost
from resinspect.testing import make_context
from resinspect.data import load_data
from resinspect.training import TrainConfig, train_model


def one_run(model_name: str, data, epochs: int, plugins: list[str], every: int) -> tuple[float, list[float]]:
    host = PluginHost()
    host.activate(plugins)
    options = host.option_registry().resolve({"gradflow": {"every": every}} if "gradflow" in plugins else {})
    with tempfile.TemporaryDirectory() as tmp:
        ctx = make_context(model_name, data=data, run_dir=tmp, options=options, batch_size=64)
        ctx.writer = SummaryWriter(f"{tmp}/tb")
        host.call("resinspect_configure", ctx=ctx)
        start = time.perf_counter()
        history = train_model(ctx.model, ctx.train_loader, ctx.test_loader, TrainConfig(epochs=epochs), ctx.device,
                              hooks=host, ctx=ctx, writer=ctx.writer)
        elapsed = time.perf_counter() - start
        host.call("resinspect_unconfigure", ctx=ctx, include_failed=True)
        ctx.writer.close()
        if host.failures:
            raise SystemExit(f"plugin failed: {host.failures}")
    return elapsed, history.step_losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--every", type=int, default=1, help="gradflow's recording interval")
    args = parser.parse_args()
    data = load_data("digits")
    times: dict[str, list[float]] = {"bare": [], "instrumented": []}
    losses = {}
    one_run(args.model, data, 1, [], args.every)  # warm-up
    for _ in range(args.repeats):
        for label, plugins in (("bare", []), ("instrumented", ["gradflow", "weights"])):
            t, losses[label] = one_run(args.model, data, args.epochs, plugins, args.every)
            times[label].append(t)
    same = losses["bare"] == losses["instrumented"]
    bare, inst = min(times["bare"]), min(times["instrumented"])
    med_bare, med_inst = statistics.median(times["bare"]), statistics.median(times["instrumented"])
    print(f"{args.model} on digits, {args.epochs} epochs, {args.repeats} alternating repeats, "
          f"gradflow every={args.every}, torch threads={torch.get_num_threads()}")
    print(f"bare: best {bare:.2f} s, median {med_bare:.2f} s   with gradflow+weights: best {inst:.2f} s, "
          f"median {med_inst:.2f} s   identical losses: {'yes' if same else 'NO'}")
    print(f"ratio instrumented/bare: {inst / bare:.3f} best-of (target <= 1.05), {med_inst / med_bare:.3f} median")


if __name__ == "__main__":
    main()
