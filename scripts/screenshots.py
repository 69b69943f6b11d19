"""The README's pictures of the web page, made again from a model and one row.

    python scripts/screenshots.py --model MODEL_DIR --photo PHOTO.jpg --caption "..." [--out docs]

Starts ``fuselabel serve MODEL`` on a free loopback port, opens its page in Debian's chromium (headless, through
Playwright) at 1280 px and at 390 px, sends the photo and caption, opens "why" for the most probable label, and
saves the whole page as ``web-page.png`` and ``web-page-phone.png``.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
VIEWPORTS = {"web-page.png": (1280, 800), "web-page-phone.png": (390, 844)}


def _serve(model: str):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "fuselabel.cli", "serve", model, "--port", str(port)])
    url = f"http://127.0.0.1:{port}/"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "health", timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"fuselabel serve {model} stopped") from None
            time.sleep(0.1)
    raise SystemExit(f"fuselabel serve {model} did not answer in 60 s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--photo", required=True)
    ap.add_argument("--caption", required=True)
    ap.add_argument("--out", default="docs", help="folder for the two pictures")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    proc, url = _serve(args.model)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            for name, (width, height) in VIEWPORTS.items():
                page = browser.new_page(viewport={"width": width, "height": height})
                page.goto(url)
                page.wait_for_function("() => document.getElementById('model-id').textContent !== ''")
                page.set_input_files("#photo-input", args.photo)
                page.fill("#caption", args.caption)
                page.click("#predict-button")
                page.wait_for_selector("#bars .bar-row")
                page.locator(".why-button").first.click()
                page.wait_for_selector("#words .word[data-score]")
                page.wait_for_function("() => document.getElementById('why-heatmap').naturalWidth > 0")
                page.screenshot(path=str(Path(args.out) / name), full_page=True)
                print(f"wrote {Path(args.out) / name}")
                page.close()
            browser.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
