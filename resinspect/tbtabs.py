"""TensorBoard as a front end: what each of its tabs gets from a run, beyond scalars, histograms and images.

Written by rank 0 at the end of every run into the same two runs as everything else (``tb/model``,
``tb/twin``), so ``tensorboard --logdir RUN/tb`` — or ``--logdir SWEEP`` for a whole sweep — shows:

- **HParams**: each network is a session with the run's settings as hyperparameters (model, depth,
  residual, role, seed, epochs, optimiser, lr, data, plugins …) and its final numbers as metrics
  (``hparams/test_error``, ``hparams/train_error`` …, and every plugin's key metrics), so a sweep's
  folder is one HParams table: depth × residual/plain × error, sortable and filterable.
- **Graphs**: the network's graph from :mod:`torch.fx` (no deprecated ``torch.jit``), every module a name
  scope (``layer1/0/conv1``) and every residual addition a node of its own, ``<block>/residual_add`` with
  op ``ResidualAdd``, so the shortcuts are visible edges around each block's branch.
- **Projector**: the head's input features (the input of the last ``nn.Linear``) of up to
  ``tb_embeddings`` test images, with their labels and thumbnails.
- **PR curves**: one per class (up to :data:`PR_MAX_CLASSES`), test set, softmax scores.
- **Custom scalars**: a layout with the model and its twin on one chart for the training curves, each
  plugin's key metrics and per-step tags, and each per-block dossier column as a profile over depth
  (``<plugin>/by_block/<column>``, step = block index).
- **Text**: the run's config and each section's explanation (the findings are written with the sections).

:func:`write_tabs` returns what it wrote, with seconds and notes, for results.json's ``tensorboard`` key
and the report. Each kind can be skipped (``--tb-skip``); a kind that fails is noted, never fatal.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn

from .anatomy import _is_add
from .context import _limited
from .data.bundle import dataset_size
from .results import Results, model_depth, network_values
from .section import Section
from .tensorboard import TAB_KINDS

__all__ = ["KINDS", "PR_MAX_CLASSES", "write_tabs", "fx_graph_def", "head_linear", "evaluate_for_tabs", "pr_tags"]

KINDS = TAB_KINDS
PR_MAX_CLASSES = 32  # PR curves beyond this many classes would be charts nobody reads; the first ones are drawn
PR_THRESHOLDS = 127
MAX_CHARTS = 24  # per plugin in the custom-scalars layout
THUMBNAIL_PX = 32  # sprite thumbnails are scaled down to at most this size


# -- the evaluation pass: logits, labels and head features --------------------------------------------
def head_linear(model: nn.Module) -> nn.Linear | None:
    """The classifier the projector reads the input of: the last ``nn.Linear`` in module order."""
    found = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            found = m
    return found


@torch.no_grad()
def evaluate_for_tabs(
    model: nn.Module, batches: Any, keep_features: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One pass over ``batches``: logits and labels of every image, the head's input features and the
    images of the first ``keep_features`` (on the CPU)."""
    head = head_linear(model)
    captured: list[torch.Tensor] = []
    handle = (
        head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().flatten(1)))
        if head is not None and keep_features
        else None
    )
    logits, labels, features, images = [], [], [], []
    kept = 0
    try:
        for x, y in batches:
            captured.clear()
            out = model(x)
            # a language model: one row per token (its next-token logits and the next token)
            logits.append(out.detach().float().flatten(0, -2).cpu())
            labels.append(y.flatten().cpu())
            if kept < keep_features:
                take = min(keep_features - kept, len(x))
                images.append(x[:take].detach().float().cpu())
                if captured:
                    features.append(captured[-1][:take].float().cpu())
                kept += take
    finally:
        if handle is not None:
            handle.remove()
    feats = torch.cat(features) if features else None
    imgs = torch.cat(images) if images else torch.empty(0)
    return torch.cat(logits), torch.cat(labels), feats, imgs


