"""Training resnet20 on digits, bare vs with the gradflow and weights plugins attached.

Same seed, same process, alternating runs; prints the wall-time ratio
instrumented/bare (target: <= 1.05) of the median runs, which is the headline
(on a shared 2-core machine single runs vary by ±10%), plus the ratio of the
fastest runs and of the median CPU times.

    python benchmarks/instrumentation_overhead.py [--epochs 2] [--repeats 15] [--model resnet20]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time

import torch
from pathlib import Path

from resinspect.plugins import PluginHost
from resinspect.tensorboard import TensorBoardRuns
from resinspect.testing import make_context
from resinspect.data import load_data
from resinspect.training import TrainConfig, train_model


def one_run(model_name: str, data, epochs: int, plugins: list[str], every: int) -> tuple[float, list[float], float]:
    host = PluginHost()
    host.activate(plugins)
    options = {"gradflow": {"every": every}} if "gradflow" in plugins else {}
    with tempfile.TemporaryDirectory() as tmp:
        ctx = make_context(model_name, data=data, run_dir=tmp, options=options, batch_size=64)
        ctx.tensorboard = TensorBoardRuns(Path(tmp) / "tb")
        ctx.blocks("model")  # as in `resinspect run`, which finds the blocks (for results.json) before training
        host.call("resinspect_configure", ctx=ctx)
        # as `resinspect run` does: the objects that exist before the timed part are frozen out of the
        # garbage collector's view, so a full collection that happens to fall into one run does not walk
        # the whole heap (a quarter of a second); the collector stays on for what the run itself allocates
        gc.collect()
        gc.freeze()
        start, cpu_start = time.perf_counter(), time.process_time()
        history = train_model(ctx.model, ctx.train_loader, ctx.test_loader, TrainConfig(epochs=epochs), ctx.device,
                              hooks=host, ctx=ctx, writer=ctx.tensorboard.writer("model"))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        gc.unfreeze()
        host.call("resinspect_unconfigure", ctx=ctx, include_failed=True)
        ctx.tensorboard.close()
        if host.failures:
            raise SystemExit(f"plugin failed: {host.failures}")
    return elapsed, history.step_losses, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--every", type=int, default=1, help="gradflow's recording interval")
    args = parser.parse_args()
    data = load_data("digits")
    times: dict[str, list[float]] = {"bare": [], "instrumented": []}
    cpu: dict[str, list[float]] = {"bare": [], "instrumented": []}
    losses = {}
    one_run(args.model, data, 1, [], args.every)  # warm-up
    configs = [("bare", []), ("instrumented", ["gradflow", "weights"])]
    for i in range(args.repeats):
        # alternate which one goes first, so a drift of the machine (or the cost of following the other
        # configuration) falls on both sides equally
        for label, plugins in (configs if i % 2 == 0 else configs[::-1]):
            t, losses[label], c = one_run(args.model, data, args.epochs, plugins, args.every)
            times[label].append(t)
            cpu[label].append(c)
    same = losses["bare"] == losses["instrumented"]
    bare, inst = min(times["bare"]), min(times["instrumented"])
    med_bare, med_inst = statistics.median(times["bare"]), statistics.median(times["instrumented"])
    print(f"{args.model} on digits, {args.epochs} epochs, {args.repeats} alternating repeats, "
          f"gradflow every={args.every}, torch threads={torch.get_num_threads()}")
    print(f"bare: best {bare:.2f} s, median {med_bare:.2f} s   with gradflow+weights: best {inst:.2f} s, "
          f"median {med_inst:.2f} s   identical losses: {'yes' if same else 'NO'}")
    print(f"ratio instrumented/bare: {med_inst / med_bare:.3f} median wall time (target <= 1.05); "
          f"{inst / bare:.3f} best-of, "
          f"{statistics.median(cpu['instrumented']) / statistics.median(cpu['bare']):.3f} median CPU time")


if __name__ == "__main__":
    main()
