"""How long the analysis will take, said before it starts.

Each plugin that can says what its analysis will cost in the model's multiply-adds (the hook
``resinspect_estimate``, with the options, budgets and caps it will use). A timed probe turns that into seconds
on this machine (:func:`probe`: a forward and backward pass of the model over a batch of test images after a
warm-up, and a forward pass without gradients). The run prints the estimate per plugin and
the total before the analysis phase; results.json keeps it beside the measured seconds of each plugin.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .context import _limited

__all__ = ["Estimate", "probe", "estimate", "svd_multiply_adds", "format_seconds"]

# the probe batch: this many multiply-adds of forward at most (resnet50 at 224 px: 4 images), 4 to 64 images
PROBE_MACS = 2e10


@dataclass
class Estimate:
    """Seconds per multiply-add from the probe, and per plugin its multiply-adds and seconds (None: the plugin
    gave no estimate)."""

    images: int
    probe_seconds: float
    seconds_per_mac: float
    plugins: dict[str, float | None] = field(default_factory=dict)
    multiply_adds: dict[str, float | None] = field(default_factory=dict)
    sample: str = "image"

    @property
    def total(self) -> float:
        return sum(v for v in self.plugins.values() if v is not None)

    def line(self) -> str:
        parts = [f"{n} {format_seconds(v) if v is not None else '?'}" for n, v in self.plugins.items()]
        unknown = [n for n, v in self.plugins.items() if v is None]
        return (
            f"estimate: {format_seconds(self.total)} of analysis ({', '.join(parts)}"
            + (f"; no estimate from {', '.join(unknown)}" if unknown else "")
            + f"), from a probe pass of {self.images} {self.sample}(s) forward and backward in "
            + f"{self.probe_seconds:.2f} s"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "probe_images": self.images,
            "probe_seconds": round(self.probe_seconds, 4),
            "seconds_per_gigamac": round(self.seconds_per_mac * 1e9, 6),
            "total_seconds": round(self.total, 2),
        }


def format_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    return f"{s / 60:.1f} min"


def svd_multiply_adds(shape: torch.Size | tuple[int, ...]) -> float:
    """About what the singular values of a weight (its first dimension by the rest) cost, counted as
    multiply-adds of a forward pass: ``8 · m · n · min(m, n)`` (LAPACK's bidiagonalisation does about
    ``4 · m · n · min(m, n)`` flops, at about half a convolution's rate on a CPU)."""
    m = int(shape[0])
    n = math.prod(int(d) for d in shape[1:]) if len(shape) > 1 else 1
    return 8.0 * m * n * min(m, n)


def probe(ctx: Any) -> tuple[int, float, float]:
    """``(images, seconds, seconds per multiply-add)``: one forward and backward pass of the model over a
    batch of test images, in evaluation mode, after a one-image warm-up (the model's gradients are restored),
    and one forward pass without gradients; the rate is the mean of the two passes' (analyses do both:
    forward-only lesions and curves, backward-heavy attributions)."""
    model = ctx.model
    macs = max(1, ctx.multiply_adds())
    want = max(4, min(64, int(PROBE_MACS // macs)))  # at least 4: one image's pass is slower per image
    x, _ = next(_limited(ctx.test_loader, want, ctx.device))
    saved = [p.grad for p in model.parameters()]
    was = model.training
    try:
        model.eval()
        for batch in (x[:1], x):
            start = time.perf_counter()
            out = model(batch)
            out = out[0] if isinstance(out, (tuple, list)) else out
            out.float().sum().backward()
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            seconds = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            model(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        forward = time.perf_counter() - start
    finally:
        model.train(was)
        for p, g in zip(model.parameters(), saved):
            p.grad = g
    rate = 0.5 * (seconds / (3.0 * len(x) * macs) + forward / (len(x) * macs))
    return len(x), seconds, rate


def estimate(ctx: Any, host: Any) -> Estimate:
    """The probe, then every active plugin's ``resinspect_estimate`` in seconds (a plugin whose estimate
    fails or that has none: None)."""
    images, seconds, per_mac = probe(ctx)
    out = Estimate(images, seconds, per_mac, sample=ctx.task.sample)
    for name, macs in host.estimates(ctx).items():
        out.multiply_adds[name] = macs
        out.plugins[name] = None if macs is None else float(macs) * per_mac
    return out
