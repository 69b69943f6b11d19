"""The report and a two-model comparison in a real headless browser (Debian's chromium driven by Playwright), at
1280 px and 390 px: every image loads, nothing is wider than the screen outside a box that scrolls, no word is
broken inside a table cell, the provenance is there, nothing is fetched, and every label's table sorts and
filters. Set ``FUSELABEL_SCREENSHOT`` to a PNG path to save the report's first screen at 1280 px there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import needs_chromium
from test_report import _page, reported  # noqa: F401 (the fixture, used by name)

pytestmark = needs_chromium

# What the page looks like to a reader: images, widths, cells whose words wrap mid-word, the provenance table.
MEASURE = """() => {
  const client = document.documentElement.clientWidth;
  const broken = [];
  for (const cell of document.querySelectorAll('td, th')) {
    const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (const match of node.textContent.matchAll(/\\S+/g)) {
        const range = document.createRange();
        range.setStart(node, match.index);
        range.setEnd(node, match.index + match[0].length);
        const lines = new Set(Array.from(range.getClientRects()).map(r => Math.round(r.top)));
        if (lines.size > 1) broken.push(match[0]);
      }
    }
  }
  const facts = {};
  for (const row of document.querySelectorAll('#run table.facts tr')) {
    const th = row.querySelector('th'), td = row.querySelector('td');
    if (th && td) facts[th.textContent] = td.textContent;
  }
  return {
    images: Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.getBoundingClientRect().width]),
    scroll: document.documentElement.scrollWidth, client,
    wide: Array.from(document.querySelectorAll('body *')).filter(e =>
      e.getBoundingClientRect().right > client + 1 && !e.parentElement.closest('.scroll'))
      .map(e => e.tagName + '.' + e.className).slice(0, 5),
    scrolled: Array.from(document.querySelectorAll('.scroll')).filter(e => e.scrollWidth > e.clientWidth + 1)
      .map(e => (e.querySelector('table') || e).id || (e.querySelector('table') || e).className),
    broken: broken.slice(0, 10),
    facts,
  };
}"""


def _open(browser, path: Path, width: int):
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.requests = []
    page.errors = []
    page.on("request", lambda r: page.requests.append(r.url))
    page.on("pageerror", lambda err: page.errors.append(str(err)))
    page.goto(path.resolve().as_uri(), wait_until="load")
    return page


@pytest.mark.parametrize("width", [1280, 390])
@pytest.mark.parametrize("which", ["out", "compared"])
def test_the_pages_read_on_a_desktop_and_a_phone(reported, browser, which, width):  # noqa: F811
    path = reported[which]
    page = _open(browser, path, width)
    try:
        found = page.evaluate(MEASURE)
        if width == 1280 and which == "out" and os.environ.get("FUSELABEL_SCREENSHOT"):
            page.screenshot(
                path=os.environ["FUSELABEL_SCREENSHOT"],
                full_page=True,
                clip={"x": 0, "y": 0, "width": 1280, "height": 1395},
            )
        errors = page.errors
        requests = [u for u in page.requests if not u.startswith(("file:", "data:"))]
        title = page.title()
    finally:
        page.close()
    assert len(found["images"]) == len(_page(path).images) > 0
    assert all(done and natural > 0 for done, natural, _ in found["images"]), f"{width}px: an image did not load"
    assert all(shown <= found["client"] for _, _, shown in found["images"]), "every figure fits the screen's width"
    assert found["scroll"] <= found["client"], f"{width}px: the page scrolls sideways; too wide: {found['wide']}"
    assert not found["wide"], f"{width}px: wider than the screen outside a scroll box: {found['wide']}"
    assert not found["broken"], f"{width}px: words broken inside table cells: {found['broken']}"
    if width == 1280 and which == "compared":
        assert not found["scrolled"], f"the comparison's tables scroll at 1280 px: {found['scrolled']}"
    for key in ("table", "table sha256", "image folder", "rows reported", "report written", "by"):
        assert found["facts"].get(key), f"{width}px: provenance lacks {key!r}"
    assert any(k.startswith("overlap with") for k in found["facts"])
    assert not requests and not errors and title.startswith("fuselabel report")


def test_every_label_table_sorts_and_filters(reported, browser):  # noqa: F811
    page = _open(browser, reported["out"], 1280)
    try:

        def column(index):
            return page.eval_on_selector_all(
                "#per-label-table tbody tr:not([hidden])", f"rows => rows.map(r => r.cells[{index}].textContent)"
            )

        page.click("#per-label-table thead th:nth-child(6)")  # F1, ascending
        ascending = [float(v) for v in column(5)]
        page.click("#per-label-table thead th:nth-child(6)")
        descending = [float(v) for v in column(5)]
        assert ascending == sorted(ascending) and descending == sorted(ascending, reverse=True)
        name = column(1)[0]
        page.fill("input.filter[data-table='per-label-table']", name)
        assert column(1) == [name]
        page.fill("input.filter[data-table='per-label-table']", "")
        assert len(column(1)) == len(ascending)
    finally:
        page.close()
