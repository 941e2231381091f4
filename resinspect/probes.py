"""Probes: the instrumentation every analysis shares, so that no plugin registers a hook of its own.

- :func:`capture` / :func:`capture_batches`: the inputs and outputs of chosen modules over a stream of
  batches (hooks removed in ``finally``, also on error);
- :func:`on_forward`: call a function on each forward of chosen modules (the primitive behind capture);
- :func:`block_vjp` and :class:`BlockLinearization`: per-block vector–Jacobian products of the branch and of
  the shortcut separately, at the point of a forward pass;
- :func:`gradient_split`: during training, the gradient each block passes back through its skip and through
  its branch, reported to a callback;
- :func:`eval_mode`, the switches :func:`bypass` / :func:`drop_skip` / :func:`forwards_replaced`, and type
  checks (:func:`is_batchnorm`, :func:`is_conv`, :func:`is_linear`) that need no private torch classes;
- :func:`hooks_left` / :func:`assert_clean`: what a test checks after an analysis.

Every context manager here restores the model exactly when it exits, whether the body finished or raised.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeGuard, cast

import torch
from torch import nn

from .anatomy import ResidualBlock, bypass, drop_skip, forwards_replaced

__all__ = [
    "eval_mode",
    "on_forward",
    "capture",
    "Captured",
    "capture_batches",
    "block_vjp",
    "BlockLinearization",
    "gradient_split",
    "GRADIENT_PARTS",
    "is_batchnorm",
    "is_conv",
    "is_linear",
    "linear_weight",
    "hooks_left",
    "assert_clean",
    "bypass",
    "drop_skip",
    "forwards_replaced",
]

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# what gradient_split reports per block: the gradient at the block's output, the skip's and the branch's
# contributions to the input gradient, and the input gradient itself
GRADIENT_PARTS = ("out", "skip", "branch", "total")


def is_batchnorm(module: nn.Module) -> TypeGuard[nn.modules.batchnorm._BatchNorm]:
    """A BatchNorm layer of any dimension (including SyncBatchNorm)."""
    return isinstance(module, _BATCHNORMS)


def is_conv(module: nn.Module) -> bool:
    """A convolution (or transposed convolution) of any dimension."""
    return isinstance(module, _CONVS)


def is_linear(module: nn.Module) -> bool:
    """A fully connected layer: ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2's attention and MLP
    matrices: ``x @ weight + bias`` with ``weight`` stored ``(in, out)``, see :func:`linear_weight`)."""
    return isinstance(module, nn.Linear) or _is_transposed_linear(module)


def _is_transposed_linear(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "nf", None), int)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.shape[1] == module.nf
    )


def linear_weight(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The weight of a layer :func:`is_linear` or :func:`is_conv` accepts (or ``weight``, a saved value of it),
    laid out ``(out, in, ...)`` as PyTorch's own layers store it: a transformers ``Conv1D``'s transposed."""
    w = module.weight if weight is None else weight
    assert isinstance(w, torch.Tensor)
    return w.t() if _is_transposed_linear(module) else w


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode; on exit give every submodule back exactly the mode it had.

    In ``resinspect_epoch_end`` the network is in *train* mode: a forward pass there updates BatchNorm's
    running statistics unless it runs inside ``eval_mode``.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _named(
    modules: Mapping[str, nn.Module] | Iterable[tuple[str, nn.Module]] | Iterable[ResidualBlock],
) -> list[tuple[str, nn.Module]]:
    if isinstance(modules, Mapping):
        return list(modules.items())
    out: list[tuple[str, nn.Module]] = []
    for item in modules:
        if isinstance(item, ResidualBlock):
            out.append((item.name, item.module))
        else:
            name, module = item
            out.append((name, module))
    return out


