"""Residual anatomy: find the residual blocks of any model, and switch them.

A *residual block* is a module whose forward adds its own input (or a single
shortcut module applied to its input) to a branch computed from that input:
``y = post(F(x) + S(x))`` with ``S`` the identity or a projection, ``post``
whatever follows the addition (a ReLU, or nothing). Blocks are found by
tracing each module's forward with :mod:`torch.fx`, treating its children as
opaque, and looking for that addition — so the built-in CIFAR blocks,
torchvision's ``BasicBlock``/``Bottleneck`` and a user's
``return x + self.f(x)`` are all found the same way, with nothing to register.

The switches :func:`bypass` (``y = post(S(x))``, the branch is not computed)
and :func:`drop_skip` (``y = post(F(x))``) temporarily replace a block's
``forward`` with a rewritten graph that calls the very same submodules, and
restore the original on exit, also after an exception.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn

__all__ = [
    "ResidualBlock",
    "Blocks",
    "residual_blocks",
    "bypass",
    "drop_skip",
    "NoResidualBlocks",
    "require_blocks",
    "forwards_replaced",
    "replace_forward",
    "restore_forwards",
    "no_blocks_reason",
    "untraced_note",
    "site_modules",
    "replace_block_module",
    "block_module",
    "install_sites_for_call",
]

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_MISSING = object()
# exact types (a subclass may override forward): their forward never adds anything
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class NoResidualBlocks(ValueError):
    """Raised by analyses that need residual blocks when the model has none."""


class _ChildrenAsLeaves(fx.Tracer):
    """Trace only the root's own forward: every submodule call stays one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


class ResidualBlock:
    """One residual block: ``y = post(branch(x) + shortcut(x))``.

    Attributes:
        name: qualified module name, e.g. ``"layer2.0"``; for one of several residual sites of a module,
            the module's name and the site's kind, e.g. ``"encoder.layers.encoder_layer_0.attention"``.
        module: the block module itself; for a site, the piece of its module's forward that holds the
            addition (a :class:`torch.fx.GraphModule` sharing the module's children, called by its forward).
        layer: the name of the module the block or site belongs to (its ``name`` for a whole-module block).
        kind: what the branch computes: ``attention``, ``mlp``, ``conv``, or the name of its first module.
        index: position among the model's blocks, in forward order (0-based).
        stage: 1-based stage number (blocks that share a parent container).
        stage_name: the parent container's name (``""`` for the root).
        downsamples: whether the block reduces spatial resolution.
        shortcut_kind: ``"identity"`` or ``"projection"``.
        shortcut_module: name of the projection child, or None.
    """

    def __init__(
        self,
        name: str,
        module: nn.Module,
        graph: fx.Graph,
        add: fx.Node,
        branch_node: fx.Node,
        shortcut_node: fx.Node,
        shortcut_kind: str,
        layer: str | None = None,
    ):
        self.name = name
        self.module = module
        self.layer = name if layer is None else layer
        self.index = -1
        self.stage = 0
        self.stage_name = self.layer.rpartition(".")[0]
        self.shortcut_kind = shortcut_kind
        self.shortcut_module = shortcut_node.target if shortcut_node.op == "call_module" else None
        self._graph, self._add, self._branch, self._shortcut = graph, add, branch_node, shortcut_node
        self._variants: dict[str, Callable[..., torch.Tensor]] = {}
        self.kind = _branch_kind(module, self.branch_modules)
        self.downsamples = any(
            (isinstance(m, nn.modules.conv._ConvNd) and max(m.stride) > 1)
            or isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))
            for m in module.modules()
        )

    def __repr__(self) -> str:
        return (
            f"ResidualBlock({self.name!r}, kind={self.kind}, stage={self.stage}, downsamples={self.downsamples}, "
            f"shortcut={self.shortcut_kind})"
        )

    @property
    def branch_modules(self) -> list[str]:
        """Names of the child modules on the branch, in order (e.g. conv1, bn1, ...)."""
        return [str(n.target) for n in _ancestors(self._branch) if n.op == "call_module"]

    def parameters_count(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def variant(self, mode: str) -> Callable[..., torch.Tensor]:
        """The block's forward rewritten: ``bypass``, ``drop_skip``, ``branch`` (F(x)), ``shortcut`` (S(x)),
        or ``split`` (``forward(x_branch, x_skip)``: the same output, with the two paths reading separate inputs
        so that autograd keeps their gradient contributions to x apart).

        The result is the rewritten code bound to this block's module (it calls the very same submodules);
        the code is compiled once per distinct graph and shared by every block that has it, so asking for a
        variant of each of a deep network's blocks is cheap. :meth:`graph_module` gives it as a module."""
        if mode not in self._variants:
            self._variants[mode] = _bind(_rewrite(self, mode), self.module)
        return self._variants[mode]

    def graph_module(self, mode: str) -> fx.GraphModule:
        """The variant ``mode`` as a :class:`torch.fx.GraphModule` that holds the submodules it uses (for
        replacing the block in its parent, as the plain twin does)."""
        return fx.GraphModule(self.module, _rewrite(self, mode), class_name=f"{type(self.module).__name__}_{mode}")

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """F(x): the branch's output just before the addition."""
        return self.variant("branch")(x)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """S(x): what the skip path adds (x itself for an identity shortcut)."""
        return self.variant("shortcut")(x)


def _ancestors(node: fx.Node) -> list[fx.Node]:
    seen: dict[fx.Node, None] = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen[n] = None
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS
    )


