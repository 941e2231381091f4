"""TensorBoard as its users expect: one *run* per network (``tb/model/``, ``tb/twin/``) with identical tags,
so ``tensorboard --logdir RUN/tb`` draws the residual network and its plain twin on the same chart.

Everything reaches the event files through :class:`TensorBoardRuns`: the training loop (``train/loss``,
``train/test_accuracy`` …), each section's metrics and figures, and what a plugin logs itself with
``ctx.log_scalar`` / ``ctx.log_histogram`` (tags under the plugin's name).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import ResinspectError
from .section import Section

__all__ = ["TensorBoardRuns", "ROLES", "TAB_KINDS"]

ROLES = ("model", "twin")
# what resinspect.tbtabs writes for TensorBoard's other tabs, each skippable with --tb-skip
TAB_KINDS = ("hparams", "graph", "projector", "pr", "layout", "text")


class TensorBoardRuns:
    """Lazily opened ``SummaryWriter`` per role under ``root`` (``None``: log nothing, e.g. in tests)."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root is not None else None
        self._writers: dict[str, Any] = {}
        self._tags: set[str] = set()

    def tags_written(self) -> set[str]:
        """Every scalar tag logged through these runs so far (either network)."""
        return set(self._tags)

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def writer(self, role: str = "model") -> Any:
        """The ``SummaryWriter`` of ``role``'s run, or None when logging is off."""
        if role not in ROLES:
            raise ResinspectError(f"unknown network role '{role}'; valid: {', '.join(ROLES)}")
        if self.root is None:
            return None
        if role not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            from .rundir import output_error

            try:
                self._writers[role] = SummaryWriter(str(self.root / role))
            except OSError as e:
                raise output_error(self.root / role, "write TensorBoard logs", e) from e
        return self._writers[role]

    def scalar(self, tag: str, value: float, step: int = 0, role: str = "model") -> None:
        self.scalars({tag: value}, step, role)

    def scalars(self, values: Mapping[str, float], step: int = 0, role: str = "model") -> None:
        """Several scalars of one step as one event (each tag its own chart, as with ``add_scalar``):
        one protobuf and one queue entry instead of one per tag, ~25× cheaper for a layer-per-tag log."""
        w = self.writer(role)
        if w is None or not values:
            return
        self._tags.update(values)
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=t, simple_value=float(v)) for t, v in values.items()])
        w._get_file_writer().add_summary(summary, step)

    def histogram(self, tag: str, values: torch.Tensor, step: int = 0, role: str = "model", bins: int = 64) -> None:
        """Like ``SummaryWriter.add_histogram``, with the histogram computed by torch on the tensor's device
        (``bins`` equal-width buckets) and a single transfer to the host."""
        w = self.writer(role)
        if w is None:
            return
        v = values.detach().float().flatten()
        if v.numel() == 0:
            return
        lo, hi = v.min(), v.max()
        counts = (
            torch.histc(v, bins=bins, min=float(lo), max=float(hi))
            if hi > lo
            else torch.tensor([float(v.numel())], device=v.device)
        )
        summary = torch.stack([lo, hi, v.sum(), (v * v).sum()]).cpu().tolist()
        edges = torch.linspace(summary[0], summary[1], len(counts) + 1)[1:].tolist()
        w.add_histogram_raw(
            tag,
            min=summary[0],
            max=summary[1],
            num=v.numel(),
            sum=summary[2],
            sum_squares=summary[3],
            bucket_limits=edges,
            bucket_counts=counts.cpu().tolist(),
            global_step=step,
        )

    def sections(self, sections: list[Section]) -> None:
        """Each section's numeric metrics, figures and findings under ``<plugin>/`` in its network's run.

        A metric named ``model/x`` or ``twin/x`` goes to that network's run as ``<plugin>/x``, so the two
        networks' values overlay; other ``/`` in a name are kept (``<plugin>/block/layer1.0/cost``); names in
        ``Section.tensorboard_skip`` are left out; a section with ``role="twin"`` goes to the twin's run. A
        plugin's second section of the same role goes under ``<plugin>/section<n>/`` so tags never clash.
        """
        import numpy as np
        from PIL import Image

        seen: dict[tuple[str, str], int] = {}
        for s in sections:
            plugin = "train" if s.plugin == "core" else s.plugin
            role = s.role or "model"
            n = seen[(plugin, role)] = seen.get((plugin, role), -1) + 1
            prefix = plugin if n == 0 else f"{plugin}/section{n}"
            by_role: dict[str, dict[str, float]] = {}
            for k, v in s.metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in s.tensorboard_skip:
                    first, _, rest = k.partition("/")
                    target, name = (first, rest) if first in ROLES and rest else (role, k)
                    by_role.setdefault(target, {})[f"{prefix}/{name}"] = v
            for target, values in by_role.items():
                self.scalars(values, 0, role=target)
            w = self.writer(role)
            if w is None:
                continue
            for i, f in enumerate(s.figures):
                img = np.asarray(Image.open(io.BytesIO(f.png)).convert("RGB"))
                w.add_image(f"{prefix}/figure/{i}-{f.title}", img, 0, dataformats="HWC")
            if s.findings:
                w.add_text(f"{prefix}/findings", "\n".join(f"- [{f.severity}] {f.text}" for f in s.findings), 0)

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()
