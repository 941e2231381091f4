"""Trust: every file read is checked against its schema, every option bounded, every link inside the folder,
every failure told honestly (issue 21). Each rule is tested over all the cases it covers, not one."""

import ast
import html.parser
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import resinspect
from resinspect.cli import main
from resinspect.errors import CheckpointError, OptionError, ResinspectError
from resinspect.options import Interval
from resinspect.plugins import PluginHost
from resinspect.results import Results, validate
from resinspect.schema import load_schema
from resinspect.schema import validate as validate_against
from resinspect.sweep import read_sweep

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(data="digits", data_args={"size": 8}, device="cpu", epochs=1)


def _cli(args):
    return CliRunner().invoke(main, [str(a) for a in args])


# -- option bounds: generated from every plugin's own declarations ------------------------------------------
def _numeric_options():
    host = PluginHost()
    host.register_extensions()
    registry = host.option_registry()
    return [(p, o) for p, g in sorted(registry.groups.items()) for o in g.options.values() if o.type in (int, float)]


def _first_party(plugin: str) -> bool:
    """The built-in plugins and our example package: all must declare bounds."""
    return PluginHost().available[plugin].source in ("entry point (resinspect)", "entry point (resinspect-blockgain)")


def _outside(o) -> list:
    b = o.bounds
    step = 1 if o.type is int else max(1e-9, 1e-6 * max(abs(b.high), 1.0))
    out = [b.high + step, b.low - step] if o.type is int else [b.high * (1 + 1e-6) + step, b.low - step]
    if b.low_open:
        out.append(b.low)
    if b.high_open:
        out.append(b.high)
    return out


@pytest.mark.parametrize("plugin,option", [pytest.param(p, o, id=o.key) for p, o in _numeric_options()])
def test_every_numeric_option_is_bounded_and_refuses_nan_inf_and_absurd_sizes(plugin, option):
    if _first_party(plugin):
        assert option.bounds is not None, f"{option.key} declares no bounds"
    if option.bounds is None:  # a third party's unbounded option: NaN and infinities are still refused
        if option.type is float:
            for bad in ("nan", "inf", "-inf"):
                with pytest.raises(OptionError, match="not a valid finite float"):
                    option.coerce(bad)
        return
    b = option.bounds
    assert option.default in b and math.isfinite(b.low) and math.isfinite(b.high)
    assert option.coerce(str(option.default)) == option.default  # the default round-trips as typed text
    for bad in _outside(option):
        text = str(int(bad)) if option.type is int else repr(float(bad))
        with pytest.raises(OptionError, match=rf"option {option.key}: .* must be in {re_escape(str(b))}"):
            option.coerce(text)
    if option.type is float:
        for bad in ("nan", "inf", "-inf", "NaN"):
            with pytest.raises(OptionError, match="not a valid finite float"):
                option.coerce(bad)
    for good in (b.low, b.high):
        if good in b:
            value = int(good) if option.type is int else good
            assert option.coerce(str(value)) == value


def re_escape(text):
    import re

    return re.escape(text)


def test_an_absurd_option_is_refused_before_any_work_with_its_cost(tmp_path):
    out = tmp_path / "run"
    for value, what in (("1000", "1,000,000 loss evaluations"), ("100000", "10,000,000,000 loss evaluations")):
        with pytest.raises(OptionError, match=f"must be in \\[3, 201\\].*{what}"):
            resinspect.run(model="resnet8", plugins=["landscape"], options=[f"landscape.resolution={value}"],
                           out=out, **SMALL)
    with pytest.raises(OptionError, match="landscape.span: 'nan' is not a valid finite float"):
        resinspect.run(model="resnet8", plugins=["landscape"], options=["landscape.span=nan"], out=out, **SMALL)
    assert not out.exists()  # nothing was built or written
    r = _cli(["run", "-o", "ablation.pair_blocks=1000", "--out", out])
    assert r.exit_code == 1 and "up to 499,500 lesioned passes" in r.output and "Traceback" not in r.output
    # run settings follow the same rule
    for flag, value in (("--lr", "nan"), ("--lr", "inf"), ("--epochs", "10000000"), ("--batch-size", "0")):
        r = _cli(["run", flag, value, "--out", out])
        assert r.exit_code != 0 and "Traceback" not in r.output, r.output
        assert ("finite" in r.output or "must be in" in r.output or "not a valid" in r.output), r.output
    assert not out.exists()