class _Untraceable(Exception):
    """torch.fx could not trace a module's forward (data-dependent control flow, ...)."""


def _trace(module: nn.Module) -> fx.Graph:
    """The module's own forward as a graph, its optional arguments (``attn_mask=None``, ``is_causal=False`` in
    timm's blocks) fixed at their defaults, so the graph has one input."""
    defaults = _forward_defaults(module)
    try:
        graph = _ChildrenAsLeaves().trace(module, concrete_args=defaults or None)
    except Exception as e:  # noqa: BLE001 - untraceable forward (data-dependent control flow): not a block we can switch
        first = (str(e).strip().splitlines() or [""])[0]
        raise _Untraceable(f"{type(e).__name__}: {first}" if first else type(e).__name__) from e
    if defaults:
        _drop_default_guards(graph)
    return graph


def _forward_defaults(module: nn.Module) -> dict[str, Any]:
    """The forward's arguments after the first that have defaults, with them."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params[1:] if p.kind in kinds and p.default is not inspect.Parameter.empty}


def _drop_default_guards(graph: fx.Graph) -> None:
    """Remove the inputs fx keeps for arguments fixed at their defaults, with the checks it adds on them (the
    traced code already uses the constants); kept when anything else reads them."""
    for p in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        doomed: list[fx.Node] = []
        stack = [p]
        while stack:
            n = stack.pop()
            if n not in doomed:
                doomed.append(n)
                stack += list(n.users)
        if any(n.op not in ("placeholder", "call_function") for n in doomed):
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        for n in sorted(doomed, key=order.__getitem__, reverse=True):
            graph.erase_node(n)


def _residual_adds(module: nn.Module, graph: fx.Graph) -> list[tuple[fx.Graph, fx.Node, fx.Node, fx.Node, str]]:
    """Every addition in ``graph`` of the graph's input (or a single module applied to it) to a branch
    computed from it through at least one module."""
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return []
    x = inputs[0]
    found = []
    for node in graph.nodes:
        if not _is_add(node) or len(node.args) < 2:
            continue
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        kinds = [_shortcut_kind(module, n, x) for n in (a, b)]
        if kinds == ["identity", "identity"]:
            continue
        if x in (a, b):
            s = x
        elif "identity" in kinds:
            s = (a, b)[kinds.index("identity")]
        elif kinds == ["projection", "projection"]:
            # x-only modules on both sides: the lighter one is the shortcut
            s = min((a, b), key=lambda n: sum(p.numel() for p in module.get_submodule(str(n.target)).parameters()))
        elif "projection" in kinds:
            s = (a, b)[kinds.index("projection")]
        else:
            continue
        f = b if s is a else a
        if x not in _ancestors(f) or not any(n.op == "call_module" for n in _ancestors(f)):
            continue
        found.append((graph, node, f, s, _shortcut_kind(module, s, x) or "identity"))
    return found


# ---------------------------------------------------------------------------------------------------------------
# residual sites: a module whose forward adds several branches to its stream, one after the other (a transformer
# layer: attention, then MLP) is cut into a chain of pieces, each a GraphModule with at most one addition


def _live_nodes(graph: fx.Graph) -> set[fx.Node]:
    out = next(n for n in graph.nodes if n.op == "output")
    roots = [out] + [n for n in graph.nodes if n.op in ("call_function", "call_method") and n.is_impure()]
    live: set[fx.Node] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        if n not in live:
            live.add(n)
            stack.extend(n.all_input_nodes)
    return live


def _cut_ranges(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node, list[fx.Node]]] | None:
    """The graph cut at every node all later computation flows through: ``[(start, end, nodes)]`` with ``nodes``
    the live nodes after ``start`` up to ``end`` (parameters read with get_attr belong to every range that
    uses them). None when the graph's output is not a single tensor node."""
    nodes = list(graph.nodes)
    out = nodes[-1]
    if out.op != "output" or not isinstance(out.args[0], fx.Node):
        return None
    live = _live_nodes(graph)
    pos = {n: i for i, n in enumerate(nodes)}
    free = {n for n in nodes if n.op == "get_attr"}
    cuts, reach = [], -1
    for n in nodes[:-1]:
        if n not in live or n in free:
            continue
        if reach <= pos[n]:
            cuts.append(n)
        users = [pos[u] for u in n.users if u in live and u.op != "output"]
        reach = max([reach, pos[n], *users])
    end = out.args[0]
    if end not in cuts:
        return None
    cuts = cuts[: cuts.index(end) + 1]
    ranges = []
    for start, stop in zip(cuts, cuts[1:]):
        inner = [n for n in nodes[pos[start] + 1 : pos[stop] + 1] if n in live and n not in free]
        ranges.append((start, stop, inner))
    return ranges


