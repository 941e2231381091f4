"""Many processes: resinspect under torchrun (gloo on CPU) gives the results of one process."""

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import resinspect
from resinspect.distributed import SINGLE, Distributed, reduce_values
from resinspect.results import Results

ROOT = Path(__file__).resolve().parents[1]
BLOCKGAIN = ROOT / "examples" / "resinspect-blockgain" / "resinspect_blockgain.py"
DATA = ["--data", "digits", "--data-arg", "size=8", "--device", "cpu"]


def _cli(args, timeout=300, env=None):
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "resinspect", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    return proc, time.time() - started


@dataclass
class _Counts:
    count: int
    total: float


def test_reduce_values_combines_any_shape_in_closed_form():
    a = {"n": 2, "s": 1.5, "t": torch.tensor([1.0, 2.0]), "nested": [_Counts(1, 0.25), (3, "label")], "only_a": 7}
    b = {"n": 3, "s": 2.0, "t": torch.tensor([10.0, -1.0]), "nested": [_Counts(4, 0.5), (5, "label")]}
    got = reduce_values([a, b])
    assert got["n"] == 5 and isinstance(got["n"], int) and got["s"] == 3.5 and got["only_a"] == 7
    assert got["t"].tolist() == [11.0, 1.0]
    assert got["nested"][0] == _Counts(5, 0.75) and got["nested"][1] == (8, "label")
    assert reduce_values([a, b], "max")["t"].tolist() == [10.0, 2.0]
    assert reduce_values([None, {"x": 1}]) == {"x": 1}  # a rank that got no batch
    with pytest.raises(ValueError, match="differ in length"):
        reduce_values([[1, 2], [1]])


def test_one_process_api_is_the_identity():
    value = {"a": torch.ones(2)}
    assert SINGLE.all_reduce(value) is value and SINGLE.all_gather(3) == [3]
    assert list(SINGLE.shard(range(5))) == [0, 1, 2, 3, 4] and SINGLE.split([1, 2]) == [1, 2]
    two = Distributed(world_size=2, rank=1, backend="gloo")
    assert list(two.shard(range(5), whole=True)) == [1, 3] and two.split(list("abcde")) == ["b", "d"]
    assert not two.is_main
    batches = [(torch.arange(5), torch.arange(5) * 10), (torch.arange(1), torch.arange(1))]
    parts = [list(Distributed(2, r, backend="gloo").shard(batches)) for r in (0, 1)]
    assert [[x.tolist() for x, _ in p] for p in parts] == [[[0, 1, 2], [0]], [[3, 4]]]  # balanced; no empty part
    assert [[x.tolist() for x, _ in Distributed(2, r, backend="gloo").shard(batches, whole=True)] for r in (0, 1)] \
        == [[[0, 1, 2, 3, 4]], [[0]]]
    costs = {"a": 5, "b": 1, "c": 1, "d": 3, "e": 1, "f": 1}
    shares = [Distributed(2, r, backend="gloo").split(list(costs), cost=costs.get) for r in (0, 1)]
    assert shares == [["a", "e"], ["b", "c", "d", "f"]]  # longest first: totals 6 and 6
    with pytest.raises(ValueError, match="valid: sum, max, min"):
        SINGLE.all_reduce(1, "mean")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "trained"
    resinspect.run(model="resnet8", data="digits", data_args={"size": 8}, twin=True, epochs=1, plugins=[],
                   device="cpu", out=out)
    return out / "model.pt"


