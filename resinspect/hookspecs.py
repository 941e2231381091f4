"""The plugin contract: every hook resinspect calls, when, with what, and what it returns.

Hooks are called with keyword arguments only; a plugin implements any subset,
naming only the arguments it needs. Each plugin's implementations are called
in isolation: if one raises, that plugin is marked failed and the others go on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .context import RunContext
    from .data import DatasetRegistry
    from .models import ModelRegistry
    from .options import OptionGroup
    from .section import Section
    from .training import EpochInfo, StepInfo, Trainee

hookspec = pluggy.HookspecMarker("resinspect")
hookimpl = pluggy.HookimplMarker("resinspect")


@hookspec
def resinspect_addoptions(options: OptionGroup) -> None:
    """Declare the plugin's options with ``options.add(name, type, default, help)``.

    Called once per installed plugin before any work starts; ``options`` is the
    plugin's own group, so ``options.add("samples", int, 100, "…")`` becomes
    ``-o <plugin>.samples=…`` on the command line and ``[<plugin>] samples = …``
    in a config file. Returns nothing.
    """


@hookspec
def resinspect_register_models(registry: ModelRegistry) -> None:
    """Add models to ``--model``: ``registry.add(name, factory, description)``.

    Called once per installed plugin (whether or not it is selected with ``--plugins``) before a run builds
    its model, and by ``resinspect models``. ``factory`` is called with ``in_channels``, ``num_classes`` and
    ``image_size`` when it accepts them. Returns nothing.
    """


@hookspec
def resinspect_register_datasets(registry: DatasetRegistry) -> None:
    """Add datasets to ``--data``: ``registry.add(name, loader, description)``.

    Called like :func:`resinspect_register_models`. ``loader(**dataset_args)`` returns a
    :class:`resinspect.DataBundle`. Returns nothing.
    """


@hookspec
def resinspect_configure(ctx: RunContext) -> None:
    """Called once, after the model, twin and data exist and before training.

    Read your options with ``ctx.options()``; keep state in ``ctx.stash``. Returns nothing.
    """


@hookspec
def resinspect_train_start(ctx: RunContext, trainee: Trainee) -> None:
    """Called before the first step of training ``trainee.model`` (``trainee.role`` is
    ``"model"`` or ``"twin"``): the place to attach hooks to that model. Returns nothing.
    """


@hookspec
def resinspect_after_backward(ctx: RunContext, step: StepInfo) -> None:
    """Called after ``loss.backward()`` and before ``optimizer.step()`` on every training step.

    Gradients are in ``p.grad``; parameters still hold the values that produced
    them. ``step.loss`` is a detached device tensor. Keep this cheap: avoid
    per-parameter ``.item()`` (a device sync). Returns nothing.
    """


@hookspec
def resinspect_epoch_end(ctx: RunContext, epoch: EpochInfo) -> None:
    """Called after each training epoch's test evaluation, with ``epoch.metrics``
    (train/test loss and accuracy, learning rate). The network is in *train* mode here: a forward pass
    updates BatchNorm's running statistics unless it runs inside ``resinspect.eval_mode(model)`` (or a probe
    such as ``resinspect.capture_batches``, which uses it). Returns nothing.
    """


@hookspec
def resinspect_train_end(ctx: RunContext, trainee: Trainee) -> None:
    """Called after the last epoch of ``trainee.model``: detach any hooks you attached. Returns nothing."""


@hookspec
def resinspect_estimate(ctx: RunContext) -> float | None:
    """Called before the analysis phase: what ``resinspect_analyze`` will cost, in the model's multiply-adds
    (``ctx.multiply_adds()`` per image per forward pass; a backward pass counts as two forwards; work on the
    twin counts as the same work on the model), with the options, budgets and caps it will use. The run turns
    it into seconds with a timed probe pass and prints it; the report shows it beside the measured seconds.
    Return None (or do not implement it) when you cannot say."""


@hookspec
def resinspect_analyze(ctx: RunContext) -> Section | list[Section] | None:
    """Called once after training (or after loading a checkpoint) to run the analysis.

    ``ctx.model`` (and ``ctx.twin`` if trained) are in eval mode; restore
    anything you change (use ``try/finally``). Return a :class:`Section`, a list
    of them, or None for no section.
    """


@hookspec
def resinspect_unconfigure(ctx: RunContext) -> None:
    """Called once at the end of the run, also after a failure: release resources,
    remove hooks. Returns nothing.
    """
