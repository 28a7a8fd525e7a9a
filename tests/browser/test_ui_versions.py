"""The versions panel in a real browser: the list, feedback under a Try-it answer, retrain with feedback,
add images / a class, add a class by name, serve an older version again."""
from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.browser.test_ui import JOB_TIMEOUT_MS, create_over_http, drop_files, payloads, wait_ready

pytestmark = pytest.mark.browser


def _serving(page) -> str:
    return page.locator("#versions-rows tr.serving").get_attribute("data-version")


def test_versions_feedback_update_class_by_name_and_serve(serve, ui):
    created = create_over_http(serve, ("red disc", "green square"))
    wait_ready(serve, created["classifier_id"])
    page = ui.page
    page.goto(f"{serve.base}/#/c/{created['classifier_id']}")
    page.locator("#versions-rows tr").first.wait_for()
    assert page.locator("#versions-rows tr").count() == 1
    first = _serving(page)
    assert page.locator("#retrain-button").is_disabled()
    ui.shot("versions")

    # Try it, then say the answer was wrong: the feedback is recorded and counted.
    drop_files(page, "#try-drop", payloads("green", 1, start=60))
    page.locator("#feedback-form").wait_for()
    assert first in page.locator("#try-status").inner_text()  # the answer names its version
    page.fill("#feedback-label", "green square")
    page.click("#feedback-button")
    page.wait_for_function("() => document.querySelector('#feedback-count').textContent.startsWith('1 feedback')")
    ui.shot("feedback-recorded")

    # Retrain with feedback (forced: the comparison is the job's to make, here we want a second version).
    page.check("#update-force")
    page.click("#retrain-button")
    page.wait_for_function("() => /new version (serves|was kept)/i.test(document.querySelector('#versions-status').textContent)",
                           timeout=JOB_TIMEOUT_MS)
    expect(page.locator("#versions-rows tr")).to_have_count(2)  # the list refreshes after the status line
    second = _serving(page)
    assert second != first and "from feedback" in page.locator(f"tr[data-version='{second}']").inner_text()

    # Add images of a new class through the form.
    page.set_input_files("#update-files", files=payloads("blue", 5))
    page.fill("#update-label", "blue triangle")
    page.click("#update-button")
    page.wait_for_function("() => document.querySelectorAll('#versions-rows tr').length === 3", timeout=JOB_TIMEOUT_MS)
    assert "blue triangle" in page.locator("#versions-rows tr").first.inner_text()

    # A class by name serves at once, and the header's classes follow.
    page.fill("#class-name", "yellow star")
    page.click("#class-button")
    page.wait_for_function("() => document.querySelector('#versions-status').textContent.includes('serves now')")
    page.wait_for_function("() => [...document.querySelectorAll('.chips .chip')].some((c) => c.textContent === 'yellow star')")
    assert "class by name" in page.locator("#versions-rows tr.serving").inner_text()
    page.fill("#class-name", "yellow star")
    page.click("#class-button")
    page.wait_for_function("() => document.querySelector('#versions-status').textContent.includes('already a class')")
    ui.shot("class-by-name")

    # Serve the first version again: it is marked, and classify answers with it.
    page.locator(f"tr[data-version='{first}'] .serve-button").click()
    page.wait_for_function(f"() => document.querySelector('#versions-rows tr.serving').dataset.version === '{first}'")
    drop_files(page, "#try-drop", payloads("red", 1, start=61))
    page.wait_for_function(f"() => document.querySelector('#try-status').textContent.includes('{first}')")
    ui.shot("rolled-back")
