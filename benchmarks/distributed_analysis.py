"""The analysis phase (ablation + attribution + activations) of a resnet56 checkpoint: 2 processes x 1 thread
(``resinspect run --nproc 2``, gloo) against 1 process x 2 threads, on this machine.

Both are the same ``resinspect run --checkpoint ... --epochs 0`` command line, started alternately; the time
compared is the analysis phase, the sum of the plugins' seconds in results.json (rank 0 waits for the others
at every collective, so its time is the distributed run's). The script also checks that both runs wrote the
same metrics (counts exactly, sums to 1e-5). Target: 2 processes / 1 process <= 0.9.

On a CUDA machine, ``--nproc`` equal to the GPU count puts one process on each GPU (NCCL).

    python benchmarks/distributed_analysis.py [--repeats 3] [--nproc 2] [--model resnet56]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLUGINS = "ablation,attribution,activations"


def _run(checkpoint: Path, out: Path, nproc: int, threads: int, device: str) -> tuple[float, float, dict]:
    cmd = [sys.executable, "-m", "resinspect", "run", "--checkpoint", str(checkpoint), "--epochs", "0", "--plugins",
           PLUGINS, "--device", device, "-q", "--out", str(out), "--overwrite"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"run failed ({' '.join(cmd)}):\n{proc.stdout}\n{proc.stderr}")
    results = json.loads((out / "results.json").read_text())
    analysis = sum(p["seconds"] for p in results["plugins"].values())
    metrics = {f"{n}/{k}": v for n, p in results["plugins"].items() for s in p["sections"]
               for k, v in s["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return analysis, wall, metrics


def _same(a: dict, b: dict) -> int:
    bad = 0
    for k, x in a.items():
        y = b.get(k)
        if y is None or not ((math.isnan(x) and math.isnan(y)) or abs(x - y) <= 1e-5 * max(abs(x), abs(y), 1e-12)):
            bad += 1
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import resinspect

    with tempfile.TemporaryDirectory(prefix="resinspect-bench-") as tmp:
        root = Path(tmp)
        resinspect.run(model=args.model, data="digits", epochs=1, plugins=[], device=args.device,
                       out=root / "trained")
        ckpt = root / "trained" / "model.pt"
        threads = args.nproc  # the single process gets every core the processes share
        times: dict[str, list[float]] = {"one": [], "many": []}
        walls: dict[str, list[float]] = {"one": [], "many": []}
        last: dict[str, dict] = {}
        for i in range(args.repeats):
            for name in (("one", "many") if i % 2 == 0 else ("many", "one")):
                nproc, per = (1, threads) if name == "one" else (args.nproc, 1)
                a, w, last[name] = _run(ckpt, root / name, nproc, per, args.device)
                times[name].append(a)
                walls[name].append(w)
                print(f"  {name:>4}: analysis {a:6.2f} s, wall {w:6.2f} s", flush=True)
        differ = _same(last["one"], last["many"])
        print(f"metrics: {len(last['one'])}, differing beyond 1e-5: {differ}")
        one, many = statistics.median(times["one"]), statistics.median(times["many"])
        print(f"1 process x {threads} threads: {one:.2f} s; {args.nproc} processes x 1 thread: {many:.2f} s "
              f"(median of {args.repeats}; wall {statistics.median(walls['one']):.1f} vs "
              f"{statistics.median(walls['many']):.1f} s)")
        print(f"ratio analysis {args.nproc} processes/1 process: {many / one:.3f} (target <= 0.9)")


if __name__ == "__main__":
    main()
