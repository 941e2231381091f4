"""The RunContext every hook receives, and a typed stash for per-plugin state."""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from .anatomy import Blocks, ResidualBlock, block_module, residual_blocks
from .data import DataBundle
from .data.bundle import dataset_size
from .distributed import SINGLE, Distributed
from .errors import ResinspectError, UnknownNameError
from .task import Task, task_named
from .tensorboard import TensorBoardRuns

__all__ = ["RunContext", "Stash", "StashKey"]

T = TypeVar("T")


def _limited(loader: Iterable[Any], limit: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    seen = 0
    for x, y in loader:
        if limit and seen + len(y) > limit:
            x, y = x[: limit - seen], y[: limit - seen]
        if len(y) == 0:
            break
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        seen += len(y)
        if limit and seen >= limit:
            break


class StashKey(Generic[T]):
    """A typed key: ``KEY = StashKey[MyState]()`` at module level, then ``ctx.stash[KEY] = MyState()``."""

    __slots__ = ()


class Stash:
    """Per-run storage for plugin state, keyed by :class:`StashKey` objects (not strings), so two
    plugins cannot collide and there are no globals."""

    def __init__(self) -> None:
        self._data: dict[StashKey[Any], Any] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._data[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return self._data[key]

    def get(self, key: StashKey[T], default: T | None = None) -> T | None:
        return self._data.get(key, default)

    def setdefault(self, key: StashKey[T], default: T) -> T:
        return self._data.setdefault(key, default)

    def __contains__(self, key: StashKey[Any]) -> bool:
        return key in self._data

    def __delitem__(self, key: StashKey[Any]) -> None:
        del self._data[key]


@dataclass
class RunContext:
    """Everything a plugin may read about the run, and the helpers it should use.

    ``model`` (and ``twin``, the plain twin, when ``--twin`` was given) live on ``device``.
    ``initial_state`` holds CPU copies of each network's weights at initialisation, keyed by role
    (``"model"``, ``"twin"``). ``trained``: False when the networks are analysed at their random
    initialisation (``--epochs 0`` and no checkpoint), True when they were trained or loaded, None when
    unknown (a module given in memory). ``plugin`` is the name of the plugin whose hook is running (set by the host),
    so :meth:`options` and :meth:`log_scalar` need no name.
    """

    model: nn.Module
    model_name: str
    data: DataBundle
    train_loader: DataLoader
    test_loader: DataLoader
    device: torch.device
    run_dir: Path
    tensorboard: TensorBoardRuns = field(default_factory=lambda: TensorBoardRuns(None))
    twin: nn.Module | None = None
    twin_name: str | None = None
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    plugin_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    initial_state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=dict)
    stash: Stash = field(default_factory=Stash)
    plugin: str | None = None
    show_progress: bool = False
    sections: dict[str, list[Any]] = field(default_factory=dict)
    dist: Distributed = SINGLE
    trained: bool | None = None
    samples: int = 0
    compute: float = 0.0
    subsampled: dict[str, dict[str, tuple[int, int, int]]] = field(default_factory=dict)
    _block_cache: dict[str, list[ResidualBlock]] = field(default_factory=dict, repr=False)
    _macs_cache: dict[str, int] = field(default_factory=dict, repr=False)
    _head_cache: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    # -- options and names ---------------------------------------------------------------------
    def section(self, plugin: str) -> Any:
        """The (first) section another plugin's analysis returned in this run, or None when that plugin is
        not active, failed, or has not run yet. A plugin that reads another's section declares its analysis
        ``@hookimpl(trylast=True)`` so that it runs after the others."""
        found = self.sections.get(plugin) or []
        return found[0] if found and found[0].status == "ok" else None

    def options(self, plugin: str | None = None) -> dict[str, Any]:
        """The resolved options (defaults, config file, ``-o``) of ``plugin``, by default the plugin whose
        hook is running. An unknown name is an error, not an empty dict."""
        name = plugin or self.plugin
        if name is None:
            raise ResinspectError("ctx.options() outside a plugin hook needs the plugin's name")
        if name not in self.plugin_options:
            raise UnknownNameError("plugin", name, self.plugin_options, owner="in this run")
        return dict(self.plugin_options[name])

    def label(self, role: str) -> str:
        """The display name of a network by role: ``"model"`` → e.g. ``resnet20``, ``"twin"`` → ``plain20``."""
        if role == "model":
            return self.model_name
        if role == "twin":
            return self.twin_name or "twin"
        raise ResinspectError(f"unknown network role '{role}'; valid: model, twin")

    def networks(self) -> list[tuple[str, nn.Module]]:
        """``[("model", model)]`` plus ``("twin", twin)`` when a twin exists."""
        return [("model", self.model)] + ([("twin", self.twin)] if self.twin is not None else [])

    def blocks(self, role: str = "model") -> list[ResidualBlock]:
        """The residual blocks of a network, a :class:`~resinspect.anatomy.Blocks` list (cached). A plain twin
        has none, and without a twin ``blocks("twin")`` is empty too: see :meth:`twin_counterparts`."""
        if role not in ("model", "twin"):
            raise ResinspectError(f"unknown network role '{role}'; valid: model, twin")
        if role not in self._block_cache:
            network = self.model if role == "model" else self.twin
            self._block_cache[role] = residual_blocks(network) if network is not None else Blocks()
        return self._block_cache[role]

    def head(self, role: str = "model") -> nn.Module:
        """The network's readout: everything its forward computes after the module of its last residual block
        or site (pooling, normalisation, class token, classifier), as a module sharing the network's own
        layers, so ``ctx.head()(stream)`` gives the logits for any stream shaped like the last one (the logit
        lens) and reproduces the model's output exactly for the last stream. Found by tracing, for torchvision
        CNNs, ViT, Swin, ConvNeXt and user models alike; the twin's head sits after the module of the same
        name. Raises :class:`~resinspect.readout.NoHead` naming the reason when there is none to separate."""
        if role not in self._head_cache:
            from .readout import NoHead, find_head

            blocks = self.blocks("model")
            if not blocks:
                raise NoHead(f"{self.model_name} has no residual blocks, so no stream for a head to read")
            network = dict(self.networks()).get(role)
            if network is None:
                raise ResinspectError(f"no network '{role}' in this run; roles: {', '.join(dict(self.networks()))}")
            self._head_cache[role] = find_head(network, blocks[-1].layer)
        return self._head_cache[role]

    def twin_counterparts(self) -> list[tuple[ResidualBlock, nn.Module | None]]:
        """Each residual block of the model with the twin's module of the same name (None when the twin has
        none, or no twin exists): the layers a plain-vs-residual comparison puts side by side."""
        out = []
        for b in self.blocks("model"):
            twin_module = None
            if self.twin is not None:
                try:
                    twin_module = block_module(self.twin, b.name)
                except AttributeError:
                    twin_module = None
            out.append((b, twin_module))
        return out

    def initial_network(self, role: str = "model") -> nn.Module | None:
        """A copy of a network with its weights at initialisation (``initial_state[role]``), or None when they
        were not kept. The copy is the caller's: it shares nothing with the analysed network."""
        state = self.initial_state.get(role)
        if state is None:
            return None
        network = copy.deepcopy(dict(self.networks())[role])
        network.load_state_dict(state)
        return network

    def record_initial_state(self) -> None:
        """Keep CPU copies of every network's current weights as ``initial_state[role]``."""
        for role, m in self.networks():
            self.initial_state[role] = {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}

    # -- data ----------------------------------------------------------------------------------
    @property
    def task(self) -> Task:
        """The run's :class:`~resinspect.task.Task`, chosen by the data: ``ctx.task.loss(outputs, y)`` is the
        mean loss of a batch (cross-entropy over images, or over every token of a language model),
        ``ctx.task.correct(outputs, y)`` the right predictions, ``ctx.task.predictions(y)`` their number,
        ``ctx.task.is_language`` True for next-token data."""
        return task_named(self.data.task)

    def test_batches(self, limit: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` test batches on the device (``ctx.device``).

        ``limit`` counts *images*, not batches: iteration stops once ``limit`` images were yielded, and the
        last batch is cut to fit (``limit=100`` with batches of 64 gives 64 + 36). ``0`` means the whole test
        set. The order is fixed (the test loader does not shuffle), so every call yields the same batches.

        The run's analysis budget (``--samples``, :attr:`samples`) caps ``limit``: with ``--samples 512`` an
        analysis that asks for the whole test set, or 1000 images, gets the first 512, and the report says
        so under the plugin's section (:attr:`subsampled`).
        """
        return _limited(
            self.test_loader, self._budget("test", limit, dataset_size(self.test_loader.dataset)), self.device
        )

    @property
    def trained_in_run(self) -> bool:
        """True when this run trained a network: only then do its initial weights (``initial_state``) differ
        from the analysed ones, and an analysis "at initialisation" measure anything new."""
        return any(getattr(h, "epochs", None) for h in self.history.values())

    def test_images(self, limit: int = 0) -> int:
        """How many images ``test_batches(limit)`` yields (the run's ``--samples`` budget applied)."""
        available = dataset_size(self.test_loader.dataset)
        n = min(limit, available) if limit else available
        return min(n, self.samples) if self.samples else n

    def train_images(self, limit: int = 0) -> int:
        """How many images ``train_batches(limit)`` yields (the run's ``--samples`` budget applied)."""
        available = dataset_size(self.train_loader.dataset)
        n = min(limit, available) if limit else available
        return min(n, self.samples) if self.samples else n

    def multiply_adds(self, role: str = "model") -> int:
        """Multiply-adds of one image through a network (:func:`resinspect.cost.multiply_adds`, on this run's
        image size; counted once per network)."""
        if role not in self._macs_cache:
            from .cost import multiply_adds

            network = self.model if role == "model" else self.twin
            if network is None:
                raise ResinspectError(f"no network '{role}' in this run")
            x, _ = next(_limited(self.test_loader, 1, self.device))
            self._macs_cache[role] = multiply_adds(network, x)
        return self._macs_cache[role]

    def compute_plan(self, images: int, role: str = "model") -> Any:
        """A :class:`~resinspect.cost.ComputePlan` for passes over ``images`` images of a network, against the
        run's ``--compute`` budget: what an analysis uses to cut its faster-than-linear parts to fit."""
        from .cost import ComputePlan

        return ComputePlan(float(self.multiply_adds(role)) * images, float(self.compute), unit=self.task.sample)

    def _budget(self, which: str, limit: int, available: int) -> int:
        """``limit`` capped by the run's ``samples`` budget; a cap that bites is recorded for the report."""
        asked = min(limit, available) if limit else available
        if not self.samples or asked <= self.samples:
            return limit
        key = self.plugin or ""
        _, worst, _ = self.subsampled.get(key, {}).get(which, (0, 0, 0))
        self.subsampled.setdefault(key, {})[which] = (self.samples, max(worst, asked), available)
        return self.samples

    def train_batches(self, limit: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` training batches on the device, for analyses that need training data (BatchNorm
        re-estimation, the loss landscape, curvature).

        ``limit`` counts *images*, as for :meth:`test_batches` (``0``: the whole training set; the last batch
        is cut to fit). Every call in a run yields the same images in the same order: a permutation of the
        training set seeded with the run's seed, the same on every rank under torchrun and independent of the
        shuffling training used. Batches have the training batch size; resinspect's datasets apply no
        augmentation, so these are the images training saw, as they were. The run's ``--samples`` budget caps
        ``limit`` as for :meth:`test_batches`.
        """
        dataset = self.train_loader.dataset
        order = torch.randperm(dataset_size(dataset), generator=torch.Generator().manual_seed(self.seed))
        limit = self._budget("training", limit, len(order))
        if limit:
            order = order[:limit]
        batch = self.train_loader.batch_size or getattr(self.train_loader.batch_sampler, "batch_size", None) or 64
        loader = DataLoader(
            dataset, batch_size=batch, sampler=order.tolist(), num_workers=self.train_loader.num_workers
        )
        return _limited(loader, limit, self.device)

    # -- many processes (torchrun) -------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """True in rank 0, the process that writes the run directory (always True in one process)."""
        return self.dist.is_main

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        """How many processes run this analysis (1 without torchrun)."""
        return self.dist.world_size

    def shard(self, batches: Iterable[T], whole: bool = False) -> Iterator[T]:
        """This process's share of a stream of batches (``ctx.shard(ctx.test_batches(n))``): its part of every
        batch (``whole=True``: every ``world_size``-th whole batch, for per-batch statistics). Combine the
        sums with :meth:`all_reduce`. One process: the batches as they are."""
        return self.dist.shard(batches, whole)

    def split(self, items: Sequence[T], cost: Any = None) -> list[T]:
        """This process's share of a list of independent units of work (``cost``: a function of an item that
        balances the processes' totals); gather the results with :meth:`all_gather`. One process: all."""
        return self.dist.split(items, cost)

    def all_reduce(self, value: Any, op: str = "sum") -> Any:
        """``value`` summed (``op="max"``/``"min"``: maximum/minimum) over the processes, on every process:
        a number, a tensor, or dicts/lists/dataclasses/objects holding them. One process: ``value``."""
        return self.dist.all_reduce(value, op)

    def all_gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` in rank order (``[value]`` in one process)."""
        return self.dist.all_gather(value)

    # -- output --------------------------------------------------------------------------------
    def _tag(self, name: str) -> str:
        return f"{self.plugin}/{name}" if self.plugin else name

    def log_scalar(self, name: str, value: float, step: int = 0, *, role: str = "model") -> None:
        """Write a scalar to TensorBoard as ``<plugin>/<name>`` in ``role``'s run (``tb/model``, ``tb/twin``),
        so the same tag of the two networks overlays. Does nothing when the run has no TensorBoard log."""
        self.tensorboard.scalar(self._tag(name), value, step, role=role)

    def log_scalars(self, values: dict[str, float], step: int = 0, *, role: str = "model") -> None:
        """Several scalars of one step at once (``{name: value}``, each tag ``<plugin>/<name>``), written as
        one event: much cheaper than one :meth:`log_scalar` per layer."""
        self.tensorboard.scalars({self._tag(k): v for k, v in values.items()}, step, role=role)

    def log_histogram(
        self, name: str, values: torch.Tensor, step: int = 0, *, role: str = "model", bins: int = 64
    ) -> None:
        """Write a histogram (computed by torch on the device) as ``<plugin>/<name>`` in ``role``'s run."""
        self.tensorboard.histogram(self._tag(name), values, step, role=role, bins=bins)

    def progress(self, iterable: Iterable[T], desc: str = "", total: int | None = None) -> Iterable[T]:
        """``iterable`` with a progress bar on stderr (tqdm) when the run shows progress (not with
        ``--quiet``, nor when stderr is not a terminal); never in the report."""
        if not self.show_progress:
            return iterable
        from tqdm.auto import tqdm

        label = f"{self.plugin}: {desc}" if self.plugin and desc else (desc or self.plugin or "")
        return tqdm(iterable, desc=label, total=total, leave=False, file=sys.stderr, dynamic_ncols=True)