def _thumbnails(images: torch.Tensor) -> torch.Tensor:
    """Images scaled per image to [0, 1], 3 channels, at most :data:`THUMBNAIL_PX` on a side."""
    x = images.float()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = x[:, :3]
    lo = x.flatten(1).min(1).values.view(-1, 1, 1, 1)
    hi = x.flatten(1).max(1).values.view(-1, 1, 1, 1)
    x = (x - lo) / (hi - lo).clamp_min(1e-12)
    side = max(x.shape[-2:])
    if side > THUMBNAIL_PX:
        size = (max(1, x.shape[-2] * THUMBNAIL_PX // side), max(1, x.shape[-1] * THUMBNAIL_PX // side))
        x = torch.nn.functional.interpolate(x, size=size, mode="area")
    return x.clamp(0, 1)


# -- the graph ---------------------------------------------------------------------------------------
class _GraphTracer(fx.Tracer):
    """torch.fx's tracer, with the modules the anatomy could not trace kept whole."""

    def __init__(self, opaque: set[str]):
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.opaque or super().is_leaf_module(m, module_qualified_name)


@contextlib.contextmanager
def _pieces_installed(model: nn.Module) -> Iterator[dict[int, str]]:
    """A module cut into residual sites calls pieces that are not its submodules (they share its layers); for
    tracing the whole model they are registered as ``site0``, ``site1`` … so that fx can follow them. Yields
    each piece's scope in the traced graph (by ``id``)."""
    added = []
    scopes: dict[int, str] = {}
    names = {id(m): n for n, m in model.named_modules()}
    try:
        for m in model.modules():
            for i, piece in enumerate(m.__dict__.get("_resinspect_pieces", ())):
                name = f"site{i}"
                if name not in m._modules:
                    m.add_module(name, piece)
                    added.append((m, name))
                    scopes[id(piece)] = f"{names[id(m)]}.{name}" if names.get(id(m)) else name
        yield scopes
    finally:
        for m, name in added:
            del m._modules[name]


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _residual_adds(gm: fx.GraphModule, blocks: Sequence[Any], scopes: dict[int, str] | None = None) -> set[fx.Node]:
    """The whole-model graph's nodes that are the blocks' residual additions: in each block's scope (a
    residual site's: its piece's, ``scopes``), the add at the same position among the scope's adds as the
    anatomy's add among the block's own."""
    by_scope: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if _is_add(n):
            by_scope.setdefault(_scope(n), []).append(n)
    found = set()
    for b in blocks:
        local = [n for n in b._graph.nodes if _is_add(n)]
        adds = by_scope.get((scopes or {}).get(id(b.module), b.name), [])
        i = local.index(b._add) if b._add in local else -1
        if 0 <= i < len(adds):
            found.add(adds[i])
    return found


def _shape_attr(node: fx.Node) -> dict[str, Any]:
    from tensorboard.compat.proto.attr_value_pb2 import AttrValue
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None:
        return {}
    proto = TensorShapeProto(dim=[TensorShapeProto.Dim(size=int(s)) for s in shape])
    return {"_output_shapes": AttrValue(list=AttrValue.ListValue(shape=[proto]))}


def _node_op(node: fx.Node, gm: fx.GraphModule, residual: set[fx.Node]) -> tuple[str, str]:
    """(op, short name) of a node for TensorBoard."""
    if node.op == "placeholder":
        return "IO Node", "input"
    if node.op == "output":
        return "IO Node", "output"
    if node in residual:
        return "ResidualAdd", "residual_add"
    if node.op == "call_module":
        target = str(node.target)
        return type(gm.get_submodule(target)).__name__, target.rpartition(".")[2]
    if node.op == "get_attr":
        return "Parameter", str(node.target).rpartition(".")[2]
    if node.op == "call_method":
        return str(node.target), str(node.target)
    return getattr(node.target, "__name__", str(node.target)), node.name


def fx_graph_def(model: nn.Module, example: torch.Tensor, blocks: Sequence[Any], opaque: set[str]) -> Any:
    """A TensorBoard ``GraphDef`` of ``model``: one node per fx node, named by module scope
    (``layer1/0/conv1``), residual additions as ``<block scope>/residual_add`` (op ``ResidualAdd``), output
    shapes from one forward of ``example``."""
    from tensorboard.compat.proto.attr_value_pb2 import AttrValue
    from tensorboard.compat.proto.graph_pb2 import GraphDef
    from tensorboard.compat.proto.node_def_pb2 import NodeDef
    from tensorboard.compat.proto.versions_pb2 import VersionDef
    from torch.fx.passes.shape_prop import ShapeProp

    with _pieces_installed(model) as scopes:
        graph = _GraphTracer(opaque).trace(model)
        gm = fx.GraphModule(model, graph)
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    residual = _residual_adds(gm, blocks, scopes)
    names: dict[fx.Node, str] = {}
    taken: set[str] = set()
    nodes = []
    for n in gm.graph.nodes:
        op, short = _node_op(n, gm, residual)
        if n.op == "call_module":
            base = str(n.target).replace(".", "/")
        else:
            scope = _scope(n)
            base = f"{scope.replace('.', '/')}/{short}" if scope else short
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        names[n] = name
        attr = _shape_attr(n)
        if n.op == "call_module":
            attr["attr"] = AttrValue(s=repr(gm.get_submodule(str(n.target))).encode())
        inputs = [names[a] for a in n.all_input_nodes if a in names]
        nodes.append(NodeDef(name=name, op=op, input=inputs, attr=attr))
    return GraphDef(node=nodes, versions=VersionDef(producer=22))


# -- the run's tabs ----------------------------------------------------------------------------------
def _tag_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", text).strip("_") or "x"


class _Tabs:
    """Everything :func:`write_tabs` needs, and what it has written so far."""

    def __init__(self, runs: Any, ctx: Any, results: Results, sections: list[Section], settings: dict[str, Any]):
        self.runs, self.ctx, self.results, self.sections, self.settings = runs, ctx, results, sections, settings
        self.record: dict[str, Any] = {"logdir": "tb", "written": {}, "skipped": {}, "notes": []}
        self.evaluated: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]] = {}

    def evaluation(self, role: str, network: nn.Module) -> tuple:
        if role not in self.evaluated:
            limit = int(self.settings["tb_samples"])
            keep = int(self.settings["tb_embeddings"])
            # its own budget (--tb-samples), not the analyses' (--samples)
            batches = _limited(self.ctx.test_loader, limit, self.ctx.device)
            self.evaluated[role] = evaluate_for_tabs(network, batches, keep)
        return self.evaluated[role]


