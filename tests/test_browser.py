"""The web page in a real headless browser (Debian's chromium driven by Playwright), at 1280 px and 390 px.

The service runs on a free loopback port with a tiny model; the browser uploads a photo, types a
caption, predicts, opens the "why" view for a predicted label, and saves a screenshot. The same
flow runs on a photo of the real data set when ../shared is present. Slow or failing answers are made
in the page (a wrapped ``fetch``, or Playwright's routing), so the order in which answers arrive is set
by the test, not by timing luck.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from conftest import needs_chromium, shared_data_or_skip
from test_serve import CAPTION, serving, train_tiny_model

from fuselabel.config import ServeSettings
from fuselabel.serve import create_app

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, session_cache):
    return train_tiny_model(tmp_path_factory.mktemp("browser"), session_cache)


@pytest.fixture(scope="module")
def service(tiny):
    image_dir, model = tiny
    with serving(create_app(model)) as url:
        yield url, image_dir


PAGE_KEY = "page-key-123"


@pytest.fixture(scope="module")
def keyed_service(tiny, session_cache):
    """The same model behind an API key."""
    image_dir, model = tiny
    with serving(create_app(model, ServeSettings(api_key=PAGE_KEY), cache_dir=session_cache)) as url:
        yield url, image_dir


def _real_row() -> tuple[Path, str]:
    from fuselabel.records import read_records

    data = shared_data_or_skip("the page on a real photo")
    record = read_records(data / "train.csv").records[0]
    return data / "data" / record.image_id, record.caption


WIDTHS = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}
ROUNDED = re.compile(r"^(\d{1,3}\.\d|<0\.1)%$")


def _open(browser, url, viewport="desktop"):
    page = browser.new_page(viewport=WIDTHS[viewport])
    page.errors = []
    page.on("pageerror", lambda err: page.errors.append(str(err)))
    page.goto(url)
    page.wait_for_function("() => document.getElementById('model-id').textContent !== ''")
    return page


def _predict(page, photo=None, caption=None):
    if photo is not None:
        page.set_input_files("#photo-input", str(photo))
        page.wait_for_selector("#photo-frame:not([hidden])")
    if caption is not None:
        page.fill("#caption", caption)
    page.click("#predict-button")
    page.wait_for_selector("#bars .bar-row")


def _slow_first(page, path: str, ms: int = 1500):
    """The page's first answer from ``path`` is held back ``ms`` after it arrives (later ones are not). The page
    fetches paths relative to itself ("explain"), so a leading "/" is dropped: "/explain" once matched nothing."""
    path = path.lstrip("/")
    page.evaluate(
        """([path, ms]) => {
        const real = window.fetch;
        let held = false;
        window.fetch = async (url, opts) => {
            const answer = await real(url, opts);
            if (String(url).endsWith(path) && !held) { held = true; await new Promise(r => setTimeout(r, ms)); }
            return answer;
        };
    }""",
        [path, ms],
    )


@pytest.mark.parametrize("viewport", ["desktop", "phone"])
@pytest.mark.parametrize("source", ["tiny", "real"])
def test_predict_and_explain_in_the_page(service, browser, source, viewport, tmp_path):
    url, image_dir = service
    photo, caption = (image_dir / "5.jpg", CAPTION) if source == "tiny" else _real_row()
    expected = httpx.post(
        f"{url}/predict",
        data={"caption": caption},
        files={"image": (photo.name, photo.read_bytes(), "image/jpeg")},
        timeout=60,
    ).json()
    by_probability = sorted(expected["labels"], key=lambda lab: -lab["probability"])

    page = _open(browser, url, viewport)
    _predict(page, photo, caption)

    assert page.locator("#bars .bar-row").count() == len(expected["labels"])
    assert page.locator("#bars .bar-name").all_inner_texts() == [lab["name"] for lab in by_probability]
    # The chips are the predicted labels in the bars' order, and every figure is rounded.
    assert page.locator("#predicted .chip").all_inner_texts() == [
        lab["name"] for lab in by_probability if lab["predicted"]
    ]
    values = [v.splitlines()[0] for v in page.locator("#bars .bar-value").all_inner_texts()]
    assert all(ROUNDED.match(v) for v in values), values
    assert page.locator("#bars .bar-row.predicted").count() == len(expected["predicted"])
    assert page.locator("#bars .bar-threshold").count() == len(expected["labels"])

    # "why" for the last row: on a phone it is far below the panel, which must scroll into view.
    target = by_probability[-1]
    page.click(f".why-button[data-label='{target['id']}']")
    page.wait_for_function(
        "() => { const h = document.getElementById('heatmap'); return !h.hidden && h.complete && h.naturalWidth > 0; }"
    )
    page.wait_for_function(
        "() => { const r = document.getElementById('why-panel').getBoundingClientRect();"
        " return r.top >= 0 && r.top < window.innerHeight / 2; }",
        timeout=5000,
    )
    assert page.locator("#why-label").inner_text() == target["name"]
    # Each head's probability and the rule that combined them, as the API gives them.
    heads = page.locator("#why-heads li").all_inner_texts()
    assert heads[0].startswith("photo head: ") and heads[1].startswith("caption head: ")
    assert heads[2].startswith(f"combined: {_percent(target['probability'])}")
    for part, text in zip(("image", "text"), heads):
        assert text.endswith(_percent(target["parts"][part])), (part, text)
    assert "photo head" in page.locator("#why-rule").inner_text()
    heat_text = page.locator("#heat-target").inner_text()
    assert "relative" in heat_text and f"photo head gives this label {_percent(target['parts']['image'])}" in heat_text
    shades = page.eval_on_selector_all("#words .word", "els => els.map(e => getComputedStyle(e).backgroundColor)")
    assert len(shades) == len(caption.split())
    assert all(s not in ("", "transparent", "rgba(0, 0, 0, 0)") for s in shades), shades
    # The overlay is drawn over the photo at the photo's shown size.
    photo_box, heat_box = page.evaluate(
        "() => ['photo', 'heatmap'].map(id => { const r = "
        "document.getElementById(id).getBoundingClientRect();"
        " return [r.x, r.y, r.width, r.height]; })"
    )
    assert photo_box[2] > 0 and heat_box == pytest.approx(photo_box, abs=1)
    assert page.evaluate("() => document.documentElement.scrollWidth") <= WIDTHS[viewport]["width"]
    assert not page.errors, page.errors

    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 0
    page.close()


@pytest.mark.parametrize("viewport", ["desktop", "phone"])
@pytest.mark.parametrize("shared", [True, False])
def test_thresholds_and_the_models_figures_are_in_view_without_hovering(service, browser, viewport, shared):
    """A phone shows no tooltips: the legend gives a threshold every label shares, or each bar its own; the header's
    validation figure names its rows and shows the macro F1 beside the mean."""
    url, image_dir = service
    page = _open(browser, url, viewport)
    validation = httpx.get(f"{url}/info").json()["validation"]
    header = page.locator("#model-id").inner_text()
    assert f"validation mean F1 {validation['mean_f1']:.3f}" in header
    assert f"macro {validation['macro_f1']:.3f}" in header and f"on {validation['rows']:,} rows" in header

    def own_thresholds(route):
        answer = route.fetch().json()
        for i, lab in enumerate(answer["labels"]):
            lab["threshold"] = 0.2 + 0.1 * i
        route.fulfill(json=answer)

    if not shared:
        page.route("**/predict", own_thresholds)
    _predict(page, image_dir / "5.jpg", CAPTION)
    legend = page.locator(".legend").first.inner_text()
    figures = page.locator("#bars .bar-threshold-value").all_inner_texts()
    if shared:
        threshold = httpx.get(f"{url}/labels").json()["labels"][0]["threshold"]
        assert f"{_percent(threshold)} for every label" in legend and figures == []
    else:
        assert "its figure under the probability" in legend
        names = page.locator("#bars .bar-name").all_inner_texts()
        assert len(figures) == len(names) and all(f.startswith("≥ ") and ROUNDED.match(f[2:]) for f in figures)
    assert not page.errors
    page.close()


def _percent(p: float) -> str:
    """As the page writes a probability."""
    return "<0.1%" if 0 < 100 * p < 0.1 else f"{100 * p:.1f}%"


def test_phone_layout(service, browser):
    """At 390 px: each label's name above a bar the width of the row, and 44 px targets."""
    url, image_dir = service
    page = _open(browser, url, "phone")
    _predict(page, image_dir / "5.jpg", CAPTION)
    rows = page.locator("#bars .bar-row")
    for i in range(rows.count()):
        row = rows.nth(i)
        row_box = row.bounding_box()
        name, track = row.locator(".bar-name").bounding_box(), row.locator(".bar-track").bounding_box()
        why = row.locator(".why-button").bounding_box()
        assert name["y"] + name["height"] <= track["y"] + 1, "the label is not above its bar"
        assert track["width"] >= 0.9 * row_box["width"], (track, row_box)
        assert why["height"] >= 44 and why["width"] >= 44, why
    assert page.locator("#predict-button").bounding_box()["height"] >= 44
    assert page.locator("#clear-photo").bounding_box()["height"] >= 44
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
    page.close()


