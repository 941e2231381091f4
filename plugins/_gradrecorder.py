"""gradflow's recorder: per-parameter gradient statistics and per-block skip/branch gradient norms of one
network during training, kept in a device buffer and moved to the host in chunks (no per-step sync)."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from resinspect import gradient_split, residual_blocks

CAPACITY = 256  # rows kept on the device before one transfer to the host
# per-block columns: gradient at the block output, skip part and branch part of the input gradient, total
OUT, SKIP, BRANCH, TOTAL = range(4)
_COLUMN = {"out": OUT, "skip": SKIP, "branch": BRANCH, "total": TOTAL}


class GradRows(NamedTuple):
    """Recorded rows: ``params[record, stat, parameter]`` with stats (L2 norm, mean |g|, max |g|), and
    ``blocks[record, block, column]`` with columns :data:`OUT`, :data:`SKIP`, :data:`BRANCH`, :data:`TOTAL`."""

    params: np.ndarray
    blocks: np.ndarray


@dataclass
class GradRecorder:
    """Records gradient statistics of one network during training."""

    role: str
    model: nn.Module
    every: int
    block_every: int = 1
    names: list[str] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)
    block_names: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    param_chunks: list[np.ndarray] = field(default_factory=list)
    block_chunks: list[np.ndarray] = field(default_factory=list)
    active: bool = True
    written: int = 0
    _split: ExitStack = field(default_factory=ExitStack)

    def attach(self, device: torch.device, blocks: list | None = None) -> None:
        """Start recording; ``blocks`` are the model's residual blocks when the caller has them already
        (``ctx.blocks(role)``: found once per run, with their graph variants cached)."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        blocks = residual_blocks(self.model) if blocks is None else blocks
        self.block_names = [b.name for b in blocks]
        self.param_buf = torch.zeros(CAPACITY, 3, len(self.params), device=device)
        self.block_buf = torch.zeros(CAPACITY, len(blocks), 4, device=device)
        self._zero = torch.zeros((), device=device)
        self._groups, self._inverse = _shape_groups(self.params, device)
        self.pending: list[torch.Tensor] = [self._zero] * (4 * len(blocks))
        self.block_rows: list[int] = []
        self.rows = 0
        self.tap = True
        pending = self.pending

        def report(j: int, part: str, g: torch.Tensor) -> None:
            # normed at once: holding on to the gradient until the step ends would cost more (autograd can
            # no longer reuse its buffer)
            pending[4 * j + _COLUMN[part]] = torch.linalg.vector_norm(g.detach())

        self._split.enter_context(gradient_split(blocks, report, enabled=lambda: self.tap and self.active))

    def detach(self) -> None:
        self._split.close()

    def record(self, step: int) -> None:
        if self.active:
            if self.params:
                self.param_buf[self.rows] = self._param_stats()
            if self.tap and self.block_names:
                self.block_buf[self.rows] = torch.stack(self.pending).view(-1, 4)
                self.pending[:] = [self._zero] * len(self.pending)
                self.block_rows.append(len(self.steps))
            self.steps.append(step)
            self.rows += 1
            if self.rows == CAPACITY:
                self.flush()
        self.active = (step + 1) % self.every == 0
        self.tap = len(self.steps) % self.block_every == 0

    def _param_stats(self) -> torch.Tensor:
        """``[3, parameters]``: L2 norm, mean |g| and max |g| of each parameter's gradient. Parameters of one
        shape are stacked and reduced together: a few calls per shape instead of several per parameter."""
        out = []
        for idx in self._groups:
            grads = [self.params[i].grad for i in idx]
            g = torch.stack(
                [x.detach() if x is not None else torch.zeros_like(self.params[i]) for i, x in zip(idx, grads)]
            ).flatten(1)
            l2 = torch.linalg.vector_norm(g, dim=1)
            g = g.abs_()
            out.append(torch.stack([l2, g.mean(1), g.amax(1)]))
        return torch.cat(out, 1)[:, self._inverse]

    def flush(self) -> tuple[np.ndarray, np.ndarray]:
        """Move the recorded rows to the host (one transfer); returns the new rows."""
        if self.rows == 0:
            return np.zeros((0, 3, len(self.params))), np.zeros((0, len(self.block_names), 4))
        p = self.param_buf[: self.rows].cpu().numpy().copy()
        b = self.block_buf[: self.rows].cpu().numpy().copy()
        self.param_chunks.append(p)
        self.block_chunks.append(b)
        self.rows = 0
        return p, b

    def _all_rows(self) -> tuple[np.ndarray, np.ndarray]:
        self.flush()
        p = np.concatenate(self.param_chunks) if self.param_chunks else np.zeros((0, 3, len(self.params)))
        b = np.concatenate(self.block_chunks) if self.block_chunks else np.zeros((0, len(self.block_names), 4))
        return p, b

    def arrays(self) -> GradRows:
        """Every recorded row of parameter statistics, and the rows where the block split was taken."""
        p, b = self._all_rows()
        return GradRows(p, b[self.block_rows])

    def unwritten(self) -> tuple[int, np.ndarray, np.ndarray]:
        """Rows recorded since the last call (``first row index, params, blocks``), e.g. for TensorBoard."""
        p, b = self._all_rows()
        start, self.written = self.written, len(p)
        return start, p[start:], b[start:]


def _shape_groups(params: list[nn.Parameter], device: torch.device) -> tuple[list[list[int]], torch.Tensor]:
    """Parameter indices grouped by shape, and the permutation that puts the groups' columns back in order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(tuple(p.shape), []).append(i)
    order = [i for idx in groups.values() for i in idx]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return list(groups.values()), inverse.to(device)
