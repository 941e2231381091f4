"""The pretrained-at-scale benchmark (issue 25): torchvision's resnet50 (random weights saved as a torchvision
state dict, loaded through --weights PATH) on an evaluation-only ImageFolder of N images of 224 px (random
JPEGs, 4 wnid-named classes), --epochs 0, the default plugin set. Prints each plugin's seconds, the run's
wall time and peak RSS, and the cost of the whole analysis in "passes": its seconds over those of one plain
forward+backward pass of resnet50 over the same N images, timed in this process (a number that holds on any
machine).

    python benchmarks/pretrained_resnet50.py [--images 64] [--model resnet50] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]


def make_folder(root: Path, images: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / "val" / WNIDS[i % len(WNIDS)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (256, 300, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")


def one_pass(model_name: str, images: int, device: str) -> float:
    """Seconds of one forward+backward pass over ``images`` images of 224 px, in batches of 64."""
    model = torchvision.models.get_model(model_name).to(device).train()
    x = torch.randn(min(images, 64), 3, 224, 224, device=device)
    model(x[:2]).sum().backward()  # warm-up
    start = time.perf_counter()
    for _ in range(0, images, 64):
        model.zero_grad()
        model(x).sum().backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout", type=int, default=1800)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        make_folder(tmp_path / "data", args.images)
        torch.manual_seed(0)
        torch.save(torchvision.models.get_model(args.model).state_dict(), tmp_path / "weights.pth")
        cmd = [sys.executable, "-m", "resinspect", "run", "--model", f"torchvision:{args.model}", "--weights",
               str(tmp_path / "weights.pth"), "--data", "imagefolder", "--data-root", str(tmp_path / "data"),
               "--device", args.device, "--out", str(tmp_path / "run"), "--tb-skip", "projector"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        wall = time.perf_counter() - start
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
        if proc.returncode not in (0, 1) or not (tmp_path / "run" / "results.json").exists():
            sys.exit(f"the run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        results = json.loads((tmp_path / "run" / "results.json").read_text())
        base = one_pass(args.model, args.images, args.device)
    analysis = 0.0
    for name, p in results["plugins"].items():
        analysis += p["seconds"]
        print(f"{name:<12} {p['status']:<7} {p['seconds']:8.1f} s  {p['seconds'] / base:7.1f} passes")
    print(f"run status {results['status']}; wall {wall:.1f} s; peak RSS {peak_gb:.2f} GB; "
          f"one forward+backward pass over {args.images} images: {base:.1f} s")
    print(f"ratio analysis/pass: {analysis / base:.1f} (target: wall <= 600 s and peak RSS <= 4 GB on 2 cores; "
          f"here {wall:.0f} s, {peak_gb:.2f} GB)")


if __name__ == "__main__":
    main()