def _piece_graph(graph: fx.Graph, start: fx.Node, end: fx.Node, inner: list[fx.Node]) -> fx.Graph:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {start: g.placeholder(str(start.name))}

    def arg(n: fx.Node) -> fx.Node:
        if n not in env:
            if n.op != "get_attr":
                raise KeyError(n)
            env[n] = g.node_copy(n, arg)
        return env[n]

    for n in inner:
        env[n] = g.node_copy(n, arg)
    g.output(env[end])
    return g


def _pieces(module: nn.Module, graph: fx.Graph, min_sites: int = 2) -> list[tuple[bool, fx.Graph]] | None:
    """``module``'s forward as a chain of pieces ``[(is_site, graph)]`` when it holds ``min_sites`` or more
    residual additions one after the other (each piece's input is the previous one's output), else None."""
    ranges = _cut_ranges(graph)
    if ranges is None:
        return None
    groups: list[list] = []  # [is_site, start, end, nodes]
    for start, end, inner in ranges:
        try:
            piece = _piece_graph(graph, start, end, inner)
        except KeyError:
            return None
        adds = _residual_adds(module, piece)
        if len(adds) > 1:
            return None
        if adds:
            groups.append([True, start, end, list(inner)])
        elif groups:  # what follows an addition is its post (a ReLU, a norm); plain steps join each other
            groups[-1][2], groups[-1][3] = end, groups[-1][3] + list(inner)
        else:
            groups.append([False, start, end, list(inner)])
    if sum(1 for g in groups if g[0]) < min_sites:
        return None
    return [(site, _piece_graph(graph, start, end, inner)) for site, start, end, inner in groups]


