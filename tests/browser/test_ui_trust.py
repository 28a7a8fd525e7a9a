"""The "Try it" answer a user can trust (issue 16): visible score bars, the outlier score, sliders that re-judge
the last answer, and an undecodable image caught before upload."""
from __future__ import annotations

import pytest

from tests.browser.test_ui import create_over_http, payloads, wait_ready

pytestmark = pytest.mark.browser


def test_bars_have_width_and_sliders_rejudge_the_last_answer(serve, ui):
    page = ui.page
    created = create_over_http(serve, ("red disc", "green square"), per_class=3, name="trust")
    wait_ready(serve, created["classifier_id"])
    page.goto(f"{serve.base}/#/c/{created['classifier_id']}")
    page.locator("#try-drop").wait_for()
    page.set_input_files("#try-file", files=payloads("red", 1, start=50))
    page.locator("#predictions li").first.wait_for()
    page.wait_for_function("() => document.querySelector('#try-verdict').textContent.startsWith('Answer')")
    widths = page.evaluate("""() => [...document.querySelectorAll('#predictions li')].map((li) => ({
        fill: li.querySelector('.fill').getBoundingClientRect().width,
        bar: li.querySelector('.bar').getBoundingClientRect().width,
        score: parseFloat(li.querySelector('.bar-value').textContent) / 100 }))""")
    assert len(widths) == 2 and widths[0]["bar"] > 50
    for w in widths:  # the fill is as wide as the score says (CSP-safe CSSOM width), not empty
        assert w["fill"] == pytest.approx(w["score"] * w["bar"], abs=2), widths
    assert widths[0]["fill"] > 0
    assert "Outlier score" in page.locator("#try-outlier").inner_text()
    top = page.locator("#predictions li .bar-label").first.inner_text()
    assert page.locator("#try-verdict").inner_text() == f"Answer: {top}."
    ui.shot("answer-with-bars")

    def slide(selector: str, value: float) -> None:
        page.evaluate("([s, v]) => { const el = document.querySelector(s); el.value = String(v);"
                      " el.dispatchEvent(new Event('input', { bubbles: true })); }", [selector, value])

    requests = len(ui.requests)
    slide("#try-min-score", 1.0)  # no answer scores above 100%: unknown, without asking the server again
    assert page.locator("#try-verdict").inner_text().startswith("Answer: unknown (top score")
    assert page.locator("#try-min-score-value").inner_text() == "100%"
    slide("#try-min-score", 0.0)
    slide("#try-max-outlier", 0.0)  # any outlier score above 0: unknown
    assert "outlier score" in page.locator("#try-verdict").inner_text()
    slide("#try-max-outlier", 1.0)
    assert page.locator("#try-verdict").inner_text() == f"Answer: {top}."
    assert len(ui.requests) == requests  # re-judged in the page
    ui.shot("sliders")
    assert "preview model" not in page.locator("#job-status").inner_text()  # the job has ended


def test_an_undecodable_image_is_caught_in_the_browser_before_upload(serve, ui):
    page = ui.page
    page.goto(serve.base + "/#/new")
    page.get_by_role("heading", name="New classifier").wait_for()
    page.fill("#class-label-1", "red disc")
    corrupt = {"name": "broken.png", "mimeType": "image/png", "buffer": payloads("red", 1)[0]["buffer"][:80]}
    page.set_input_files("#class-files-1", files=payloads("red", 2) + [corrupt])
    page.wait_for_function("() => document.querySelectorAll(\".class-card[data-class-id='1'] .thumb img\").length === 2")
    error = page.locator(".error[role=alert]")
    error.wait_for()
    assert "broken.png" in error.inner_text() and "could not be decoded" in error.inner_text()
    page.wait_for_function("() => [...document.querySelectorAll('.thumb img')].every((i) => i.complete && i.naturalWidth > 0)")
    ui.shot("corrupt-image-caught")