def _numbers(results: Results) -> dict:
    return {k: v for k, v in results.metrics().items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@pytest.mark.slow
def test_two_processes_give_the_results_of_one(checkpoint, tmp_path):
    plugins = f"summary,ablation,activations,similarity,attribution,spectra,landscape,lens,rank,{BLOCKGAIN}"
    common = ["run", "--checkpoint", str(checkpoint), "--epochs", "0", "--twin", "--plugins", plugins, *DATA, "-q",
              "-o", "attribution.images=32", "-o", "attribution.sanity_images=8", "-o", "landscape.resolution=5",
              "-o", "landscape.resolution_1d=7", "-o", "landscape.samples=64", "-o", "lens.steps=10",
              "-o", "lens.fit_samples=64"]
    one, _ = _cli(common + ["--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    assert not torch.distributed.is_initialized()  # (and the 1-process run above never imported a group)
    two, _ = _cli(common + ["--out", str(tmp_path / "two"), "--nproc", "2"])
    assert two.returncode == 0, two.stdout + two.stderr
    r1, r2 = Results.read(tmp_path / "one"), Results.read(tmp_path / "two")
    assert r1.environment["world_size"] == 1 and r2.environment["world_size"] == 2
    assert r2.environment["backend"] == "gloo" and r2.status == "complete"
    m1, m2 = _numbers(r1), _numbers(r2)
    assert m1.keys() == m2.keys() and len(m1) > 100
    exact = [k for k in m1 if isinstance(m1[k], int) or "accuracy" in k or k.endswith(("/images", "/batches"))]
    assert len(exact) > 30 and {k: m2[k] for k in exact} == {k: m1[k] for k in exact}
    for k in m1:
        a, b = m1[k], m2[k]
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-5 * max(abs(a), abs(b), 1e-12), (k, a, b)
    # the third-party example plugin (ctx.shard + ctx.all_reduce) agrees too
    assert r2.plugins["resinspect_blockgain"].sections[0].metrics == pytest.approx(
        r1.plugins["resinspect_blockgain"].sections[0].metrics, rel=1e-6)
    # the run directory looks exactly like a one-process run's
    listing = lambda d: sorted(p.name for p in d.iterdir())  # noqa: E731
    assert listing(tmp_path / "two") == listing(tmp_path / "one")
    assert listing(tmp_path / "two" / "tb") == ["model", "twin"]
    # one summary (rank 0's), with the findings of the one-process run
    assert two.stdout.count("run complete") == 1
    findings = lambda out: [line for line in out.splitlines() if line.startswith("  [")]  # noqa: E731
    assert findings(two.stdout) == findings(one.stdout) and len(findings(one.stdout)) > 5


@pytest.mark.slow
def test_distributed_training_matches_one_process(tmp_path):
    """Without BatchNorm, two processes averaging their half-batch gradients take exactly the steps of one
    process on the whole batch: the losses agree to float rounding. (With BatchNorm each process normalises
    its own half-batch, and after an epoch resnet20's accuracy differs by a few points either way: measured
    -1.5, +1.3, -1.5 and -3.3 points for different seeds and machines, which is why no tolerance on it is
    tested.)"""
    common = ["run", "--model", "helpers:plain_net", "--epochs", "1", "--plugins", "gradflow", "--data", "digits",
              "--device", "cpu", "-q", "--batch-size", "16"]
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    one, _ = _cli(common + ["--out", str(tmp_path / "one")], env=env)
    two, _ = _cli(common + ["--out", str(tmp_path / "two"), "--nproc", "2"], env=env)
    assert one.returncode == 0 and two.returncode == 0, two.stdout + two.stderr
    r1, r2 = Results.read(tmp_path / "one"), Results.read(tmp_path / "two")
    l1, l2 = r1.training["model"]["step_losses"], r2.training["model"]["step_losses"]
    assert l2 == pytest.approx(l1, rel=1e-4, abs=1e-5)
    acc1 = r1.training["model"]["epochs"][-1]["test_accuracy"]
    acc2 = r2.training["model"]["epochs"][-1]["test_accuracy"]
    assert abs(acc1 - acc2) <= 0.003, (acc1, acc2)  # at most one test image of 397 on either side of a boundary
    # the global batch is --batch-size: the same number of optimiser steps, recorded once (rank 0) by gradflow
    steps = len(r1.training["model"]["step_losses"])
    assert len(r2.training["model"]["step_losses"]) == steps
    assert r2.metrics()["gradflow/model/recorded_steps"] == r1.metrics()["gradflow/model/recorded_steps"] == steps
    assert (tmp_path / "two" / "model.pt").is_file()


@pytest.mark.slow
def test_a_failing_rank_ends_the_run_with_its_error(checkpoint, tmp_path):
    plugin = tmp_path / "rankbomb.py"
    plugin.write_text(
        "import torch\nfrom resinspect import Section, hookimpl\n\n"
        "@hookimpl\ndef resinspect_analyze(ctx):\n"
        "    if ctx.rank == 1:\n        raise RuntimeError('rank 1 exploded')\n"
        "    ctx.all_reduce(torch.ones(3))  # rank 0 waits here for rank 1, which never comes\n"
        "    return Section('never')\n")
    proc, seconds = _cli(["run", "--checkpoint", str(checkpoint), "--epochs", "0", "--plugins",
                          f"summary,{plugin}", *DATA, "-q", "--out", str(tmp_path / "run"), "--nproc", "2"],
                         timeout=180, env={"RESINSPECT_DIST_TIMEOUT": "120"})
    assert proc.returncode == 1
    assert seconds < 90  # ended by the failure, not by the collective's timeout
    assert "rank 1 failed" in proc.stderr and "rank 1 exploded" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and "rank 1 exploded" in results["error"]


@pytest.mark.slow
def test_a_rank_that_fails_while_rank_0_finishes_still_fails_the_run(checkpoint, tmp_path):
    """Rank 1 raises in a plugin that makes no collective call, so rank 0 runs on to the end: the failure must
    still reach rank 0's results.json and report, naming the rank (issue 21)."""
    plugin = tmp_path / "quietbomb.py"
    plugin.write_text(
        "from resinspect import Section, hookimpl\n\n"
        "@hookimpl\ndef resinspect_analyze(ctx):\n"
        "    if ctx.rank == 1:\n        raise RuntimeError('only rank 1 exploded')\n"
        "    return Section('fine on rank 0')\n")
    proc, _ = _cli(["run", "--checkpoint", str(checkpoint), "--epochs", "0", "--plugins",
                    f"{plugin},summary", *DATA, "-q", "--out", str(tmp_path / "run"), "--nproc", "2"], timeout=180)
    assert proc.returncode == 1 and "rank 1 failed" in proc.stderr and "only rank 1 exploded" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and "rank 1" in results["error"] and "only rank 1 exploded" in results["error"]
    page = tmp_path / "run" / "index.html"
    assert not page.exists() or "Report complete." not in page.read_text()
    assert "run complete" not in proc.stdout


def test_batch_size_must_divide_among_processes(checkpoint, tmp_path):
    proc, _ = _cli(["run", "--checkpoint", str(checkpoint), "--epochs", "1", "--plugins", "summary", *DATA, "-q",
                    "--batch-size", "63", "--out", str(tmp_path / "run"), "--nproc", "2"], timeout=180)
    assert proc.returncode == 1 and "--batch-size 63 is not divisible by the 2 processes" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plain_torchrun_runs_the_same_command_line(checkpoint, tmp_path):
    """`torchrun --nproc-per-node 2 -m resinspect run ...`, started by hand; each rank says its own error."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "resinspect",
           "run", "--checkpoint", str(checkpoint), "--epochs", "0", "--plugins", "summary", *DATA, "-q"]
    ok = subprocess.run(cmd + ["--out", str(tmp_path / "ok")], capture_output=True, text=True, timeout=180,
                        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ok.returncode == 0, ok.stderr
    r = Results.read(tmp_path / "ok")
    assert r.status == "complete" and r.environment["world_size"] == 2 and ok.stdout.count("run complete") == 1
    bad = subprocess.run(cmd + ["--out", str(tmp_path / "bad"), "--sync-bn", "--epochs", "1"], capture_output=True,
                         text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert bad.returncode != 0 and "--sync-bn needs CUDA" in bad.stderr
    # rank 1 fails in a plugin while rank 0 would finish: without our launcher, rank 0 still records the failure
    plugin = tmp_path / "quietbomb.py"
    plugin.write_text("from resinspect import Section, hookimpl\n\n@hookimpl\ndef resinspect_analyze(ctx):\n"
                      "    if ctx.rank == 1:\n        raise RuntimeError('only rank 1 exploded')\n"
                      "    return Section('fine on rank 0')\n")
    cmd[cmd.index("summary")] = f"{plugin},summary"
    quiet = subprocess.run(cmd + ["--out", str(tmp_path / "quiet")], capture_output=True, text=True, timeout=180,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert quiet.returncode != 0 and "only rank 1 exploded" in quiet.stderr
    results = json.loads((tmp_path / "quiet" / "results.json").read_text())
    assert results["status"] == "failed" and "another rank failed" in results["error"]
    assert not (tmp_path / "quiet" / "index.html").exists()


def test_sync_batchnorm_shares_the_tensors_and_gives_the_modules_back():
    from resinspect.training import sync_batchnorm

    model = resinspect.build_model("resnet8", in_channels=1)
    modules = dict(model.named_modules())
    tensors = {k: v.data_ptr() for k, v in model.state_dict().items()}
    restore = sync_batchnorm(model)
    synced = [m for m in model.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert len(synced) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in modules.values()) > 0
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == tensors  # same parameters and statistics
    restore()
    assert dict(model.named_modules()) == modules
