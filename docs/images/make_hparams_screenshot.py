"""Make docs/images/tensorboard-hparams.png: TensorBoard's HParams table for a 2-depth sweep, in headless
chromium (Debian's, as the browser tests use). Run from the repository root:

    python docs/images/make_hparams_screenshot.py

It trains resnet8 and resnet20 with their plain twins on digits (3 epochs, about a minute on 2 cores),
serves the sweep folder with the real TensorBoard and screenshots the table."""

import io
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

import resinspect

OUT = Path(__file__).resolve().parent / "tensorboard-hparams.png"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "sweep"
        resinspect.sweep(["resnet8", "resnet20"], [0], out=root, settings=resinspect.RunSettings(
            twin=True, epochs=3, plugins=["ablation"], device="cpu"))
        proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(root), "--host",
                                 "127.0.0.1", "--port", "0", "--load_fast", "false"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            url = None
            while url is None:
                line = proc.stdout.readline()
                if not line and proc.poll() is not None:
                    sys.exit("tensorboard did not start")
                m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
                url = m.group(1) if m else None
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
                page = browser.new_page(viewport={"width": 1500, "height": 330})
                page.goto(url + "#hparams")
                page.get_by_text("plain20", exact=True).first.wait_for(timeout=60_000)
                for column in ("data", "epochs"):  # room for the metrics
                    page.get_by_role("checkbox", name=column, exact=True).uncheck()
                time.sleep(1)
                png = page.screenshot()
                browser.close()
        finally:
            proc.kill()
    Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=32).save(OUT, optimize=True)  # a small PNG
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