def test_caption_only_and_photo_only(service, browser):
    url, image_dir = service
    page = _open(browser, url)
    _predict(page, caption=CAPTION)
    assert page.locator("#status").inner_text() == "from the caption only"
    page.locator(".why-button").first.click()
    page.wait_for_selector("#words .word[data-score]")
    assert page.locator("#why-heat").is_hidden() and page.locator("#heatmap").is_hidden()
    assert "not used" in page.locator("#why-heads li[data-part='image']").inner_text()

    page.fill("#caption", "")
    page.set_input_files("#photo-input", str(image_dir / "7.jpg"))
    page.wait_for_selector("#photo-frame:not([hidden])")
    page.click("#predict-button")
    page.wait_for_function("() => document.getElementById('status').textContent === 'from the photo only'")
    page.locator(".why-button").first.click()
    page.wait_for_function("() => document.getElementById('heatmap').naturalWidth > 0")
    assert page.locator("#why-words").is_hidden()
    page.close()


def test_a_why_asked_while_the_explaining_model_loads_says_so(service, browser):
    url, image_dir = service
    page = _open(browser, url, "phone")
    _predict(page, image_dir / "5.jpg", CAPTION)
    page.route("**/health", lambda route: route.fulfill(json={**route.fetch().json(), "explainer": "loading"}))
    _slow_first(page, "explain", 3000)
    page.locator(".why-button").first.click()
    page.wait_for_function("() => document.getElementById('message').textContent.includes('still loading')")
    assert page.locator(".why-button[aria-busy='true']").count() == 1
    page.wait_for_selector("#why-panel:not([hidden])", timeout=30_000)
    assert page.locator("#message").inner_text() == ""
    assert not page.errors, page.errors
    page.close()