# the HParams table's first columns (TensorBoard lists hyperparameters marked as differing first, by name): the
# degradation table is depth × residual/plain, and the model's name says which network a row is
HPARAMS_FIRST = ("depth", "model", "residual")


def _hparams_of(tabs: _Tabs, role: str, label: str) -> dict[str, Any]:
    """The settings a network's HParams row shows: the issue's list (model, depth, residual, twin kind,
    seed, epochs, optimiser, lr, data, plugins) and nothing else, so the table fits a screen."""
    c = tabs.results.config
    train = c.get("train", {})
    depth = model_depth(label)
    hp: dict[str, Any] = {
        "depth": depth if depth is not None else 0,
        "model": label,
        "residual": bool(len(tabs.ctx.blocks(role))),
        "twin": "plain" if tabs.ctx.twin is not None else "none",
        "seed": int(c.get("seed", 0)),
        "epochs": int(c.get("epochs") or 0),
        "optimizer": str(train.get("optimizer", "")),
        "lr": float(tabs.settings.get("lr") or train.get("lr") or 0.0),
        "data": str(c.get("data", "")),
        "plugins": ",".join(c.get("plugins") or []),
    }
    return hp


def _hparams_summaries(hp: dict[str, Any], metric_names: list[str]) -> list[Any]:
    """TensorBoard's three HParams summaries of one session: the experiment (the hyperparameters in
    :data:`HPARAMS_FIRST` order, marked as differing, which is what makes TensorBoard list them first; the
    metrics with short display names), the session's start (its values: booleans as booleans, which
    ``torch.utils.tensorboard``'s ``hparams`` turns into 1.0/0.0) and its end."""
    from google.protobuf import struct_pb2
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    def kind(v: Any) -> int:
        if isinstance(v, bool):
            return api_pb2.DATA_TYPE_BOOL
        return api_pb2.DATA_TYPE_FLOAT64 if isinstance(v, (int, float)) else api_pb2.DATA_TYPE_STRING

    def value(v: Any) -> struct_pb2.Value:
        if isinstance(v, bool):
            return struct_pb2.Value(bool_value=v)
        return (
            struct_pb2.Value(number_value=float(v))
            if isinstance(v, (int, float))
            else struct_pb2.Value(string_value=str(v))
        )

    infos = [api_pb2.HParamInfo(name=k, type=kind(v), differs=k in HPARAMS_FIRST) for k, v in hp.items()]
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=f"hparams/{m}"), display_name=m) for m in metric_names]
    start = plugin_data_pb2.SessionStartInfo(hparams={k: value(v) for k, v in hp.items()})
    parts = [
        (
            metadata.EXPERIMENT_TAG,
            plugin_data_pb2.HParamsPluginData(experiment=api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics)),
        ),
        (metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start)),
        (
            metadata.SESSION_END_INFO_TAG,
            plugin_data_pb2.HParamsPluginData(
                session_end_info=plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)
            ),
        ),
    ]
    return [
        Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data))]) for tag, data in parts
    ]