def test_interval_reads_like_mathematics():
    i = Interval.parse("(0, 1]")
    assert 1 in i and 0.5 in i and 0 not in i and float("nan") not in i and True not in i
    assert str(Interval.parse("[1, 100_000]")) == "[1, 100_000]"
    with pytest.raises(ValueError):
        Interval.parse("[1, inf]")
    host = PluginHost()
    with pytest.raises(ValueError, match="default 0 is outside \\[1, 5\\]"):
        host.option_registry().group("x").add("n", int, 0, "help", bounds="[1, 5]")
    r = _cli(["plugins"])
    assert "-o landscape.resolution=21\n        (int in [3, 201])" in r.output


# -- folders keep their kind ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def a_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust") / "sweep"
    s = resinspect.RunSettings(twin=False, epochs=1, plugins=["summary"], data="digits", device="cpu")
    s.data_args = {"size": 8}
    resinspect.sweep(["resnet8"], [0], out=root, settings=s)
    return root, s


@pytest.fixture(scope="module")
def a_run(a_sweep):
    return a_sweep[0] / "resnet8-seed0"


def _sweep_copy(a_sweep, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(a_sweep[0], root)
    return root


def test_a_run_folder_never_becomes_a_sweep_nor_a_sweep_a_run(a_sweep, a_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(a_run, run_dir)
    before = sorted(p.name for p in run_dir.iterdir())
    for extra in ([], ["--overwrite"]):
        r = _cli(["sweep", "--models", "resnet8", "--epochs", "1", "--data-arg", "size=8", "--plugins", "summary",
                  "--out", run_dir, *extra])
        assert r.exit_code == 1 and "is a run directory" in r.output and "never replaces a run" in r.output
    assert sorted(p.name for p in run_dir.iterdir()) == before and not (run_dir / "sweep.json").exists()
    sweep_dir = _sweep_copy(a_sweep, tmp_path)
    with pytest.raises(ResinspectError, match="is a sweep folder .*a run never replaces a sweep"):
        resinspect.run(model="resnet8", plugins=["summary"], out=sweep_dir, overwrite=True, **SMALL)
    assert (sweep_dir / "sweep.json").is_file() and (sweep_dir / "index.html").is_file()


# -- every file read is validated: the file, the field, what was expected; no traceback ----------------------
def _tamper(path, change):
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def test_a_truncated_sweep_json_names_the_file_and_the_way_out(a_sweep, tmp_path):
    root = _sweep_copy(a_sweep, tmp_path)
    text = (root / "sweep.json").read_text()
    (root / "sweep.json").write_text(text[: len(text) // 2])
    args = ["sweep", "--models", "resnet8", "--epochs", "1", "--data-arg", "size=8", "--plugins", "summary",
            "--no-twin", "--device", "cpu", "--out", root]
    r = _cli(args)
    assert r.exit_code == 1 and str(root / "sweep.json") in r.output and "not valid JSON" in r.output
    assert "--overwrite" in r.output and "Traceback" not in r.output
    r = _cli(["report", root])
    assert r.exit_code == 1 and "not valid JSON" in r.output and "Traceback" not in r.output
    r = _cli(args + ["--overwrite"])  # the way out works
    assert r.exit_code == 0, r.output
    assert read_sweep(root)["status"] == "complete"


@pytest.mark.parametrize("change,field", [
    (lambda d: d.__setitem__("runs", {"0": d["runs"][0]}), "runs: expected a list"),
    (lambda d: d["runs"][0].__setitem__("seed", "zero"), "runs/0/seed: expected an integer"),
    (lambda d: d["grid"].__setitem__("models", "resnet8"), "grid/models: expected a list"),
    (lambda d: d["aggregate"]["families"].__setitem__("residual", {"deep": {}}),
     "aggregate/families/residual/deep: unexpected field"),
    (lambda d: d["runs"][0].__setitem__("path", "javascript:alert(1)//"), "runs/0/path"),
    (lambda d: d["runs"][0].__setitem__("path", "../../elsewhere"), "runs/0/path"),
    (lambda d: d.__setitem__("identity", []), "identity: expected an object"),
])
def test_a_sweep_json_with_a_wrong_field_names_the_file_and_the_field(a_sweep, tmp_path, change, field):
    root = _sweep_copy(a_sweep, tmp_path)
    _tamper(root / "sweep.json", change)
    r = _cli(["report", root])
    assert r.exit_code == 1 and str(root / "sweep.json") in r.output and field in r.output, r.output
    assert "Traceback" not in r.output and len(r.output) < 400
    r = _cli(["sweep", "--models", "resnet8", "--epochs", "1", "--data-arg", "size=8", "--plugins", "summary",
              "--no-twin", "--device", "cpu", "--out", root])
    assert r.exit_code == 1 and field in r.output and "--overwrite" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("change,field", [
    (lambda d: d.__setitem__("plugins", []), "plugins: expected an object"),
    (lambda d: d["run"].__setitem__("seconds", "long"), "run/seconds"),
    (lambda d: d.__setitem__("status", "great"), "status: expected one of"),
    (lambda d: d["plugins"]["summary"].__setitem__("sections", {}), "plugins/summary/sections: expected a list"),
])
def test_a_results_json_with_a_wrong_field_names_the_file_and_the_field(a_run, tmp_path, change, field):
    run_dir = tmp_path / "run"
    shutil.copytree(a_run, run_dir)
    _tamper(run_dir / "results.json", change)
    for args in (["report", run_dir], ["compare", run_dir, a_run, "--out", tmp_path / "c.html"]):
        r = _cli(args)
        assert r.exit_code == 1 and str(run_dir / "results.json") in r.output and field in r.output, r.output
        assert "Traceback" not in r.output


def test_our_schema_validator_agrees_with_jsonschema(a_sweep, a_run):
    jsonschema = pytest.importorskip("jsonschema")
    docs = [("results-schema.json", json.loads((a_run / "results.json").read_text())),
            ("sweep-schema.json", json.loads((a_sweep[0] / "sweep.json").read_text()))]
    tampered = []
    for name, d in docs:
        for key in list(d)[:8]:
            for bad in (None, [], "x", 3):
                t = json.loads(json.dumps(d))
                t[key] = bad
                tampered.append((name, t))
        t = json.loads(json.dumps(d))
        t.pop(next(iter(t)))
        tampered.append((name, t))
    for name, d in docs + tampered:
        ours = validate_against(d, load_schema(name))
        theirs = list(jsonschema.Draft202012Validator(load_schema(name)).iter_errors(d))
        assert bool(ours) == bool(theirs), (name, ours, [e.message for e in theirs])
    assert validate(docs[0][1]) == []


def test_a_config_file_with_a_wrong_value_names_the_file_and_the_key(tmp_path):
    cases = {
        "[run]\nepochs = 'many'\n": "epochs = 'many' is not a valid int",
        "[train]\nlr = nan\n": "lr = nan",
        "run = 3\n": "'run' should be a table",
        "[landscape]\nresolution = 5000\n": "[landscape] resolution: option landscape.resolution: 5000 must be in",
        "[landscape]\nresolutoin = 5\n": "unknown option in config",
        "[run\n": "not valid TOML",
    }
    for text, expected in cases.items():
        cfg = tmp_path / "bad.toml"
        cfg.write_text(text)
        r = _cli(["run", "--config", cfg, "--out", tmp_path / "never"])
        assert r.exit_code != 0 and str(cfg) in r.output and expected in r.output, (text, r.output)
        assert "Traceback" not in r.output
    assert not (tmp_path / "never").exists()


def test_a_checkpoint_with_a_wrong_field_names_the_file_and_the_field(a_run, tmp_path):
    good = torch.load(a_run / "model.pt", weights_only=True)
    for field, bad, words in (("version", "1", "field 'version' should be an integer"),
                              ("arch_kwargs", [1, 2], "field 'arch_kwargs' should be a table"),
                              ("state_dict", {"w": 3}, "field 'state_dict' should be a table of tensors"),
                              ("metrics", {"acc": "high"}, "field 'metrics' should be a table of numbers"),
                              ("dataset", "digits", "field 'dataset' should be a table")):
        path = tmp_path / f"{field}.pt"
        torch.save({**good, field: bad}, path)
        with pytest.raises(CheckpointError, match=f"checkpoint {re_escape(str(path))}: {re_escape(words)}"):
            resinspect.load_checkpoint(path)
        r = _cli(["run", "--checkpoint", path, "--plugins", "summary", "--data-arg", "size=8", "--out",
                  tmp_path / "never"])
        assert r.exit_code == 1 and words in r.output and "Traceback" not in r.output


# -- links: relative and inside the folder, or not written -------------------------------------------------
class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if k in ("href", "src", "action", "formaction") and v is not None]


def _assert_links_stay_inside(page: Path):
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    assert parser.links
    for link in parser.links:
        if link.startswith(("#", "data:image/png;base64,")):
            continue
        assert ":" not in link and not link.startswith("/"), link
        target = (page.parent / link).resolve()
        assert page.parent.resolve() in target.parents and target.is_file(), link


def test_every_link_a_report_writes_is_relative_and_inside_its_folder(a_sweep, a_run, tmp_path):
    root = _sweep_copy(a_sweep, tmp_path)
    for page in (root / "index.html", root / "resnet8-seed0" / "index.html"):
        _assert_links_stay_inside(page)
    assert 'href="resnet8-seed0/index.html"' in (root / "index.html").read_text()
    _cli(["compare", a_run, root / "resnet8-seed0", "--out", tmp_path / "compare.html"])
    parser = _Links()
    parser.feed((tmp_path / "compare.html").read_text())
    assert all(v.startswith(("#", "data:")) for v in parser.links)
    # a tampered path never becomes a link, even if the file is rendered without being read back first
    from resinspect.sweep_report import render_sweep_html

    doc = read_sweep(root)
    for bad in ("javascript:alert(1)//", "../../etc", "/etc/passwd", "https://example.com/x"):
        doc["runs"][0]["path"] = bad
        page = render_sweep_html(doc, root)
        assert "href=\"javascript" not in page and 'href="/' not in page and "href=\"../" not in page
        assert "href=\"https" not in page


# -- a module that cannot be traced is named, with why -----------------------------------------------------
class BranchyBlock(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())

    def forward(self, x):
        if x.mean() > 100:  # data-dependent control flow: torch.fx cannot trace it
            return x
        return x + self.f(x)


def branchy(in_channels=1, num_classes=10):
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), BranchyBlock(), BranchyBlock(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


def test_an_untraceable_block_is_named_with_the_tracer_error_not_called_plain():
    blocks = resinspect.residual_blocks(branchy())
    assert blocks == [] and [u[:2] for u in blocks.untraced] == [("1", "BranchyBlock"), ("2", "BranchyBlock")]
    assert "control flow" in blocks.untraced[0][2]
    with pytest.raises(resinspect.NoResidualBlocks, match="could not trace module '1' \\(BranchyBlock\\) and 1 more"):
        resinspect.require_blocks(branchy())
    result = resinspect.run(model=branchy(), plugins=["summary", "ablation", "paths", "activations"], **SMALL)
    texts = {p: " ".join(f.text for f in result.section(p).findings) for p in ("summary", "ablation", "paths",
                                                                                   "activations")}
    for plugin, text in texts.items():
        assert "could not trace module '1' (BranchyBlock)" in text and "TraceError" in text, (plugin, text)
        assert "a plain network, or a forward" not in text
    assert any(f.severity == "warning" for f in result.section("summary").findings)
    # a traceable model has nothing untraced
    assert resinspect.residual_blocks(resinspect.build_model("resnet8")).untraced == []


# -- the plugin author's API --------------------------------------------------------------------------------
def test_train_batches_count_images_and_repeat_exactly(digits8):
    from resinspect.testing import make_context

    ctx = make_context(resinspect.build_model("resnet8"), digits8)
    batch = ctx.train_loader.batch_size
    first = list(ctx.train_batches(batch + 5))
    assert [len(y) for _, y in first] == [batch, 5]  # images, the last batch cut to fit, as test_batches
    next(iter(ctx.train_loader))  # training's shuffling moves on ...
    again = list(ctx.train_batches(batch + 5))  # ... the analysis batches do not
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    whole = sum(len(y) for _, y in ctx.train_batches())
    assert whole == len(digits8.train)
    order = torch.randperm(len(digits8.train), generator=torch.Generator().manual_seed(ctx.seed))[:batch]
    expected = torch.stack([digits8.train[i][0] for i in order.tolist()])
    assert torch.equal(first[0][0], expected)  # a permutation seeded with the run's seed: the same on every rank


def test_block_column_reads_at_the_call_site_and_metrics_can_stay_out_of_tensorboard(tmp_path):
    from resinspect import Section

    s = Section("x")
    s.block_column("cka", {"a": 0.9}, matters_more_when="smaller")
    s.block_column("cost", {"a": 3.0})
    assert s.block_sign == {"cka": -1}
    with pytest.raises(ValueError, match="'larger' or 'smaller'"):
        s.block_column("c", {"a": 1.0}, matters_more_when="bigger")
    from resinspect.tensorboard import TensorBoardRuns

    s.plugin = "probe"
    s.metric("shown/value", 1.0)
    s.metric("per_pair/a~b", 2.0, tensorboard=False)
    assert s.metrics == {"shown/value": 1.0, "per_pair/a~b": 2.0}
    runs = TensorBoardRuns(tmp_path / "tb")
    runs.sections([s])
    runs.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / "model"))
    acc.Reload()
    assert acc.Tags()["scalars"] == ["probe/shown/value"]


def test_without_a_terminal_each_phase_and_plugin_prints_one_line_with_its_seconds(tmp_path):
    r = CliRunner().invoke(main, ["run", "--model", "resnet8", "--epochs", "2", "--data-arg", "size=8",
                                  "--plugins", "summary,weights", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("[resinspect] ")]
    import re

    expected = [r"run .*resnet8 on digits, 2 epoch\(s\), plugins summary, weights", r"train: start",
                r"train resnet8: epoch 1/2, test accuracy 0\.\d{4}, \d+\.\d s",
                r"train resnet8: epoch 2/2, test accuracy 0\.\d{4}, \d+\.\d s", r"train: done in \d+\.\d s",
                r"estimate: \S+ s of analysis \(summary \S+ s, weights \S+ s\), from a probe pass of \d+ image\(s\) "
                r"forward and backward in \d+\.\d\d s",
                r"analyze: start", r"analyze summary: start", r"analyze summary: ok in \d+\.\d s",
                r"analyze weights: start", r"analyze weights: ok in \d+\.\d s", r"analyze: done in \d+\.\d s",
                r"write: start", r"write: done in \d+\.\d s", r"run complete in \d+\.\d s: .*index.html"]
    assert len(lines) == len(expected), lines
    for line, pattern in zip(lines, expected):
        assert re.fullmatch(r"\[resinspect\] " + pattern, line), (line, pattern)
    quiet = CliRunner().invoke(main, ["run", "--model", "resnet8", "--epochs", "1", "--data-arg", "size=8",
                                      "--plugins", "summary", "--out", str(tmp_path / "q"), "-q"])
    assert "[resinspect]" not in quiet.output


def test_the_results_model_imports_nothing_that_renders():
    """results -> (atomic, errors, section, schema) only; report -> results; no cycle among them."""
    graph = {}
    for path in (ROOT / "resinspect").glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names.add((node.module or "").split(".")[0] or "__init__")
        graph[path.stem] = names - {"__init__"}  # (the package's __init__ re-exports everything)
    graph["report"] = {"results", "explainer"}  # the package resinspect/report/ (checked below)
    report_imports = ast.parse((ROOT / "resinspect" / "report" / "__init__.py").read_text())
    assert {n.module for n in ast.walk(report_imports) if isinstance(n, ast.ImportFrom) and n.level == 2} == {"results"}
    assert graph["results"] <= {"atomic", "errors", "section", "schema"}, graph["results"]

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, seen + (n,))) for n in graph.get(a, ()))

    for a in ("results", "rundir", "report"):
        assert not reaches(a, a), f"{a} imports itself through a cycle"
    assert not reaches("results", "report")


