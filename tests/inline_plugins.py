"""Small plugins written inline for host tests."""

from resinspect import Section, StashKey, hookimpl

COUNT = StashKey[dict]()


class Counter:
    """Counts training hook calls and reports them."""

    @hookimpl
    def resinspect_addoptions(self, options):
        options.add("scale", float, 1.0, "multiplier for the reported count")
        options.add("label", str, "steps", "name of the metric", choices=["steps", "calls"])

    @hookimpl
    def resinspect_configure(self, ctx):
        ctx.stash[COUNT] = {"steps": 0, "epochs": 0}

    @hookimpl
    def resinspect_after_backward(self, ctx, step):
        ctx.stash[COUNT]["steps"] += 1

    @hookimpl
    def resinspect_epoch_end(self, ctx, epoch):
        ctx.stash[COUNT]["epochs"] += 1
        ctx.log_scalar("epoch_test_accuracy", epoch.metrics["test_accuracy"], epoch.epoch, role=epoch.role)

    @hookimpl
    def resinspect_analyze(self, ctx):
        opts = ctx.options("counter")
        s = Section("Counter", explanation="Counts hook calls.\n\nSecond paragraph.")
        s.metrics[opts["label"]] = ctx.stash[COUNT]["steps"] * opts["scale"]
        s.metrics["epochs"] = ctx.stash[COUNT]["epochs"]
        s.finding(f"saw {ctx.stash[COUNT]['steps']} steps", "good")
        s.table("Steps", ["what", "count"], [["steps", ctx.stash[COUNT]["steps"]]])
        return s


class Crasher:
    """Raises in analyze."""

    @hookimpl
    def resinspect_analyze(self, ctx):
        raise RuntimeError("crasher exploded <b>on purpose</b>")


class TrainCrasher:
    """Raises during training; its unconfigure still runs."""

    def __init__(self):
        self.unconfigured = False
        self.calls = 0

    @hookimpl
    def resinspect_after_backward(self, ctx, step):
        self.calls += 1
        raise ValueError("bad gradient bookkeeping")

    @hookimpl
    def resinspect_analyze(self, ctx):
        return Section("never")

    @hookimpl
    def resinspect_unconfigure(self, ctx):
        self.unconfigured = True


class Evil:
    """Puts markup everywhere."""

    @hookimpl
    def resinspect_analyze(self, ctx):
        s = Section("<script>alert('title')</script>", explanation="<img src=x onerror=alert(1)>")
        s.finding("<script>alert('finding')</script>", "warning")
        s.table("<b>t</b>", ["<i>c</i>"], [["<script>cell</script>"]])
        s.metrics["<m>"] = "<script>v</script>"
        return s
