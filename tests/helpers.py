"""Small models for tests."""

import torch
from torch import nn


class UserBlock(nn.Module):
    """A residual block as a user would write it: nothing registered anywhere."""

    def __init__(self, width: int):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                               nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x):
        return x + self.f(x)


class UserResNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8, depth: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.body = nn.Sequential(*[UserBlock(width) for _ in range(depth)])
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.body(torch.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def user_resnet(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    return UserResNet(in_channels, num_classes)


def plain_net(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """No residual block anywhere."""
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))


from resinspect.testing import hook_count, overridden_forwards  # noqa: E402,F401


def chromium():
    """The path of Debian's chromium for the browser tests (a failure in CI, where .ci/run installs it)."""
    import os

    import pytest

    for path in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if os.path.exists(path):
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed; .ci/run installs it")
    pytest.skip("chromium not installed (apt-get install chromium)")


def open_in_browser(page_path, check):
    """Open ``page_path`` in headless chromium; assert no console or page errors and that every image
    decodes; then call ``check(page)``. Returns the number of images."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        try:
            page = browser.new_page()
            errors = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            assert errors == []
            images = page.eval_on_selector_all("img", "els => els.map(e => e.complete && e.naturalWidth > 0)")
            assert images and all(images), images
            check(page)
            return len(images)
        finally:
            browser.close()


class TensorBoardServer:
    """The real TensorBoard server on ``logdir`` (a subprocess on 127.0.0.1, a free port), with ``get`` and
    ``post`` for its JSON API; stopped on exit."""

    def __init__(self, logdir):
        self.logdir = logdir

    def __enter__(self):
        import re
        import subprocess
        import sys
        import time

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(self.logdir), "--host", "127.0.0.1",
             "--port", "0", "--load_fast", "false", "--reload_interval", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline, lines = time.time() + 120, []
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            lines.append(line)
            m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
            if m:
                self.url = m.group(1)
                return self
            if not line and self.proc.poll() is not None:
                break
        self.proc.kill()
        raise AssertionError("tensorboard did not start:\n" + "".join(lines))

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()

    def get(self, path):
        import json
        import urllib.request

        return json.loads(urllib.request.urlopen(self.url + path.lstrip("/"), timeout=60).read())

    def post(self, path, body):
        import json
        import urllib.request

        req = urllib.request.Request(self.url + path.lstrip("/"), data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"})
        return json.loads(urllib.request.urlopen(req, timeout=60).read())

    def session_groups(self):
        """Every HParams session group, as the HParams tab asks for them."""
        statuses = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
        return self.post("/data/plugin/hparams/session_groups", {
            "experimentName": "", "allowedStatuses": statuses, "startIndex": 0, "sliceSize": 1000,
            "colParams": []})["sessionGroups"]


def write_image_folder(root, classes, per_class: int, height: int, width: int, seed: int, split: str = "val"):
    """An ImageFolder of random RGB JPEGs: ``root/split/<class>/<i>.jpg``, image ``i`` of each class
    ``height + i`` by ``width`` pixels (odd sizes, as real photos), drawn from one seeded generator in class
    order. Returns ``root``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in classes:
        (root / split / name).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 255, (height + i, width, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / split / name / f"{i}.jpg")
    return root