def _chained_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The forward of a module cut into residual sites: its pieces, one after the other (the same operations in
    the same order as the module's own forward). Optional arguments are accepted at the defaults the pieces
    were traced with."""
    if args or kwargs:
        _check_defaults(self, args, kwargs)
    return _run_pieces(self, x)


def _run_pieces(module: nn.Module, x: torch.Tensor, side: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """``module``'s pieces one after the other on ``x``, each first given the call's ``side`` tensors (see
    :func:`install_sites_for_call`)."""
    for piece in module.__dict__["_resinspect_pieces"]:
        for i, t in enumerate(side):
            piece.__dict__[_SIDE.format(i)] = t
        piece.training = module.training  # the pieces are not submodules: model.train()/eval() do not reach them
        x = piece(x)
    return x


def _check_defaults(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    defaults = module.__dict__.get("_resinspect_defaults") or {}
    given = dict(zip(defaults, args), **kwargs)
    changed = [k for k, v in given.items() if k not in defaults or not _same_default(v, defaults[k])]
    if changed:
        fixed = ", ".join(f"{k}={v!r}" for k, v in defaults.items())
        raise RuntimeError(
            f"{type(module).__name__} was cut into residual sites with {fixed}; "
            f"it was called with other values of {', '.join(changed)}, which its sites cannot follow"
        )


def _same_default(value: Any, default: Any) -> bool:
    return value is default or (not isinstance(value, torch.Tensor) and value == default)


# ---------------------------------------------------------------------------------------------------------------
# modules called with more than the stream (a Hugging Face decoder layer: an attention mask, position ids, rotary
# embeddings): traced for one recorded call, the call's tensors read by the pieces as attributes set per call

_SIDE = "_resinspect_side_{}"
# set on a module whose own forward is known to add nothing to a stream (a Hugging Face model's top levels,
# which torch.fx cannot trace): residual_blocks neither traces it nor lists it as untraced
_EXAMINED = "_resinspect_examined"


class _NotCalledYet:
    """What a piece's side input holds before the first call (not None: torch.fx takes None for missing)."""

    def __repr__(self) -> str:
        return "<side input of a call not made yet>"


_NOT_CALLED_YET = _NotCalledYet()


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where a tensor of a call sits in its arguments."""

    index: int


def _split_call(value: Any, tensors: list[torch.Tensor]) -> Any:
    """``value`` with each tensor (also inside tuples, lists and dicts) replaced by a :class:`_Slot`; the
    tensors are appended to ``tensors``."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return _Slot(len(tensors) - 1)
    if isinstance(value, (tuple, list)):
        return type(value)(_split_call(v, tensors) for v in value)
    if isinstance(value, dict):
        return {k: _split_call(v, tensors) for k, v in value.items()}
    return value


def _fill(template: Any, values: Sequence[Any]) -> Any:
    if isinstance(template, _Slot):
        return values[template.index]
    if isinstance(template, (tuple, list)):
        return type(template)(_fill(v, values) for v in template)
    if isinstance(template, dict):
        return {k: _fill(v, values) for k, v in template.items()}
    return template


def _same_call(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list, dict)) or isinstance(b, (tuple, list, dict)):
        if type(a) is not type(b) or len(a) != len(b):
            return False
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(_same_call(a[k], b[k]) for k in a)
        return all(_same_call(x, y) for x, y in zip(a, b))
    try:
        return bool(_same_default(a, b))
    except Exception:  # noqa: BLE001 - an object without a plain equality is not the same argument
        return False


