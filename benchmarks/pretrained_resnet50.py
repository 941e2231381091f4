"""The pretrained-at-scale benchmark (issue 25): torchvision's resnet50 (random weights saved as a torchvision
state dict, loaded through --weights PATH) on an evaluation-only ImageFolder of N images of 224 px (random
JPEGs, 4 wnid-named classes), --epochs 0, the default plugin set. Prints each plugin's seconds, the run's
wall time and peak RSS, and the cost of the whole analysis in "passes": its seconds over those of one plain
forward+backward pass of resnet50 over the same N images, timed in this process (a number that holds on any
machine).

    python benchmarks/pretrained_resnet50.py [--images 64] [--model resnet50] [--device cpu]
    python benchmarks/pretrained_resnet50.py --model convnext_tiny
    python benchmarks/pretrained_resnet50.py --model vit_b_16

Also printed per plugin: the run's own estimate made before the analysis (from a timed probe pass) and the
peak resident memory of its analysis.
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


def _skip_reason(plugin: dict) -> str:
    for section in plugin.get("sections", []):
        if section.get("status") == "skipped":
            return " ".join(f["text"] for f in section.get("findings", []) if f["text"].startswith("Skipped"))
    return ""


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
        # the run resets the process's high-water mark per plugin (which getrusage shares): its own record
        # of the whole run's peak, and getrusage's as a floor
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
        if proc.returncode not in (0, 1) or not (tmp_path / "run" / "results.json").exists():
            sys.exit(f"the run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        results = json.loads((tmp_path / "run" / "results.json").read_text())
        peak_gb = max(peak_gb, (results["run"].get("peak_rss_mb") or 0) / 1024)
        base = one_pass(args.model, args.images, args.device)
    said = [ln for ln in proc.stderr.splitlines() if "estimate:" in ln]
    print(said[0] if said else "(the run printed no estimate)")
    analysis = estimated = 0.0
    print(f"{'plugin':<12} {'status':<7} {'seconds':>9} {'passes':>8} {'estimated':>10} {'peak RSS':>10}")
    for name, p in results["plugins"].items():
        analysis += p["seconds"]
        est = p.get("estimate_seconds")
        estimated += est or 0.0
        peak = p.get("peak", {}).get("rss_mb")
        print(f"{name:<12} {p['status']:<7} {p['seconds']:8.1f} s {p['seconds'] / base:8.1f} "
              f"{'' if est is None else f'{est:8.1f} s':>10} {'' if peak is None else f'{peak / 1024:7.2f} GB':>10}")
        if p["status"] != "ok":
            print(f"    {p.get('error') or _skip_reason(p)}")
    print(f"run status {results['status']}; wall {wall:.1f} s; peak RSS {peak_gb:.2f} GB; "
          f"one forward+backward pass over {args.images} images: {base:.1f} s; estimated before the analysis "
          f"{estimated:.0f} s, measured {analysis:.0f} s")
    print(f"ratio analysis/pass: {analysis / base:.1f} (target: wall <= 600 s and peak RSS <= 4 GB on 2 cores; "
          f"here {wall:.0f} s, {peak_gb:.2f} GB)")


if __name__ == "__main__":
    main()