def _final_numbers(tabs: _Tabs) -> dict[str, dict[str, float]]:
    """Per network: test/train error from training (or, untrained, the evaluation pass) and the plugins'
    key metrics — what the HParams table shows."""
    values = network_values(tabs.results)
    keys = {k for s in tabs.sections for k in _key_names(s)}
    out: dict[str, dict[str, float]] = {}
    for role, net in tabs.ctx.networks():
        v = values.get(role, {})
        row: dict[str, float] = {k: v[k] for k in ("test_error", "train_error") if k in v}
        if "test_error" not in row:
            logits, labels, _, _ = tabs.evaluation(role, net)
            if len(labels):
                row["test_error"] = 1 - (logits.argmax(1) == labels).float().mean().item()
                tabs.record["notes"].append(
                    f"hparams: {tabs.ctx.label(role)}'s test_error is measured on {len(labels)} test images "
                    "(the network was not trained in this run)"
                )
        if "test_error" in row:
            row["test_accuracy"] = 1 - row["test_error"]
        row.update({k: v[k] for k in sorted(keys) if k in v})
        out[role] = row
    return out


def _key_names(s: Section) -> list[str]:
    plugin = "train" if s.plugin in ("core", "") else s.plugin
    out = []
    for k in s.key_metrics:
        head, _, rest = k.partition("/")
        out.append(f"{plugin}/{rest if head in ('model', 'twin') and rest else k}")
    return out


def _write_hparams(tabs: _Tabs) -> str:
    """One HParams session per network (its run, ``tb/model`` or ``tb/twin``): the same experiment in both,
    the network's own settings, its final numbers as ``hparams/<name>`` scalars."""
    numbers = _final_numbers(tabs)
    first = [k for k in ("test_error", "train_error", "test_accuracy") if any(k in r for r in numbers.values())]
    metric_names = first + sorted({k for row in numbers.values() for k in row} - set(first))
    for role, _ in tabs.ctx.networks():
        hp = _hparams_of(tabs, role, tabs.ctx.label(role))
        fw = tabs.runs.writer(role)._get_file_writer()
        for summary in _hparams_summaries(hp, metric_names):
            fw.add_summary(summary)
        tabs.runs.scalars({f"hparams/{k}": v for k, v in numbers[role].items() if math.isfinite(v)}, 0, role=role)
    return f"{len(numbers)} session(s), {len(metric_names)} metrics"


def _write_graph(tabs: _Tabs) -> str:
    from tensorboard.compat.proto import event_pb2

    x, _ = next(iter(tabs.ctx.test_batches(1)))
    drawn = []
    for role, net in tabs.ctx.networks():
        blocks = tabs.ctx.blocks(role)
        opaque = {u[0] for u in getattr(blocks, "untraced", [])}
        try:
            gd = fx_graph_def(net, x, blocks, opaque)
        except Exception as e:  # noqa: BLE001 - any model torch.fx cannot trace: noted, never fatal
            first = (str(e).strip().splitlines() or [""])[0][:200]
            tabs.record["notes"].append(
                f"graph: {tabs.ctx.label(role)} could not be traced by torch.fx ({type(e).__name__}: {first}); "
                "no graph for it"
            )
            continue
        fw = tabs.runs.writer(role)._get_file_writer()
        fw.add_event(event_pb2.Event(graph_def=gd.SerializeToString()))
        adds = sum(1 for n in gd.node if n.op == "ResidualAdd")
        drawn.append(f"{tabs.ctx.label(role)}: {len(gd.node)} nodes, {adds} residual additions")
    return "; ".join(drawn)