@contextmanager
def on_forward(
    modules: Mapping[str, nn.Module] | Iterable[tuple[str, nn.Module]] | Iterable[ResidualBlock],
    fn: Callable[..., Any],
    *,
    before: bool = False,
) -> Iterator[None]:
    """Call ``fn(name, module, inputs, output)`` after each forward of each module (``before=True``:
    ``fn(name, module, inputs)`` before it runs, while an in-place op has not yet overwritten the input).

    ``fn`` must return None (it observes; it never changes what the module computes). Every hook is
    removed on exit, also when the body raises.
    """
    handles = []
    try:
        for name, module in _named(modules):
            if before:
                handles.append(module.register_forward_pre_hook(lambda m, inputs, n=name: _observe(fn(n, m, inputs))))
            else:
                handles.append(
                    module.register_forward_hook(lambda m, inputs, output, n=name: _observe(fn(n, m, inputs, output)))
                )
        yield
    finally:
        for h in handles:
            h.remove()


def _observe(result: Any) -> None:
    if result is not None:
        raise TypeError("a probe function must return None; it observes and never replaces a module's output")


@dataclass
class Captured:
    """What :func:`capture` caught: ``inputs[name]`` (the first positional input) and ``outputs[name]``
    of the latest forward call of each module, or of every call (``calls[name]``, a list of
    ``(input, output)``) with ``every_call=True``. Cleared with :meth:`clear` (``capture_batches`` clears
    it before each batch)."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    calls: dict[str, list[tuple[torch.Tensor, Any]]] = field(default_factory=dict)

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()
        self.calls.clear()


@contextmanager
def capture(
    modules: Mapping[str, nn.Module] | Iterable[tuple[str, nn.Module]] | Iterable[ResidualBlock],
    *,
    inputs: bool = True,
    outputs: bool = True,
    detach: bool = True,
    first_only: bool = False,
    every_call: bool = False,
) -> Iterator[Captured]:
    """Context manager: catch the inputs and/or outputs of ``modules`` on every forward pass.

    Args:
        modules: ``{name: module}``, ``[(name, module)]`` or residual blocks (keyed by block name).
        inputs, outputs: what to keep. Inputs are taken *before* the module runs (cloned when
            ``detach``, so an in-place ReLU cannot overwrite them).
        detach: keep detached tensors (the default); ``False`` keeps them in the autograd graph.
        first_only: keep only the first call of each module until :meth:`Captured.clear`.
        every_call: also list every call's ``(input, output)`` in ``captured.calls``.

    Yields the :class:`Captured` store; all hooks are gone after the ``with`` block.
    """
    store = Captured()
    named = _named(modules)
    pending: dict[str, torch.Tensor | None] = {}

    def keep(t: Any) -> Any:
        return t.detach().clone() if detach and isinstance(t, torch.Tensor) else t

    def pre(name: str, module: nn.Module, args: tuple) -> None:
        if first_only and (name in store.outputs or name in store.inputs):
            return
        if args and isinstance(args[0], torch.Tensor):
            pending[name] = keep(args[0]) if inputs else None

    def post(name: str, module: nn.Module, args: tuple, output: Any) -> None:
        if first_only and (name in store.outputs or name in store.inputs):
            pending.pop(name, None)
            return
        # (None only for a module whose first argument is not a tensor: not a layer anyone captures)
        x = cast(torch.Tensor, pending.pop(name, None))
        y = (output.detach() if detach and isinstance(output, torch.Tensor) else output) if outputs else None
        if inputs:
            store.inputs[name] = x
        if outputs:
            store.outputs[name] = y
        if every_call:
            store.calls.setdefault(name, []).append((x, y))

    with on_forward(named, pre, before=True), on_forward(named, post):
        yield store


def capture_batches(
    model: nn.Module,
    modules: Any,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    grad: bool = False,
    **kwargs: Any,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, Captured]]:
    """Run ``batches`` through ``model`` (in eval mode) with :func:`capture` on ``modules``.

    Yields ``(x, y, logits, captured)`` per batch; ``captured`` holds that batch's values (it is cleared
    before each batch). Keyword arguments go to :func:`capture`. Hooks and train/eval modes are restored
    when the generator finishes or is closed.
    """
    with eval_mode(model), capture(modules, **kwargs) as store:
        for x, y in batches:
            store.clear()
            with torch.set_grad_enabled(grad):
                logits = model(x)
            yield x, y, logits, store


class BlockLinearization:
    """One residual block linearised at input ``x``: ``y = post(S(x) + F(x))``.

    :meth:`vjp` maps a cotangent ``u`` at the block's output (shape of ``y``) to the two contributions to
    the input gradient, ``(J_Sᵀ u, J_Fᵀ u)`` — through the shortcut and through the branch — whose sum is
    the ordinary input gradient ``J_yᵀ u``. The forward pass is done once; any number of cotangents may be
    pulled back through it (the graph is kept until the object is dropped). The block is run in whatever
    train/eval mode it is in: use :func:`eval_mode` around it for a network in training.
    """

    def __init__(self, block: ResidualBlock, x: torch.Tensor):
        x = x.detach()
        self.x_branch = x.clone().requires_grad_(True)
        self.x_skip = x.clone().requires_grad_(True)
        with torch.enable_grad():
            self.output = block.variant("split")(self.x_branch, self.x_skip)

    def vjp(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(shortcut part, branch part)`` of the input gradient for output cotangent ``u``."""
        skip, branch = torch.autograd.grad(
            self.output, (self.x_skip, self.x_branch), u, retain_graph=True, allow_unused=True
        )
        return (
            torch.zeros_like(self.x_skip) if skip is None else skip,
            torch.zeros_like(self.x_branch) if branch is None else branch,
        )