@dataclasses.dataclass
class _CallSpec:
    """The arguments after the stream of the call a module was traced for: ``template`` holds the constants
    (``None``, ``False``, ...) and a :class:`_Slot` for each of the ``count`` tensors."""

    template: Any
    count: int

    @classmethod
    def of(cls, args: tuple, kwargs: dict[str, Any]) -> _CallSpec:
        tensors: list[torch.Tensor] = []
        template = _split_call((tuple(args), dict(kwargs)), tensors)
        return cls(template, len(tensors))

    def tensors(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """The tensors of a later call, in slot order; raises when its other arguments differ from the traced
        call's (the pieces hold those as constants)."""
        tensors: list[torch.Tensor] = []
        template = _split_call((tuple(args), dict(kwargs)), tensors)
        if not _same_call(template, self.template):
            raise RuntimeError(
                f"{type(module).__name__} was cut into residual sites for calls like {self.describe()}; it was "
                f"called with {_CallSpec(template, len(tensors)).describe()}, which its sites cannot follow"
            )
        return tensors

    def describe(self) -> str:
        args, kwargs = self.template
        words = [("tensor" if isinstance(a, _Slot) else repr(a)) for a in args]
        words += [f"{k}={'tensor' if isinstance(v, _Slot) else repr(v)}" for k, v in kwargs.items()]
        return "(stream" + "".join(", " + w for w in words) + ")"


def _trace_call(module: nn.Module, call: _CallSpec) -> fx.Graph:
    """``module``'s forward traced for calls like ``call`` (its decorators unwrapped): the stream is the one
    input, each other tensor a ``get_attr`` of ``_resinspect_side_<i>``, the other arguments constants."""
    forward = inspect.unwrap(type(module).forward)
    tracer = _ChildrenAsLeaves()
    for i in range(call.count):
        module.__dict__.setdefault(_SIDE.format(i), _NOT_CALLED_YET)

    def traced(self: nn.Module, x: torch.Tensor) -> Any:
        side = [tracer.create_proxy("get_attr", _SIDE.format(i), (), {}) for i in range(call.count)]
        args, kwargs = _fill(call.template, side)
        return forward(self, x, *args, **kwargs)

    cls = type(module)
    module.__class__ = type(cls.__name__, (cls,), {"forward": traced})
    try:
        graph = tracer.trace(module)
    except Exception as e:  # noqa: BLE001 - as in _trace
        first = (str(e).strip().splitlines() or [""])[0]
        raise _Untraceable(f"{type(e).__name__}: {first}" if first else type(e).__name__) from e
    finally:
        module.__class__ = cls
    return graph


def _chained_call(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The forward of a module cut into residual sites for calls with side inputs: each piece gets this call's
    tensors, then the pieces run one after the other."""
    return _run_pieces(self, x, self.__dict__["_resinspect_call"].tensors(self, args, kwargs))


def is_chained(module: nn.Module) -> bool:
    """Whether ``module``'s own ``forward`` is the chain of its residual sites (installed by the anatomy, not a
    patch left by an analysis)."""
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) in (_chained_forward, _chained_call)


def install_sites_for_call(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> int | str:
    """Cut ``module`` into its residual sites for calls like ``module(stream, *args, **kwargs)`` — a layer
    called with side inputs (masks, position ids, rotary embeddings), as Hugging Face's decoder layers are.
    The forward is traced once with those arguments (tensors as inputs read per call, the rest as
    constants); afterwards :func:`residual_blocks` lists its sites like any other, and a call with other
    constants (``use_cache=True``) raises. Returns the number of sites, or a reason why none were installed."""
    if module.__dict__.get("_resinspect_pieces") is None:
        call = _CallSpec.of(args, kwargs)
        try:
            graph = _trace_call(module, call)
        except _Untraceable as e:
            return f"torch.fx could not trace {type(module).__name__}: {e}"
        if _install_sites(module, graph, call) is None:
            return f"{type(module).__name__}'s forward adds no branch to its first argument that could be cut out"
    return sum(1 for label in module.__dict__["_resinspect_site_names"] if label is not None)


def _mode_independent(module: nn.Module, graph: fx.Graph, trace: Callable[[nn.Module], fx.Graph] | None = None) -> bool:
    """Whether the module's traced forward is the same in training and evaluation mode (the chain of pieces
    replaces its forward in both)."""
    was = module.training
    try:
        module.training = not was
        other = (trace or _trace)(module)
    except _Untraceable:
        return False
    finally:
        module.training = was
    return graph.python_code("self").src == other.python_code("self").src


def _install_sites(module: nn.Module, graph: fx.Graph, call: _CallSpec | None = None) -> list[fx.GraphModule] | None:
    """Cut ``module`` into its residual sites (see :func:`_pieces`) and make its forward call them in turn;
    returns the pieces (already installed: the same ones again), or None when it is not cut. With ``call``
    (the side inputs of :func:`install_sites_for_call`) one site is enough, and the forward takes the call's
    other arguments and hands their tensors to the pieces."""
    installed = module.__dict__.get("_resinspect_pieces")
    if installed is not None:
        return installed
    pieces = _pieces(module, graph, min_sites=1 if call is not None else 2)
    retrace = None if call is None else (lambda m: _trace_call(m, call))
    if pieces is None or not _mode_independent(module, graph, retrace):
        return None
    modules: list[fx.GraphModule] = []
    labels: list[str | None] = []
    counts: dict[str, int] = {}
    for i, (site, g) in enumerate(pieces):
        gm = fx.GraphModule(module, g, class_name=f"{type(module).__name__}_{'site' if site else 'piece'}{i}")
        gm.train(module.training)
        modules.append(gm)
        label = None
        if site:
            kind = _branch_kind(
                gm, [str(n.target) for n in _ancestors(_residual_adds(gm, gm.graph)[0][2]) if n.op == "call_module"]
            )
            n = counts[kind] = counts.get(kind, 0) + 1
            label = kind if n == 1 else f"{kind}_{n - 1}"
        labels.append(label)
    module.__dict__["_resinspect_pieces"] = modules
    module.__dict__["_resinspect_site_names"] = labels  # the sites' names, kept when a twin drops their skips
    if call is None:
        module.__dict__["_resinspect_defaults"] = _forward_defaults(module)
        module.forward = types.MethodType(_chained_forward, module)
    else:
        module.__dict__["_resinspect_call"] = call
        module.forward = types.MethodType(_chained_call, module)
    return modules


def block_module(model: nn.Module, name: str) -> nn.Module:
    """The module of the block or residual site called ``name`` in ``model`` — also in a plain twin, where a
    site's piece no longer adds anything. Raises AttributeError (as ``get_submodule``) when there is none."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        layer, _, label = name.rpartition(".")
        owner = model.get_submodule(layer) if layer else model
        labels = owner.__dict__.get("_resinspect_site_names") or []
        if label not in labels:
            raise
        return owner.__dict__["_resinspect_pieces"][labels.index(label)]


