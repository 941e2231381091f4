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
        self.pending: list[torch.Tensor] = [self._zero] * (4 * len(blocks))
        self.block_rows: list[int] = []
        self.rows = 0
        self.tap = True
        pending = self.pending

        def report(j: int, part: str, g: torch.Tensor) -> None:
            pending[4 * j + _COLUMN[part]] = torch.linalg.vector_norm(g.detach())

        self._split.enter_context(gradient_split(blocks, report, enabled=lambda: self.tap and self.active))

    def detach(self) -> None:
        self._split.close()

    def record(self, step: int) -> None:
        if self.active:
            grads = [p.grad.detach() if p.grad is not None else self._zero for p in self.params]
            if grads:
                l2 = torch.stack(torch._foreach_norm(grads, 2))
                l1 = torch.stack(torch._foreach_norm(grads, 1))
                linf = torch.stack(_foreach_absmax(grads))
                self.param_buf[self.rows] = torch.stack([l2, l1 / self._numel(l1.device), linf])
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

    def _numel(self, device: torch.device) -> torch.Tensor:
        if not hasattr(self, "_numels"):
            self._numels = torch.tensor([float(p.numel()) for p in self.params], device=device)
        return self._numels

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


def _foreach_absmax(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """max |t| of each tensor; ``_foreach_max`` of ``_foreach_abs`` is several times faster than the inf-norm."""
    if hasattr(torch, "_foreach_max"):
        return list(torch._foreach_max(torch._foreach_abs(tensors)))
    return list(torch._foreach_norm(tensors, float("inf")))