def _write_projector(tabs: _Tabs) -> str:
    n = int(tabs.settings["tb_embeddings"])
    if n == 0:
        return "off (tb_embeddings = 0)"
    if tabs.ctx.task.is_language:
        return "off (a language model: the projector shows images with their head features)"
    names = tabs.ctx.data.class_names
    done = []
    for role, net in tabs.ctx.networks():
        _, labels, feats, images = tabs.evaluation(role, net)
        if feats is None:
            tabs.record["notes"].append(f"projector: {tabs.ctx.label(role)} has no nn.Linear head; no embedding")
            continue
        k = len(feats)
        meta = [names[int(y)] if int(y) < len(names) else str(int(y)) for y in labels[:k]]
        tabs.runs.writer(role).add_embedding(
            feats, metadata=meta, label_img=_thumbnails(images[:k]), global_step=0, tag="head_input"
        )
        done.append(f"{tabs.ctx.label(role)}: {k} × {feats.shape[1]}")
    return "; ".join(done)


def _write_pr(tabs: _Tabs) -> str:
    names = tabs.ctx.data.class_names
    shown = n_images = 0
    for role, net in tabs.ctx.networks():
        logits, labels, _, _ = tabs.evaluation(role, net)
        probs = torch.softmax(logits, 1)
        shown = min(probs.shape[1], PR_MAX_CLASSES)
        w = tabs.runs.writer(role)
        for c, tag in enumerate(pr_tags(names, shown)):
            w.add_pr_curve(tag, labels == c, probs[:, c], 0, num_thresholds=PR_THRESHOLDS)
        n_images = len(labels)
    task = tabs.ctx.task
    per_sample = tabs.ctx.data.image_size if task.is_language else 1  # a language model: one row per token
    what = "tokens" if task.is_language else "classes"
    n_images //= per_sample
    if shown < len(names):
        tabs.record["notes"].append(f"pr: curves for the first {shown} of {len(names)} {what}")
    total = dataset_size(tabs.ctx.data.test)
    if n_images < total:
        tabs.record["notes"].append(
            f"pr, projector: the first {n_images} of {total} test {task.sample}s (--tb-samples {n_images})"
        )
    return f"{shown} {what} on {n_images} test {task.sample}s" + (
        f" ({n_images * per_sample} next-token predictions)" if task.is_language else ""
    )


def pr_tags(names: Sequence[str], n: int) -> list[str]:
    """The PR-curve tag of each of the first ``n`` classes: ``pr/<class name>``, or ``pr/<index>-<name>`` when
    two names would give the same tag."""
    parts = [_tag_part(names[c]) if c < len(names) else str(c) for c in range(n)]
    if len(set(parts)) == len(parts):
        return [f"pr/{p}" for p in parts]
    return [f"pr/{c}-{p}" for c, p in enumerate(parts)]


def _layout(tabs: _Tabs) -> dict[str, dict[str, list[Any]]]:
    def chart(*tags: str) -> list[Any]:
        return ["Multiline", [f"^{re.escape(t)}$" for t in tags]]

    tags = tabs.runs.tags_written()
    layout: dict[str, dict[str, list[Any]]] = {}
    train = {
        "training loss per step": "train/loss",
        "test accuracy per epoch": "train/test_accuracy",
        "training accuracy per epoch": "train/train_accuracy",
        "test loss per epoch": "train/test_loss",
    }
    if tabs.results.training:
        layout["model vs twin: training"] = {title: chart(t) for title, t in train.items()}
    hp = sorted(t for t in tags if t.startswith("hparams/"))
    if hp:
        layout["model vs twin: final numbers"] = {t.removeprefix("hparams/"): chart(t) for t in hp}
    modules = {n for n, _ in tabs.ctx.model.named_modules()} | {n for n, _ in tabs.ctx.model.named_parameters()}
    for plugin in dict.fromkeys(s.plugin for s in tabs.sections if s.plugin not in ("core", "")):
        charts = _plugin_charts(tabs, plugin, tags, modules)
        if len(charts) > MAX_CHARTS:
            tabs.record["notes"].append(f"layout: {plugin}'s first {MAX_CHARTS} of {len(charts)} charts")
        if charts:
            layout[plugin] = dict(list(charts.items())[:MAX_CHARTS])
    return layout