def replace_block_module(model: nn.Module, block: ResidualBlock, new: nn.Module) -> None:
    """Put ``new`` in the place of ``block.module`` inside ``model`` for good (the plain twin does this): the
    child of its parent for a whole-module block, the piece of its module's chain for a residual site."""
    if block.layer != block.name:
        owner = model.get_submodule(block.layer) if block.layer else model
        pieces = owner.__dict__["_resinspect_pieces"]
        pieces[next(i for i, p in enumerate(pieces) if p is block.module)] = new
        return
    parent_name, _, child = block.name.rpartition(".")
    if not child:
        raise ValueError("the model itself is a single residual block; it has no plain twin")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def site_modules(model: nn.Module) -> list[fx.GraphModule]:
    """The pieces of every module of ``model`` cut into residual sites (not registered as submodules: they
    share the module's own children and parameters)."""
    return [p for m in model.modules() for p in m.__dict__.get("_resinspect_pieces", ())]


def _branch_kind(module: nn.Module, names: list[str]) -> str:
    """``attention``, ``mlp``, ``conv``, or the name of the branch's first module."""
    subs = [(n, module.get_submodule(n)) for n in names]
    every = [(f"{n}.{k}" if k else n, m) for n, top in subs for k, m in top.named_modules()]
    # a norm is named after what follows it (Llama's post_attention_layernorm feeds the MLP): not a clue
    every = [(n, m) for n, m in every if "norm" not in type(m).__name__.lower()]

    def has(*words: str) -> bool:
        return any(any(w in (name.lower() + " " + type(m).__name__.lower()) for w in words) for name, m in every)

    if any(isinstance(m, nn.MultiheadAttention) for _, m in every) or has("attention", "attn"):
        # GPT-NeoX's parallel layer adds attention and MLP to the stream in one addition
        return "attention+mlp" if has("mlp", "feedforward", "feed_forward", "ffn") else "attention"
    if has("mlp", "feedforward", "feed_forward", "ffn"):
        return "mlp"
    if any(isinstance(m, nn.modules.conv._ConvNd) for _, m in every):
        return "conv"
    if any(isinstance(m, nn.Linear) for _, m in every):
        return "mlp"
    return names[0].rpartition(".")[2] if names else "branch"


def _shortcut_kind(module: nn.Module, node: fx.Node, x: fx.Node) -> str | None:
    if node is x:
        return "identity"
    if node.op == "call_module" and node.all_input_nodes == [x] and len(node.args) == 1:
        child = module.get_submodule(str(node.target))
        return "identity" if isinstance(child, nn.Identity) else "projection"
    return None


def _rewrite(block: ResidualBlock, mode: str) -> fx.Graph:
    graph = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(block._graph, remap)
    add, f, s = remap[block._add], remap[block._branch], remap[block._shortcut]
    if mode == "split":
        graph.output(out)
        x = next(n for n in graph.nodes if n.op == "placeholder")
        with graph.inserting_after(x):
            x_skip = graph.placeholder("x_skip")
        if s is x:
            add.replace_input_with(x, x_skip)
        else:
            s.replace_input_with(x, x_skip)
    elif mode in ("branch", "shortcut"):
        graph.output(f if mode == "branch" else s)
    else:
        graph.output(out)
        if mode == "bypass":
            replacement = s
            if block.shortcut_kind == "identity":
                # the skip alone would hand the caller's tensor to in-place ops after the
                # addition (torchvision's ReLU(inplace=True)); give them a copy instead
                with graph.inserting_after(add):
                    replacement = graph.call_method("clone", (s,))
        elif mode == "drop_skip":
            replacement = f
        else:
            raise ValueError(f"unknown switch mode '{mode}'; valid: bypass, drop_skip, branch, shortcut")
        add.replace_all_uses_with(replacement)
        graph.erase_node(add)
    graph.owning_module = block.module  # type: ignore[assignment]  # the purity check of dead-code elimination looks modules up there
    graph.eliminate_dead_code()
    return graph