def test_a_late_why_answer_is_not_drawn_over_a_newer_prediction(service, browser):
    url, image_dir = service
    page = _open(browser, url)
    _predict(page, image_dir / "5.jpg", CAPTION)
    _slow_first(page, "explain")
    page.locator(".why-button").first.click()  # its answer is held back 1.5 s
    page.set_input_files("#photo-input", str(image_dir / "7.jpg"))
    assert page.locator("#result-panel").is_hidden()  # new input: the old results go at once
    page.fill("#caption", "a kite")
    page.click("#predict-button")
    page.wait_for_selector("#bars .bar-row")
    page.wait_for_timeout(2500)  # the held "why" answer has arrived by now
    assert page.locator("#why-panel").is_hidden()
    assert page.locator("#heatmap").is_hidden() and page.locator("#heatmap").get_attribute("src") is None
    assert page.locator("#message").inner_text() == ""
    assert not page.errors, page.errors
    page.close()


def test_a_late_prediction_is_not_drawn_over_a_newer_one(service, browser):
    url, image_dir = service
    page = _open(browser, url)
    _slow_first(page, "predict")
    page.fill("#caption", CAPTION)
    page.click("#predict-button")  # caption only; held back 1.5 s
    page.set_input_files("#photo-input", str(image_dir / "5.jpg"))
    page.wait_for_selector("#photo-frame:not([hidden])")
    page.click("#predict-button")  # photo and caption; answered at once
    page.wait_for_selector("#bars .bar-row")
    page.wait_for_timeout(2500)
    assert page.locator("#status").inner_text() == "from the photo and the caption"
    page.close()