def _plugin_charts(tabs: _Tabs, plugin: str, tags: set[str], modules: set[str]) -> dict[str, list[Any]]:
    """A plugin's charts, most telling first: its key metrics, each per-block column as a profile over the
    blocks, each family of per-module tags (module names as wildcards), then its other scalars."""
    charts: dict[str, list[Any]] = {}
    for s in tabs.sections:
        if s.plugin == plugin:
            for name in _key_names(s):
                charts.setdefault(name.partition("/")[2], ["Multiline", [f"^{re.escape(name)}$"]])
    for t in sorted(t for t in tags if t.startswith(f"{plugin}/by_block/")):
        charts[f"{t.partition('/by_block/')[2]} (x = block index)"] = ["Multiline", [f"^{re.escape(t)}$"]]
    rest = []
    for t in sorted(tags):
        parts = t.split("/")
        if parts[0] != plugin or "by_block" in parts:
            continue
        if any(p in modules for p in parts[1:]):
            title = "/".join(p if p not in modules else "*" for p in parts[1:])
            regex = "/".join(re.escape(p) if p not in modules else "[^/]+" for p in parts)
            charts.setdefault(title, ["Multiline", [f"^{regex}$"]])
        else:
            rest.append(t)
    for t in rest:
        charts.setdefault(t.partition("/")[2], ["Multiline", [f"^{re.escape(t)}$"]])
    return charts


def _write_layout(tabs: _Tabs) -> str:
    for s in tabs.sections:  # each dossier column as a profile over the blocks: step = block index
        plugin = "train" if s.plugin in ("core", "") else s.plugin
        if not s.per_block or plugin == "dossier":
            continue
        order = {b.name: b.index for b in tabs.ctx.blocks("model")}
        for column, values in s.per_block.items():
            tag = f"{plugin}/by_block/{_tag_part(column)}"
            for block, v in values.items():
                if block in order and math.isfinite(v):
                    tabs.runs.scalars({tag: v}, order[block], role="model")
    layout = _layout(tabs)
    from torch.utils.tensorboard.summary import custom_scalars

    tabs.runs.writer("model")._get_file_writer().add_summary(custom_scalars(layout))
    return f"{len(layout)} categories, {sum(len(c) for c in layout.values())} charts"


def _write_text(tabs: _Tabs) -> str:
    w = tabs.runs.writer("model")
    config = tabs.settings.get("config_toml") or ""
    w.add_text("run/config", "```toml\n" + config.strip() + "\n```" if config else "(no config)", 0)
    written = 1
    count: dict[str, int] = {}
    for s in tabs.sections:
        plugin = "train" if s.plugin in ("core", "") else s.plugin
        if not s.explanation or s.role == "twin":
            continue
        n = count[plugin] = count.get(plugin, -1) + 1
        tag = f"{plugin}/explanation" if n == 0 else f"{plugin}/explanation/{n}"
        w.add_text(tag, f"**{s.title}**\n\n{s.explanation}", 0)
        written += 1
    if tabs.record["notes"]:
        w.add_text("run/tensorboard_notes", "\n".join(f"- {n}" for n in tabs.record["notes"]), 0)
    return f"{written} texts"


_WRITERS: dict[str, Callable[[_Tabs], str]] = {
    "hparams": _write_hparams,
    "graph": _write_graph,
    "projector": _write_projector,
    "pr": _write_pr,
    "layout": _write_layout,
    "text": _write_text,
}


def write_tabs(
    runs: Any, ctx: Any, results: Results, sections: list[Section], settings: dict[str, Any]
) -> dict[str, Any]:
    """Write every TensorBoard kind of :data:`KINDS` not in ``settings["tb_skip"]`` into ``runs`` and return
    ``{"logdir", "written": {kind: {"seconds", "what"}}, "skipped": {kind: why}, "notes": [...]}``.

    ``settings``: ``tb_skip`` (kinds), ``tb_samples`` (test images of the evaluation pass behind the PR
    curves, the projector and an untrained network's test error), ``tb_embeddings``
    (projector images), ``config_toml`` (the text of the run's config)."""
    tabs = _Tabs(runs, ctx, results, sections, settings)
    if not runs.enabled:
        return tabs.record
    skip = set(settings.get("tb_skip") or [])
    for kind in KINDS:  # text last: it carries the others' notes
        if kind in skip:
            tabs.record["skipped"][kind] = "--tb-skip"
            continue
        t0 = time.perf_counter()
        try:
            what = _WRITERS[kind](tabs)
        except Exception as e:  # noqa: BLE001 - TensorBoard extras never take the run down
            tabs.record["notes"].append(f"{kind}: not written ({type(e).__name__}: {str(e)[:200]})")
            continue
        tabs.record["written"][kind] = {"seconds": round(time.perf_counter() - t0, 3), "what": what}
    return tabs.record
