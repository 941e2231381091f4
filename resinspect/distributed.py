"""Runs across several processes (``torchrun``): the process group, and the small API plugins use through the
run context (``ctx.is_main``, ``ctx.shard``, ``ctx.split``, ``ctx.all_reduce``, ``ctx.all_gather``).

A single-process run never initialises ``torch.distributed``: :func:`from_environment` returns
:data:`SINGLE`, whose operations are the identity.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from .errors import ResinspectError

__all__ = [
    "Distributed",
    "SINGLE",
    "from_environment",
    "reduce_values",
    "TIMEOUT_ENV",
    "PEER_FAILED",
    "is_peer_failure",
]

T = TypeVar("T")
TIMEOUT_ENV = "RESINSPECT_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks (default 600)
_OPS = ("sum", "max", "min")
PEER_FAILED = "stopped: another rank failed"
_PEER_SIGNS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "NCCL communicator was aborted",
    "Socket Timeout",
    "timed out",
)


def is_peer_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective failing because another rank went away (or never came), rather than
    this rank's own error."""
    return isinstance(e, RuntimeError) and any(sign in str(e) for sign in _PEER_SIGNS)


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: ``world_size`` processes, this one ``rank`` (``local_rank`` on its
    machine), ``backend`` ``gloo`` (CPU) or ``nccl`` (CUDA), or None in a single-process run."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- splitting work -------------------------------------------------------------------------
    def shard(self, batches: Iterable[T], whole: bool = False) -> Iterator[T]:
        """This rank's share of a stream of batches (tuples or lists of tensors with the images first).

        By default every batch is cut into ``world_size`` nearly equal parts along its first dimension and
        this rank gets part ``rank`` (a balanced split, for statistics that are sums over images); empty
        parts are skipped. ``whole=True`` keeps batches whole and gives this rank batches ``rank``,
        ``rank + world_size``, … (for statistics computed per batch, such as the minibatch CKA estimator)."""
        if not self.enabled:
            yield from batches
            return
        for i, batch in enumerate(batches):
            if whole:
                if i % self.world_size == self.rank:
                    yield batch
                continue
            part = _part(batch, self.world_size, self.rank)
            if part is not None:
                yield part

    def split(self, items: Sequence[T], cost: Any = None) -> list[T]:
        """This rank's share of a list of independent units of work: ``items[rank::world_size]``, or, with
        ``cost`` (a function of an item, e.g. its number of forward passes), the longest-first greedy
        assignment that balances the ranks' total cost."""
        items = list(items)
        if cost is None or not self.enabled:
            return items[self.rank :: self.world_size]
        load = [0.0] * self.world_size
        owner: dict[int, int] = {}
        for i in sorted(range(len(items)), key=lambda i: (-float(cost(items[i])), i)):
            r = min(range(self.world_size), key=lambda r: (load[r], r))
            owner[i] = r
            load[r] += float(cost(items[i]))
        return [item for i, item in enumerate(items) if owner[i] == self.rank]

    # -- combining results ----------------------------------------------------------------------
    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank (tensors travel through the CPU and come back
        on this rank's device)."""
        if not self.enabled:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, _to_cpu(value))
        device = _device_of(value)
        return [_to(v, device) for v in out] if device is not None else out

    def all_reduce(self, value: Any, op: str = "sum") -> Any:
        """``value`` combined over the ranks with ``op`` (``sum``, ``max`` or ``min``), returned on every
        rank. ``value`` may be a number, a tensor, or dicts, lists, tuples, dataclasses and plain objects
        holding them (to any depth); the result has the same shape, with the keys of every rank's dicts.
        Ranks are combined in rank order, so every rank gets the same numbers. One process: ``value``."""
        if op not in _OPS:
            raise ValueError(f"all_reduce op '{op}': valid: {', '.join(_OPS)}")
        if not self.enabled:
            return value
        if isinstance(value, torch.Tensor):  # one collective, no pickling
            import torch.distributed as dist

            out = value.detach().clone()
            dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
            return out
        return reduce_values(self.all_gather(value), op)

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def average_buffers(self, module: torch.nn.Module) -> None:
        """Give every rank the mean over the ranks of each floating-point buffer (BatchNorm running statistics,
        which each rank estimates from its own share of every batch: their mean uses every image, as one
        process's estimate does), and rank 0's integer buffers (batch counters)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for b in module.buffers():
                if b.is_floating_point():
                    dist.all_reduce(b)
                    b.div_(self.world_size)
                else:
                    dist.broadcast(b, src=0)


SINGLE = Distributed()


def _part(batch: Any, world: int, rank: int) -> Any:
    """Part ``rank`` of ``world`` of a batch (each tensor cut along its first dimension); None when empty."""
    if isinstance(batch, torch.Tensor):
        piece = torch.tensor_split(batch, world)[rank]
        return piece if len(piece) else None
    if isinstance(batch, (list, tuple)):
        pieces = [torch.tensor_split(t, world)[rank] if isinstance(t, torch.Tensor) and t.dim() else t for t in batch]
        first = next((p for p in pieces if isinstance(p, torch.Tensor)), None)
        if first is not None and len(first) == 0:
            return None
        return type(batch)(pieces)
    raise TypeError(f"shard: cannot cut a {type(batch).__name__} into parts; pass whole=True")


def from_environment(device: str = "auto") -> Distributed:
    """The process group torchrun describes in the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``),
    initialised once (gloo on CPU, NCCL on CUDA with one GPU per local rank); :data:`SINGLE` when the
    environment names no group of more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if cuda else "gloo"
    if cuda:
        if local >= torch.cuda.device_count():
            raise ResinspectError(
                f"rank {rank}: local rank {local} has no GPU (this machine has "
                f"{torch.cuda.device_count()}); use --nproc-per-node <= the GPU count"
            )
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        try:
            timeout = dt.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))
        except ValueError:
            raise ResinspectError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r} is not a number of seconds") from None
        dist.init_process_group(backend, timeout=timeout, device_id=torch.device("cuda", local) if cuda else None)
    return Distributed(dist.get_world_size(), dist.get_rank(), local, backend)


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -- combining values of any shape --------------------------------------------------------------------
def reduce_values(values: list[Any], op: str = "sum") -> Any:
    """Combine ``values`` (one per rank, the same shape) element by element with ``op``."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    first = present[0]
    if isinstance(first, torch.Tensor):
        out = present[0].clone()
        for v in present[1:]:
            out = _combine(out, v.to(out.device), op)
        return out
    if isinstance(first, bool):
        return any(present) if op in ("sum", "max") else all(present)
    if isinstance(first, (int, float)):
        out = present[0]
        for v in present[1:]:
            out = _combine(out, v, op)
        return out
    if isinstance(first, dict):
        out = copy.copy(first)
        out.clear()
        for k in dict.fromkeys(k for v in present for k in v):
            out[k] = reduce_values([v[k] for v in present if k in v], op)
        return out
    if isinstance(first, (list, tuple)):
        if any(len(v) != len(first) for v in present):
            raise ValueError(f"all_reduce: the ranks' sequences differ in length ({[len(v) for v in present]})")
        items = [reduce_values([v[i] for v in present], op) for i in range(len(first))]
        return type(first)(items) if not hasattr(first, "_fields") else type(first)(*items)
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        out = copy.copy(first)
        for f in dataclasses.fields(first):
            object.__setattr__(out, f.name, reduce_values([getattr(v, f.name) for v in present], op))
        return out
    if hasattr(first, "__dict__") and not isinstance(first, type):
        out = copy.copy(first)
        for k in vars(first):
            setattr(out, k, reduce_values([getattr(v, k, None) for v in present], op))
        return out
    return first  # strings, names and other labels: the same on every rank


def _combine(a: Any, b: Any, op: str) -> Any:
    if op == "sum":
        return a + b
    if isinstance(a, torch.Tensor):
        return torch.maximum(a, b) if op == "max" else torch.minimum(a, b)
    return max(a, b) if op == "max" else min(a, b)


def _to_cpu(value: Any) -> Any:
    return _map_tensors(value, lambda t: t.detach().cpu())


def _to(value: Any, device: torch.device) -> Any:
    return _map_tensors(value, lambda t: t.to(device))


def _device_of(value: Any) -> torch.device | None:
    found: list[torch.device] = []

    def note(t: torch.Tensor) -> torch.Tensor:
        found.append(t.device)
        return t

    _map_tensors(value, note)
    return found[0] if found else None


def _map_tensors(value: Any, fn: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        out = copy.copy(value)
        for k, v in value.items():
            out[k] = _map_tensors(v, fn)
        return out
    if isinstance(value, (list, tuple)):
        items = [_map_tensors(v, fn) for v in value]
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = copy.copy(value)  # type: ignore[arg-type]  # (any dataclass instance copies)
        for f in dataclasses.fields(value):
            object.__setattr__(out, f.name, _map_tensors(getattr(value, f.name), fn))
        return out
    if hasattr(value, "__dict__") and not isinstance(value, (type, torch.nn.Module)) and not callable(value):
        out = copy.copy(value)
        for k, v in vars(value).items():
            setattr(out, k, _map_tensors(v, fn))
        return out
    return value