def test_an_error_clears_the_old_results(service, browser):
    url, image_dir = service
    page = _open(browser, url)
    _predict(page, image_dir / "5.jpg", CAPTION)
    page.route(
        "**/predict",
        lambda route: route.fulfill(
            status=503,
            headers={"Retry-After": "3"},
            content_type="application/json",
            body='{"detail": "busy: 4 at work and 32 waiting"}',
        ),
    )
    page.click("#predict-button")
    page.wait_for_function("() => document.getElementById('message').className === 'error'")
    assert page.locator("#message").inner_text() == "The service is busy: try again in 3 seconds."
    assert page.locator("#result-panel").is_hidden() and page.locator("#bars .bar-row").count() == 0
    page.close()


def test_the_browser_checks_a_file_before_sending_it(service, browser):
    url, _ = service
    page = _open(browser, url)
    sent = []
    page.on("request", lambda r: sent.append(r.url) if r.method == "POST" else None)
    page.set_input_files("#photo-input", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"notes"}])
    assert "choose a JPEG, PNG, WebP, GIF or BMP file" in page.locator("#message").inner_text()
    page.set_input_files(
        "#photo-input", files=[{"name": "huge.jpg", "mimeType": "image/jpeg", "buffer": b"\xff" * 11_000_000}]
    )
    assert "over the 10 MB limit" in page.locator("#message").inner_text()
    page.set_input_files(
        "#photo-input",
        files=[{"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"these are notes, not a photo"}],
    )
    page.wait_for_function("() => document.getElementById('message').textContent.includes('could not be opened')")
    assert page.locator("#photo-frame").is_hidden()  # no broken-image icon
    assert not sent, sent
    page.close()


def test_a_refused_photo_gets_a_human_message(service, browser):
    """A photo the browser opens but the service refuses (415): what to do, not a status code."""
    url, image_dir = service
    page = _open(browser, url)
    page.route(
        "**/predict",
        lambda route: route.fulfill(
            status=415, content_type="application/json", body='{"detail": "image: too large: 30 megapixels"}'
        ),
    )
    page.set_input_files("#photo-input", str(image_dir / "5.jpg"))
    page.wait_for_selector("#photo-frame:not([hidden])")
    page.click("#predict-button")
    page.wait_for_function("() => document.getElementById('message').className === 'error'")
    message = page.locator("#message").inner_text()
    assert message.startswith("The service could not read this file as a photo") and "415" not in message
    assert page.locator("#result-panel").is_hidden()
    page.close()


def test_docs_render_offline(service, browser):
    """/docs draws the API from the service's own copy of Swagger UI, with every other host blocked."""
    url, _ = service
    page = browser.new_page()
    outside = []

    def only_local(route):
        if route.request.url.startswith(url):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    page.route("**/*", only_local)
    page.goto(f"{url}/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=20000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert {"/predict", "/predict/batch", "/explain", "/metrics"} <= {p.strip() for p in paths}
    assert not outside, outside
    page.close()


@pytest.mark.parametrize("viewport", ["desktop", "phone"])
def test_a_keyed_service_asks_for_its_key_and_keeps_it_in_the_tab(keyed_service, browser, viewport):
    url, image_dir = keyed_service
    context = browser.new_context(viewport=WIDTHS[viewport])
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#key-row:not([hidden])")
    assert page.locator("#model-id").inner_text() == ""  # /info wants the key too
    page.fill("#caption", CAPTION)
    page.click("#predict-button")
    page.wait_for_function("() => document.getElementById('message').className === 'error'")
    assert page.locator("#message").inner_text().startswith("This service wants its API key")
    assert page.locator("#result-panel").is_hidden()

    page.fill("#api-key", PAGE_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("() => document.getElementById('model-id').textContent !== ''")
    _predict(page, image_dir / "5.jpg", CAPTION)
    assert page.locator("#bars .bar-row").count() == 4
    box = page.locator("#api-key").bounding_box()
    assert box["width"] <= WIDTHS[viewport]["width"] and box["height"] >= 30
    assert page.evaluate("() => document.documentElement.scrollWidth") <= WIDTHS[viewport]["width"]
    assert page.evaluate("() => sessionStorage.getItem('fuselabel-api-key')") == PAGE_KEY
    assert page.evaluate("() => localStorage.length") == 0  # never kept beyond the tab's session
    page.reload()
    page.wait_for_function("() => document.getElementById('model-id').textContent !== ''")
    assert page.locator("#api-key").input_value() == PAGE_KEY
    context.close()
    other = browser.new_context().new_page()  # another session: no key
    other.goto(url)
    other.wait_for_selector("#key-row:not([hidden])")
    assert other.locator("#api-key").input_value() == ""
    other.context.close()


def test_an_open_service_shows_no_key_field(service, browser):
    page = _open(browser, service[0])
    assert page.locator("#key-row").is_hidden()
    page.close()


@pytest.mark.parametrize("viewport", ["desktop", "phone"])
def test_enter_predicts_shift_enter_breaks_the_line_and_buttons_show_they_are_busy(service, browser, viewport):
    url, _ = service
    page = _open(browser, url, viewport)
    # Answers held back until the test lets them go: the busy state is seen, not raced.
    page.evaluate(
        """() => {
        const real = window.fetch;
        window.release = null;
        window.fetch = async (url, opts) => {
            const answer = await real(url, opts);
            if (String(url).endsWith("predict") || String(url).endsWith("explain")) {
                await new Promise((r) => { window.release = r; });
            }
            return answer;
        };
    }"""
    )
    page.click("#caption")
    page.keyboard.type("a dog")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("and a kite")
    assert page.locator("#caption").input_value() == "a dog\nand a kite"
    assert page.locator("#bars .bar-row").count() == 0  # Shift+Enter sent nothing
    page.keyboard.press("Enter")
    page.wait_for_selector("#predict-button[aria-busy='true']")
    assert page.locator("#caption").input_value() == "a dog\nand a kite"  # Enter added no line
    page.wait_for_function("() => window.release !== null")
    page.evaluate("() => window.release()")
    page.wait_for_selector("#bars .bar-row")
    assert page.locator("#predict-button").get_attribute("aria-busy") == "false"

    why = page.locator(".why-button").first
    page.evaluate("() => { window.release = null; }")
    why.click()
    page.wait_for_function("() => document.querySelector('.why-button').getAttribute('aria-busy') === 'true'")
    assert page.locator("[aria-busy='true']").count() == 1
    page.wait_for_function("() => window.release !== null")
    page.evaluate("() => window.release()")
    page.wait_for_selector("#why-panel:not([hidden])")
    assert page.locator("[aria-busy='true']").count() == 0
    assert page.locator("#caption-hint").is_visible()
    assert not page.errors, page.errors
    page.close()


@pytest.mark.parametrize("viewport", ["desktop", "phone"])
def test_the_page_says_what_each_input_weighs(service, browser, viewport):
    url, image_dir = service
    fusion = httpx.get(f"{url}/info").json()["fusion"]
    page = _open(browser, url, viewport)
    _predict(page, image_dir / "5.jpg", CAPTION)
    shown = page.locator("#fusion").inner_text()
    if fusion["image_weight"] is None:
        assert shown == ""
    else:
        assert shown == f"photo weight {fusion['image_weight']:.2f} · caption weight {1 - fusion['image_weight']:.2f}"
    assert page.locator("#no-photo-notice").is_hidden()

    def photo_weight_zero(route):  # a model whose tuned photo weight is 0, as the service would describe it
        answer = route.fetch().json()
        answer["fusion"] = {**answer["fusion"], "combine": "weighted", "image_weight": 0.0, "reads": "caption only"}
        route.fulfill(json=answer)

    page.route("**/predict", photo_weight_zero)
    _predict(page, caption=CAPTION + " again")
    page.wait_for_selector("#no-photo-notice:not([hidden])")
    assert page.locator("#fusion").inner_text() == "photo weight 0.00 · caption weight 1.00"
    assert "does not use photos" in page.locator("#no-photo-notice").inner_text()
    assert page.evaluate("() => document.documentElement.scrollWidth") <= WIDTHS[viewport]["width"]
    page.close()


def test_words_past_the_token_limit_are_struck_and_counted(service, browser):
    url, _ = service
    page = _open(browser, url, "phone")
    _predict(page, caption=" ".join(["dog"] * 300))
    page.locator(".why-button").first.click()
    page.wait_for_selector("#words .word[data-score]")
    words = page.locator("#words .word").count()
    unread = page.locator("#words .word.unread").count()
    assert words == 300 and 0 < unread < words
    legend = page.locator("#words-target").inner_text()
    assert f"read {words - unread} of the caption's {words} words" in legend and "struck-through" in legend
    page.close()


@pytest.mark.parametrize("viewport", ["desktop", "phone"])
def test_the_heatmap_is_shown_beside_the_words(service, browser, viewport):
    url, image_dir = service
    page = _open(browser, url, viewport)
    _predict(page, image_dir / "5.jpg", CAPTION)
    page.locator(".why-button").first.click()
    page.wait_for_selector("#why-heat:not([hidden])")
    page.wait_for_function("() => document.getElementById('why-photo').naturalWidth > 0")
    assert page.locator("#why-heatmap").get_attribute("src") == page.locator("#heatmap").get_attribute("src")
    # Measured at one moment: the panel may still be scrolling into view.
    photo, heat, words = page.evaluate(
        """() => ["why-photo", "why-heatmap", "why-words"].map((id) => {
            const r = document.getElementById(id).getBoundingClientRect();
            return {x: r.x, y: r.y, width: r.width, height: r.height};
        })"""
    )
    assert heat == pytest.approx(photo, abs=1)  # laid over the photo exactly
    assert 0 <= words["y"] - (photo["y"] + photo["height"]) < 200  # in the same panel, just above the words
    page.uncheck("#show-heatmap")
    assert page.locator("#why-heatmap").is_hidden() and page.locator("#heatmap").is_hidden()
    assert page.evaluate("() => document.documentElement.scrollWidth") <= WIDTHS[viewport]["width"]
    page.close()


@pytest.mark.parametrize("viewport", ["desktop", "phone"])
def test_the_page_says_what_each_input_changed_and_how_much_caption_was_read(service, browser, viewport):
    url, image_dir = service
    photo = image_dir / "5.jpg"
    expected = httpx.post(
        f"{url}/predict", data={"caption": CAPTION}, files={"image": (photo.name, photo.read_bytes(), "image/jpeg")}
    ).json()["contributions"]
    page = _open(browser, url, viewport)
    page.set_input_files("#photo-input", str(photo))
    page.wait_for_selector("#photo-frame:not([hidden])")
    page.fill("#caption", CAPTION)
    words = len(CAPTION.split())
    page.wait_for_function(f"() => document.getElementById('caption-count').textContent.startsWith('{words} of')")
    assert page.locator("#caption-count").inner_text() == (
        f"{words} of {words} words read ({words + 2} of {expected['caption']['max_tokens']} tokens)"
    )
    page.click("#predict-button")
    page.wait_for_selector("#bars .bar-row")
    lines = page.locator("#contributions li").all_inner_texts()
    assert lines[0].startswith("Photo: " + ("changed" if expected["image_changed"] else "did not change"))
    assert lines[1].startswith("Caption: " + ("changed" if expected["caption_changed"] else "did not change"))
    assert f"read {words} of {words} words" in lines[1]
    assert page.locator("#caption-cut").is_hidden()

    long = " ".join(["dog"] * 300)
    page.fill("#caption", long)
    page.wait_for_function("() => document.getElementById('caption-count').classList.contains('cut')")
    read = httpx.post(f"{url}/caption", data={"caption": long}).json()["caption"]
    assert page.locator("#caption-count").inner_text().startswith(f"{read['words_read']} of 300 words read")
    page.click("#predict-button")
    page.wait_for_selector("#caption-cut:not([hidden])")
    assert f"read {read['words_read']} of 300 words" in page.locator("#caption-cut").inner_text()
    assert page.evaluate("() => document.documentElement.scrollWidth") <= WIDTHS[viewport]["width"]
    assert not page.errors, page.errors
    page.close()


def test_the_page_says_so_when_a_model_reads_captions_and_photos_together(service, browser):
    url, _ = service
    page = _open(browser, url, "phone")

    def early(route):  # an early-fusion model, as the service would describe it
        answer = route.fetch().json()
        answer["fusion"] = {"kind": "early", "combine": None, "image_weight": None, "rule": "one head", "reads": "both"}
        answer["contributions"].update(separable=False, image_weight=None, image_changed=None, caption_changed=None)
        route.fulfill(json=answer)

    page.route("**/predict", early)
    _predict(page, caption=CAPTION)
    lines = page.locator("#contributions li").all_inner_texts()
    assert "cannot be told apart" in lines[0] and lines[1] == "Photo: none given."
    assert lines[2].startswith("Caption: the model read")
    page.close()


MANY = 500


@pytest.fixture(scope="module")
def many_labels(tmp_path_factory, session_cache):
    """A caption model of 500 labels, trained in seconds: each caption names its two labels' numbers."""
    from conftest import TINY_SETTINGS

    from fuselabel import FuseLabel

    names = [f"category{i:03d}" for i in range(MANY)]
    labels = [[names[i % MANY], names[(7 * i + 3) % MANY]] for i in range(2 * MANY)]
    captions = [f"a photo with thing {i % MANY} and thing {(7 * i + 3) % MANY}" for i in range(2 * MANY)]
    out = tmp_path_factory.mktemp("many") / "model"
    settings = {**TINY_SETTINGS, "kind": "text", "epochs": 1}
    FuseLabel(**settings, cache_dir=session_cache).fit(
        images=[None] * len(captions), captions=captions, labels=labels, out=out, progress=False
    )
    with serving(create_app(out)) as url:
        yield url


# Every word of the result panel on one line: a word split over two lines has two boxes.
BROKEN_WORDS = """() => {
    const broken = [];
    const walk = document.createTreeWalker(document.getElementById('result-panel'), NodeFilter.SHOW_TEXT);
    for (let node = walk.nextNode(); node; node = walk.nextNode()) {
        if (!node.parentElement.offsetParent) continue;
        for (const m of node.textContent.matchAll(/\\S+/g)) {
            const range = document.createRange();
            range.setStart(node, m.index);
            range.setEnd(node, m.index + m[0].length);
            if (range.getClientRects().length > 1) broken.push(m[0]);
        }
    }
    return broken;
}"""
WIDEST = "() => Math.max(...[...document.querySelectorAll('body *')].map(e => e.getBoundingClientRect().right))"


@pytest.mark.parametrize("viewport", ["desktop", "phone"])
def test_hundreds_of_labels_show_the_likely_ones_and_a_filter(many_labels, browser, viewport):
    url = many_labels
    caption = "a photo with thing 123 and thing 9"
    answer = httpx.post(f"{url}/predict", data={"caption": caption}).json()
    ranked = sorted(answer["labels"], key=lambda lab: -lab["probability"])
    likely = [lab["name"] for i, lab in enumerate(ranked) if lab["predicted"] or i < 10]
    page = _open(browser, url, viewport)
    _predict(page, caption=caption)
    assert page.locator("#bars .bar-name").all_inner_texts() == likely
    assert f"{len(likely)} of {MANY}" in page.locator("#bars-shown").inner_text()
    width = WIDTHS[viewport]["width"]
    assert page.evaluate(WIDEST) <= width and page.evaluate(BROKEN_WORDS) == []

    page.fill("#label-filter", "category123")
    page.wait_for_function("() => document.querySelectorAll('#bars .bar-row').length === 1")
    assert page.locator("#bars .bar-name").all_inner_texts() == ["category123"]
    assert page.locator("#bars-shown").inner_text().startswith(f"1 of {MANY} labels match")
    page.fill("#label-filter", "category1")  # category100 to category199
    page.wait_for_function("() => document.querySelectorAll('#bars .bar-row').length === 50")
    found = [lab["name"] for lab in ranked if lab["name"].startswith("category1")]
    assert page.locator("#bars .bar-name").all_inner_texts() == found[:50]
    assert page.locator("#bars-shown").inner_text().startswith(f"100 of {MANY} labels match")
    page.locator(".why-button").first.click()
    page.wait_for_selector("#why-panel:not([hidden])")
    assert page.locator("#why-label").inner_text() == found[0]
    page.fill("#label-filter", "")
    page.wait_for_function(f"() => document.querySelectorAll('#bars .bar-row').length === {len(likely)}")
    assert page.evaluate(WIDEST) <= width and page.evaluate(BROKEN_WORDS) == []
    assert page.evaluate("() => document.documentElement.scrollWidth") <= width
    assert not page.errors, page.errors
    page.close()