# compiled forwards of rewritten graphs, keyed by their source and the objects that source refers to
_COMPILED: dict[tuple, Callable[..., torch.Tensor]] = {}


def _bind(graph: fx.Graph, module: nn.Module) -> Callable[..., torch.Tensor]:
    """``graph``'s code (as torch.fx generates it for a GraphModule rooted at ``module``) as a method of
    ``module``. Building a GraphModule defines a new class each time (milliseconds per block); the code of a
    variant only refers to the module's own attributes, so one compiled function serves every block whose
    graph is the same."""
    code = graph.python_code(root_module="self")
    key = (code.src, tuple(sorted((k, id(v)) for k, v in code.globals.items())))
    fn = _COMPILED.get(key)
    if fn is None:
        scope = dict(code.globals)
        exec(compile(code.src, f"<resinspect variant of {type(module).__name__}>", "exec"), scope)  # noqa: S102 (torch.fx's own code generation, as GraphModule.recompile does)
        fn = _COMPILED[key] = scope["forward"]
        fn._resinspect_globals = code.globals  # keeps the objects of the key alive
    return types.MethodType(fn, module)


class Blocks(list):
    """The list :func:`residual_blocks` returns: the blocks, plus ``untraced``, the modules whose forward torch.fx
    could not trace (``[(qualified name, type name, error)]``): a residual block among them would be missed, so
    reports say so instead of calling the network plain."""

    untraced: list[tuple[str, str, str]]

    def __init__(self, items: Iterable[ResidualBlock] = (), untraced: Iterable[tuple[str, str, str]] = ()):
        super().__init__(items)
        self.untraced = list(untraced)


def no_blocks_reason(blocks: Sequence[ResidualBlock]) -> str:
    """Why a network has no residual blocks, in words: a plain network, or the modules that could not be
    traced and the tracer's error (when :func:`residual_blocks` found some)."""
    untraced = getattr(blocks, "untraced", [])
    if not untraced:
        return "a plain network, or a forward that never adds a module's input to a branch"
    name, kind, error = untraced[0]
    more = f" and {len(untraced) - 1} more module(s)" if len(untraced) > 1 else ""
    where = f"module '{name}' ({kind})" if name else f"the model's own forward ({kind})"
    return f"torch.fx could not trace {where}{more}, so no residual addition could be looked for there: {error}"


def untraced_note(blocks: Sequence[ResidualBlock]) -> str | None:
    """A sentence naming the modules that could not be traced, or None when every module was traced."""
    untraced = getattr(blocks, "untraced", [])
    if not untraced:
        return None
    names = ", ".join(f"'{n}' ({k})" if n else f"the model's own forward ({k})" for n, k, _ in untraced[:5])
    more = f" and {len(untraced) - 5} more" if len(untraced) > 5 else ""
    return (
        f"torch.fx could not trace {len(untraced)} module(s), which were not examined for residual additions: "
        f"{names}{more}. First error: {untraced[0][2]}"
    )