def block_vjp(block: ResidualBlock, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(J_Sᵀ u, J_Fᵀ u)`` of ``block`` at input ``x``: the shortcut's and the branch's parts of the
    input gradient for the output cotangent ``u``. See :class:`BlockLinearization` to pull back several."""
    return BlockLinearization(block, x).vjp(u)


@contextmanager
def gradient_split(
    blocks: Sequence[ResidualBlock],
    report: Callable[[int, str, torch.Tensor], None],
    enabled: Callable[[], bool] = lambda: True,
) -> Iterator[None]:
    """While active, each forward of each block (with gradients on and ``enabled()`` true) arranges that
    the backward pass calls ``report(block_index, part, gradient)`` for every part in
    :data:`GRADIENT_PARTS`: the gradient at the block's output, its skip and branch contributions to the
    input gradient, and the input gradient.

    The block computes exactly what it did (the same submodules, one graph), only with the two paths reading
    separate views of ``x``, so autograd keeps their contributions apart. Forwards are restored on exit.
    """

    def tapped(j: int, block: ResidualBlock) -> Callable[[torch.Tensor], torch.Tensor]:
        original = block.module.__dict__.get("forward") or types.MethodType(type(block.module).forward, block.module)
        split = block.variant("split")

        def hook(part: str):
            return lambda g: report(j, part, g)

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not (torch.is_grad_enabled() and x.requires_grad and enabled()):
                return original(x)
            x_branch, x_skip = x.view_as(x), x.view_as(x)
            y = split(x_branch, x_skip)
            x_branch.register_hook(hook("branch"))
            x_skip.register_hook(hook("skip"))
            x.register_hook(hook("total"))
            y.register_hook(hook("out"))
            return y

        return forward

    with forwards_replaced((b.module, tapped(j, b)) for j, b in enumerate(blocks)):
        yield


def hooks_left(model: nn.Module) -> list[str]:
    """Modules of ``model`` that still carry a forward/backward hook or a patched ``forward``
    (``"name: kind"`` strings; empty after any well-behaved analysis)."""
    from .anatomy import is_chained, site_modules

    found = []
    pieces = [(f"{type(p).__name__} (a residual site)", p) for p in site_modules(model)]
    for name, m in [*model.named_modules(), *pieces]:
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            if getattr(m, kind, None):
                found.append(f"{name or '<root>'}: {kind.strip('_')}")
        if m.__dict__.get("forward") is not None and not is_chained(m):
            found.append(f"{name or '<root>'}: patched forward")
    return found


def assert_clean(*models: nn.Module) -> None:
    """Raise ``AssertionError`` naming what is left if any hook or patched forward remains."""
    left = [x for m in models if m is not None for x in hooks_left(m)]
    if left:
        raise AssertionError(f"left on the model after the analysis: {', '.join(left[:8])}")
