"""The web page in a real headless browser (Debian's chromium driven by Playwright).

The service runs on a free loopback port with a tiny model; the browser uploads a photo, types a
caption, predicts, opens the "why" view for a predicted label, and saves a screenshot. The same
flow runs on a photo of the real data set when ../shared is present.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from conftest import shared_data_or_skip
from test_serve import CAPTION, serving, train_tiny_model

from fuselabel.serve import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="/usr/bin/chromium is absent (Debian: apt-get install chromium)")


@pytest.fixture(scope="module")
def service(tmp_path_factory, session_cache):
    image_dir, model = train_tiny_model(tmp_path_factory.mktemp("browser"), session_cache)
    with serving(create_app(model)) as url:
        yield url, image_dir


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _real_row() -> tuple[Path, str]:
    from fuselabel.records import read_records

    data = shared_data_or_skip("the page on a real photo")
    record = read_records(data / "train.csv").records[0]
    return data / "data" / record.image_id, record.caption


@pytest.mark.parametrize("source", ["tiny", "real"])
def test_predict_and_explain_in_the_page(service, browser, source, tmp_path):
    url, image_dir = service
    photo, caption = (image_dir / "5.jpg", CAPTION) if source == "tiny" else _real_row()
    expected = httpx.post(f"{url}/predict", data={"caption": caption},
                          files={"image": (photo.name, photo.read_bytes(), "image/jpeg")}, timeout=60).json()

    page = browser.new_page(viewport={"width": 1000, "height": 760})
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(url)
    page.set_input_files("#photo-input", str(photo))
    page.fill("#caption", caption)
    page.click("#predict-button")
    page.wait_for_selector("#bars .bar-row")

    assert page.locator("#bars .bar-row").count() == len(expected["labels"])
    shown = page.locator("#predicted .chip").all_inner_texts()
    assert shown == [lab["name"] for lab in expected["predicted"]]
    assert page.locator("#bars .bar-row.predicted").count() == len(expected["predicted"])
    assert page.locator("#bars .bar-threshold").count() == len(expected["labels"])

    label = expected["predicted"][0]["id"]
    page.click(f".why-button[data-label='{label}']")
    page.wait_for_function("() => { const h = document.getElementById('heatmap');"
                           " return !h.hidden && h.complete && h.naturalWidth > 0; }")
    assert page.locator("#why-label").inner_text() == expected["predicted"][0]["name"]
    shades = page.eval_on_selector_all("#words .word", "els => els.map(e => getComputedStyle(e).backgroundColor)")
    assert len(shades) == len(caption.split())
    assert all(s not in ("", "transparent", "rgba(0, 0, 0, 0)") for s in shades), shades
    # The overlay is drawn over the photo at the photo's shown size.
    photo_box, heat_box = page.locator("#photo").bounding_box(), page.locator("#heatmap").bounding_box()
    assert photo_box["width"] > 0 and heat_box == pytest.approx(photo_box, abs=1)
    assert not errors, errors

    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 0
    page.close()


def test_caption_only_and_photo_only(service, browser):
    url, image_dir = service
    page = browser.new_page()
    page.goto(url)
    page.fill("#caption", CAPTION)
    page.click("#predict-button")
    page.wait_for_selector("#bars .bar-row")
    assert page.locator("#status").inner_text() == "from the caption only"
    page.locator(".why-button").first.click()
    page.wait_for_selector("#words .word[data-score]")
    assert page.locator("#why-heat").is_hidden() and page.locator("#heatmap").is_hidden()

    page.fill("#caption", "")
    page.set_input_files("#photo-input", str(image_dir / "7.jpg"))
    page.click("#predict-button")
    page.wait_for_function("() => document.getElementById('status').textContent === 'from the photo only'")
    page.locator(".why-button").first.click()
    page.wait_for_function("() => document.getElementById('heatmap').naturalWidth > 0")
    assert page.locator("#why-words").is_hidden()
    page.close()


def test_page_reports_a_client_error(service, browser):
    url, _ = service
    page = browser.new_page()
    page.goto(url)
    page.set_input_files("#photo-input", files=[{"name": "notes.jpg", "mimeType": "image/jpeg",
                                                 "buffer": b"these are notes, not a photo"}])
    page.click("#predict-button")
    page.wait_for_function("() => document.getElementById('message').textContent.startsWith('415')")
    assert page.locator("#result-panel").is_hidden()
    page.close()