def residual_blocks(model: nn.Module) -> Blocks:
    """The residual blocks of ``model`` in forward (registration) order, as a :class:`Blocks` list (whose
    ``untraced`` names the modules that torch.fx could not trace, with the error).

    Blocks nested inside another block's branch are not listed separately.
    A plain network gives an empty list.
    """
    blocks: list[ResidualBlock] = []
    untraced: list[tuple[str, str, str]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name and module is model and not list(module.children()):
            continue
        if any(name.startswith(p + ".") for p in inside):
            continue
        if not list(module.children()) or type(module) in _CONTAINERS or module.__dict__.get(_EXAMINED):
            continue  # a container's own forward only chains its children: nothing to trace
        sites = module.__dict__.get("_resinspect_pieces")
        if sites is None:
            try:
                graph = _trace(module)
            except _Untraceable as e:
                untraced.append((name, type(module).__name__, str(e)))
                continue
            sites = _install_sites(module, graph)
        if sites is not None:
            labels = module.__dict__["_resinspect_site_names"]
            for piece, label in zip(sites, labels):
                adds = _residual_adds(piece, piece.graph)
                if label is None or len(adds) != 1:
                    continue  # a step before the first site, or a site whose skip a twin removed
                blocks.append(ResidualBlock((f"{name}." if name else "") + label, piece, *adds[0], layer=name))
            inside.append(name)
            continue
        found = _residual_adds(module, graph)
        if len(found) != 1:
            continue
        blocks.append(ResidualBlock(name, module, *found[0]))
        inside.append(name)
    stages: dict[str, int] = {}
    for i, b in enumerate(blocks):
        b.index = i
        b.stage = stages.setdefault(b.stage_name, len(stages) + 1)
    # a module inside a found block was never traced on its own: only the others count
    untraced = [u for u in untraced if not any(u[0].startswith(p + ".") for p in inside)]
    return Blocks(blocks, untraced)


def require_blocks(model: nn.Module, what: str = "this analysis") -> list[ResidualBlock]:
    """Like :func:`residual_blocks` but raise :class:`NoResidualBlocks` with a clear message."""
    blocks = residual_blocks(model)
    if not blocks:
        raise NoResidualBlocks(
            f"{what} needs residual blocks, and {type(model).__name__} has none ({no_blocks_reason(blocks)})"
        )
    return blocks


def _resolve(model: nn.Module, given: Iterable[ResidualBlock | str] | ResidualBlock | str) -> list[ResidualBlock]:
    items = [given] if isinstance(given, (ResidualBlock, str)) else list(given)
    if not any(isinstance(b, str) for b in items):
        return [b for b in items if isinstance(b, ResidualBlock)]
    known = {b.name: b for b in residual_blocks(model)}
    resolved = []
    for b in items:
        if isinstance(b, str):
            if b not in known:
                from .errors import UnknownNameError

                raise UnknownNameError("residual block", b, known)
            b = known[b]
        resolved.append(b)
    return resolved


def replace_forward(module: nn.Module, forward: Callable) -> tuple[nn.Module, object]:
    """Make ``module`` call ``forward`` instead of its own; returns what :func:`restore_forwards` needs."""
    saved = (module, module.__dict__.get("forward", _MISSING))
    module.forward = forward
    return saved


def restore_forwards(saved: Sequence[tuple[nn.Module, object]]) -> None:
    """Undo :func:`replace_forward` calls, last first, leaving no trace on the modules."""
    for module, previous in reversed(saved):
        if previous is _MISSING:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous  # type: ignore[assignment]  # (saved by replace_forward: a callable)


@contextmanager
def forwards_replaced(replacements: Iterable[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Context manager: each ``(module, forward)`` pair swapped in, all restored on exit (also after an error)."""
    saved: list[tuple[nn.Module, object]] = []
    try:
        for module, forward in replacements:
            saved.append(replace_forward(module, forward))
        yield
    finally:
        restore_forwards(saved)


@contextmanager
def _switched(model: nn.Module, blocks, mode: str) -> Iterator[list[ResidualBlock]]:
    resolved = _resolve(model, blocks)
    with forwards_replaced((b.module, b.variant(mode)) for b in resolved):
        yield resolved


def bypass(model: nn.Module, blocks: Sequence[ResidualBlock | str] | ResidualBlock | str):
    """Context manager: each block outputs ``post(shortcut(x))``; its branch is not computed.

    ``blocks`` are :class:`ResidualBlock` objects or qualified names. The model
    is restored exactly on exit.
    """
    return _switched(model, blocks, "bypass")


def drop_skip(model: nn.Module, blocks: Sequence[ResidualBlock | str] | ResidualBlock | str):
    """Context manager: each block outputs ``post(branch(x))``, without its skip connection."""
    return _switched(model, blocks, "drop_skip")


def block_table(blocks: Sequence[ResidualBlock]) -> list[dict[str, object]]:
    """JSON-able description of blocks, for results.json and reports."""
    return [
        {
            "index": b.index,
            "name": b.name,
            "stage": b.stage,
            "downsamples": b.downsamples,
            "shortcut": b.shortcut_kind,
            "parameters": b.parameters_count(),
            "branch": b.branch_modules,
            "kind": b.kind,
            "layer": b.layer,
        }
        for b in blocks
    ]
