"""The network's head: what turns the residual stream into logits.

``find_head(model, layer)`` traces ``model`` with every module that does not
contain ``layer`` kept opaque, finds the call of ``layer`` (the module whose
residual addition comes last), and returns everything the forward computes
from that call's output onwards as a :class:`torch.fx.GraphModule` — provided
nothing else flows into it (the head must read the stream alone). For
torchvision's CNNs this is avgpool + flatten + fc (or ``classifier``), for a
ViT the final LayerNorm, the class token and ``heads``, for Swin and ConvNeXt
norm + pool + head; a user model is read by the same rule, with nothing to
register. The head shares the model's modules and parameters, so
``head(stream)`` equals the model's logits for the last stream exactly and
reads any other stream of the same shape the same way (the logit lens).
"""

from __future__ import annotations

from torch import fx, nn

from .anatomy import _cut_ranges, _piece_graph

__all__ = ["NoHead", "find_head"]


class NoHead(ValueError):
    """The model's readout could not be separated from the rest of its forward."""


class _UpTo(fx.Tracer):
    """Trace into the modules that contain ``layer`` only; every other module (``layer`` itself included)
    stays one call."""

    def __init__(self, layer: str):
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        name = module_qualified_name
        return not (name == "" or self.layer.startswith(name + ".")) or name == self.layer


def find_head(model: nn.Module, layer: str) -> nn.Module:
    """The head of ``model`` after its module ``layer`` (see the module docstring); raises :class:`NoHead`
    naming the reason when tracing fails, ``layer`` is not called, or the head reads more than the stream.

    A model whose forward cannot be traced may name its head itself: a ``resinspect_head()`` method returning
    the module that maps the last stream to the logits (resinspect's Hugging Face wrapper does)."""
    hook = getattr(model, "resinspect_head", None)
    if callable(hook):
        head = hook()
        if not isinstance(head, nn.Module):
            raise NoHead(f"{type(model).__name__}.resinspect_head() returned {type(head).__name__}, not a module")
        return head
    try:
        model.get_submodule(layer)
    except AttributeError as e:
        raise NoHead(f"{type(model).__name__} has no module '{layer}'") from e
    try:
        graph = _UpTo(layer).trace(model)
    except Exception as e:  # noqa: BLE001 - torch.fx's errors have no common type: report the first line
        first = (str(e).strip().splitlines() or [""])[0]
        raise NoHead(f"torch.fx could not trace {type(model).__name__}'s forward: {type(e).__name__}: {first}") from e
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if not calls:
        raise NoHead(f"{type(model).__name__}'s forward never calls '{layer}'")
    last = calls[-1]
    ranges = _cut_ranges(graph)
    if ranges is None:
        raise NoHead(f"{type(model).__name__}'s forward does not return one tensor")
    starts = [start for start, _, _ in ranges]
    if last not in starts:
        raise NoHead(
            f"what {type(model).__name__} computes after '{layer}' also reads other values than its output, "
            "so no head reads the stream alone"
        )
    i = starts.index(last)
    inner = [n for _, _, nodes in ranges[i:] for n in nodes]
    end = ranges[-1][1]
    head = fx.GraphModule(model, _piece_graph(graph, last, end, inner), class_name="Head")
    head.train(model.training)
    return head