def test_docs_answer_the_plugin_authors_questions():
    docs = (ROOT / "docs" / "plugins.md").read_text()
    for words in ("ctx.blocks(\"twin\")", "`ctx.twin_counterparts()` — one `(block, twin_module)` tuple",
                  "Gradients\nare enabled", "on the model's device", "There is one way, and nothing to declare",
                  "Metric names may contain `/`", "tensorboard=False", "matters_more_when=\"smaller\"",
                  "`ctx.train_batches(limit=0)`", "No augmentation"):
        assert words in docs, words
    assert "`formulas` plugin evaluates" in (ROOT / "docs" / "residual-learning.md").read_text()
    for path in (ROOT / "examples" / "resinspect-blockgain" / "resinspect_blockgain.py",
                 ROOT / "resinspect" / "scaffold.py"):
        assert "NAME = " not in path.read_text()


def test_an_untrained_model_is_called_untrained_and_its_findings_say_so(tmp_path):
    result = resinspect.run(model="resnet8", plugins=["ablation"], twin=True, out=tmp_path / "r", epochs=0,
                            data="digits", data_args={"size": 8}, device="cpu",
                            options=["ablation.pair_blocks=0", "ablation.k_max=0", "ablation.bn_recalibrate=false"])
    assert result.results.model["trained"] is False
    page = (tmp_path / "r" / "index.html").read_text()
    assert "Analysed untrained:" in page
    texts = " ".join(f.text for f in result.section("ablation").findings)
    assert "was trained (no epochs, no checkpoint)" in texts and "the degradation problem itself" not in texts
    trained = resinspect.run(model="resnet8", plugins=[], out=tmp_path / "t", **SMALL)
    assert trained.results.model["trained"] is True
    assert "Analysed untrained:" not in (tmp_path / "t" / "index.html").read_text()
    in_memory = resinspect.run(model=resinspect.build_model("resnet8"), plugins=[], out=tmp_path / "m",
                               data="digits", data_args={"size": 8}, device="cpu", epochs=0)
    assert in_memory.results.model["trained"] is None  # a module given in memory may have been trained
