"""The web UI in a real browser against a real `rmt serve`: every step a user takes, with a screenshot each.

Screenshots land in test-artifacts/browser/ (gitignored): look at them after a change to the UI.
"""
from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import shlex
import subprocess
import sys
import zipfile
from urllib.parse import urlparse

import onnx
import pytest
from PIL import Image, ImageDraw
from playwright.sync_api import expect

from tests.browser.conftest import API_KEY
from tests.service.helpers import TINY_CONFIG, wait_for
from tests.service.procs import ROOT

pytestmark = pytest.mark.browser

XSS = "<img src=x onerror=alert(1)>"
XSS_NAME = "<script>alert(2)</script> & \"quotes\""
JOB_TIMEOUT_MS = 150_000


def shape_png(kind: str, seed: int, size: int = 64) -> bytes:
    """A red disc or a green square at a random place over light noise: distinct, recognisable files."""
    rng = random.Random(f"{kind}-{seed}")
    img = Image.new("RGB", (size, size), tuple(rng.randint(200, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    r = rng.randint(12, 20)
    x, y = rng.randint(r, size - r), rng.randint(r, size - r)
    if kind == "red":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(210, 30, 30))
    elif kind == "green":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=(30, 170, 40))
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=(30, 40, 210))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def payloads(kind: str, n: int, start: int = 0) -> list[dict]:
    return [{"name": f"{kind}-{i}.png", "mimeType": "image/png", "buffer": shape_png(kind, i)}
            for i in range(start, start + n)]


def drop_files(page, selector: str, files: list[dict]) -> None:
    """Drop files on an element the way a desktop drag does (a DataTransfer holding File objects)."""
    encoded = [{"name": f["name"], "type": f["mimeType"], "b64": base64.b64encode(f["buffer"]).decode()} for f in files]
    transfer = page.evaluate_handle("""(files) => {
        const dt = new DataTransfer();
        for (const f of files) {
            const bytes = Uint8Array.from(atob(f.b64), (c) => c.charCodeAt(0));
            dt.items.add(new File([bytes], f.name, { type: f.type }));
        }
        return dt;
    }""", encoded)
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def create_over_http(server, labels: tuple[str, str], per_class: int = 5, name: str = "", key: str | None = None,
                     config: dict | None = None) -> dict:
    files, sent = [], []
    for label, kind in zip(labels, ("red", "green")):
        for f in payloads(kind, per_class):
            files.append(("files", (f["name"], f["buffer"], "image/png")))
            sent.append(label)
    with server.http(key) as http:
        response = http.post("/v1/classifiers", files=files,
                             data={"labels": sent, "name": name, "config": json.dumps({**TINY_CONFIG, **(config or {})})})
        assert response.status_code == 202, response.text
        return response.json()


def wait_ready(server, classifier_id: str, key: str | None = None) -> dict:
    with server.http(key) as http:
        clf = wait_for(lambda: (lambda c: c if c["status"] not in ("queued", "running") else None)(
            http.get(f"/v1/classifiers/{classifier_id}").json()), JOB_TIMEOUT_MS / 1000, interval=0.5,
            what="the classifier's job")
    assert clf["status"] == "ready", (clf, server.child.log())
    return clf


def run_snippets(workdir, curl: str, python: str, cli: str, key: str | None = None) -> None:
    """The copy-paste snippets, exactly as the page shows them, run against the server with a photo.jpg
    (and the key in $RMT_API_KEY, as the snippets expect, when the server has keys)."""
    Image.open(io.BytesIO(shape_png("red", 7))).convert("RGB").save(workdir / "photo.jpg")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMT_")}
    if key:
        env["RMT_API_KEY"] = key
        assert cli.startswith("RMT_API_KEY=... ")
        cli = cli.removeprefix("RMT_API_KEY=... ")
    out = subprocess.run(["bash", "-c", curl], cwd=workdir, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and len(json.loads(out.stdout)["predictions"]) == 2, out.stdout + out.stderr
    out = subprocess.run([sys.executable, "-c", python], cwd=workdir, capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0 and "photo.jpg" in out.stdout, out.stdout + out.stderr
    assert zipfile.ZipFile(workdir / "model-bundle.zip").read("labels.txt")
    assert cli.startswith("rmt remote classify ")
    out = subprocess.run([sys.executable, "-m", "rmt_cli", *shlex.split(cli)[1:]], cwd=workdir,
                         capture_output=True, text=True, timeout=120, env={**env, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and "photo.jpg" in out.stdout, out.stdout + out.stderr


def test_create_watch_report_try_download_delete(serve, ui, tmp_path):
    page = ui.page
    page.goto(serve.base + "/")
    page.get_by_text("No classifiers yet.").wait_for()
    ui.shot("empty-list")

    page.get_by_role("link", name="New classifier").first.focus()
    page.keyboard.press("Enter")  # keyboard only: the new page's heading takes the focus
    page.get_by_role("heading", name="New classifier").wait_for()
    assert page.evaluate("() => document.activeElement.tagName") == "H1"
    page.fill("#clf-name", "shapes from the browser")
    page.fill("#class-label-1", "red disc")
    page.fill("#class-label-2", "green square")
    page.set_input_files("#class-files-1", files=payloads("red", 6) + payloads("blue", 1))  # one wrong image
    drop_files(page, ".class-card[data-class-id='2'] .drop", payloads("green", 6))
    thumbs_red = page.locator(".class-card[data-class-id='1'] .thumb img")
    # images are decoded in the browser before their thumbnails appear: wait for them, then count exactly
    expect(thumbs_red).to_have_count(7)
    expect(page.locator(".class-card[data-class-id='2'] .thumb img")).to_have_count(6)
    page.wait_for_function("() => [...document.querySelectorAll('.thumb img')].every((i) => i.complete && i.naturalWidth > 0)")
    ui.shot("create-with-wrong-image")
    page.get_by_role("button", name=re.compile(r"Remove image 7 \(blue-0.png\)")).click()
    expect(thumbs_red).to_have_count(6)
    assert page.locator("#create-summary").inner_text().startswith("2 classes, 12 images")

    # Settings: backbones and weights come from GET /v1/info; the tiny backbone has no shipped weights.
    assert page.locator("#cfg-backbone option").first.inner_text() == "rmt-tiny-vit"
    page.select_option("#cfg-pretrained", "none")
    page.select_option("#cfg-method", "r-amt")
    page.fill("#cfg-epochs", "1")
    page.get_by_text("Advanced settings").click()
    page.fill("#cfg-min_steps", "3")
    page.fill("#cfg-batch_size", "8")
    page.fill("#cfg-extra", '{"leak": 1.0}')
    ui.shot("create-ready-to-train")
    page.get_by_role("button", name="Train").click()

    page.wait_for_url(re.compile(r"#/c/"))
    classifier_id = page.url.rsplit("/", 1)[1]
    page.locator("#job-progress").wait_for()
    ui.shot("training-started")

    # Try it while training: either the preview model answers or the not-ready message shows (no raw error).
    drop_files(page, "#try-drop", payloads("red", 1, start=40))
    page.wait_for_function("() => { const t = document.querySelector('#try-status').textContent;"
                           " return t && t !== 'Classifying…'; }")
    early = page.locator("#try-status").inner_text()
    assert ("Not ready to classify yet" in early or page.locator("#predictions li").count() > 0), early

    page.locator("#clf-status .badge-ready").wait_for(timeout=JOB_TIMEOUT_MS)
    page.locator("#report-summary").wait_for()
    done = re.match(r"Step (\d+) of (\d+)", page.locator("#job-progress-text").inner_text())
    assert done and done[1] == done[2] and int(done[2]) >= 3, page.locator("#job-progress-text").inner_text()
    assert page.evaluate("() => { const p = document.querySelector('#job-progress'); return p.value === p.max; }")
    summary = page.locator("#report-summary").inner_text()
    assert "Validation accuracy" in summary
    # ECE comes with the number of images behind it and what a calibrated model would read on that many
    assert re.search(r"Calibration error \(ECE\)\s+[\d.]+.* on \d+ images.*would read about [\d.]+ on that many",
                     summary), summary
    page.locator("#confusion").wait_for()
    assert sorted(page.locator("#confusion thead th").all_inner_texts()) == ["green square", "red disc"]
    assert page.locator("#per-class li").count() == 2
    # the curve was drawn: the canvas has non-blank pixels in the plot area
    assert page.evaluate("""() => { const c = document.querySelector('#curve');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let coloured = 0; for (let i = 0; i < d.length; i += 4) if (d[i] > 150 && d[i + 2] < 80) coloured++;
        return coloured; }""") > 20
    wrong = page.locator("#misclassified li")  # the tiny random backbone usually gets some held-out image wrong
    if wrong.count():
        page.wait_for_function("() => [...document.querySelectorAll('#misclassified img')].length > 0 && "
                               "[...document.querySelectorAll('#misclassified img')].every((i) => i.complete && i.naturalWidth > 0)")
        assert re.search(r"is (red disc|green square)", wrong.first.inner_text())
    ui.shot("report")

    # Try it: a dropped image, a pasted image, a webcam snapshot (Chromium's fake camera).
    drop_files(page, "#try-drop", payloads("green", 1, start=50))
    page.locator("#predictions li").nth(1).wait_for()
    assert set(page.locator("#predictions .bar-label").all_inner_texts()) == {"red disc", "green square"}
    scores = [float(s.rstrip("%")) for s in page.locator("#predictions .bar-value").all_inner_texts()]
    assert abs(sum(scores) - 100) < 0.5 and scores == sorted(scores, reverse=True)
    page.locator("#try").scroll_into_view_if_needed()
    ui.shot("try-dropped-image")

    page.evaluate("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'pasted.png', { type: 'image/png' }));
        document.dispatchEvent(new ClipboardEvent('paste', { clipboardData: dt, bubbles: true }));
    }""", base64.b64encode(shape_png("red", 99)).decode())
    page.wait_for_function("() => document.querySelector('#try-status').textContent.startsWith('Top 2')")

    page.get_by_role("button", name="Use webcam").click()
    page.wait_for_function("() => document.querySelector('#webcam').videoWidth > 0")
    page.evaluate("() => { document.querySelector('#predictions').replaceChildren(); }")
    page.get_by_role("button", name="Take snapshot").click()
    page.locator("#predictions li").nth(1).wait_for()
    ui.shot("try-webcam")
    page.get_by_role("button", name="Stop webcam").click()

    # Downloads go through fetch + a blob URL (the auth header cannot ride on a plain link).
    with page.expect_download() as got:
        page.get_by_role("button", name="Download ONNX model").click()
    model = onnx.load_from_string(open(got.value.path(), "rb").read())
    onnx.checker.check_model(model)
    assert got.value.suggested_filename == "shapes_from_the_browser.onnx"
    with page.expect_download() as got:
        page.get_by_role("button", name="Download export bundle (zip)").click()
    with zipfile.ZipFile(got.value.path()) as bundle:
        assert {"model.onnx", "labels.txt"} <= set(bundle.namelist())
        assert set(bundle.read("labels.txt").decode().splitlines()) == {"red disc", "green square"}
    curl = page.locator("#snippet-curl").inner_text()
    assert f"/v1/classifiers/{classifier_id}/classify" in curl and "Authorization" not in curl
    run_snippets(tmp_path, curl=curl, python=page.locator("#snippet-python").inner_text(),
                 cli=page.locator("#snippet-cli").inner_text())
    page.locator("#use").scroll_into_view_if_needed()
    ui.shot("use-it")

    page.goto(serve.base + "/#/")
    row = page.locator(f"tr[data-id='{classifier_id}']")
    row.wait_for()
    assert "ready" in row.inner_text() and "red disc" in row.inner_text()
    ui.shot("list-with-classifier")

    page.goto(f"{serve.base}/#/c/{classifier_id}")
    page.get_by_role("button", name="Delete").first.click()
    page.locator("#confirm-dialog").wait_for()
    ui.shot("confirm-delete")
    page.locator("#confirm-ok").click()
    page.get_by_text("No classifiers yet.").wait_for()
    ui.shot("deleted")
    with serve.http() as http:
        assert http.get(f"/v1/classifiers/{classifier_id}").status_code == 404


def test_labels_and_names_render_as_text_never_markup(serve, ui):
    created = create_over_http(serve, (XSS, "plain"), name=XSS_NAME)
    wait_ready(serve, created["classifier_id"])
    page = ui.page
    page.goto(serve.base + "/")
    page.get_by_role("link", name=XSS_NAME).wait_for()
    assert page.get_by_text(XSS, exact=True).first.is_visible()
    ui.shot("xss-list")

    page.get_by_role("link", name=XSS_NAME).click()
    page.locator("#confusion").wait_for()
    assert page.locator("h1").inner_text() == XSS_NAME
    assert XSS in page.locator("#confusion thead").inner_text()
    drop_files(page, "#try-drop", payloads("red", 1, start=70))
    page.locator("#predictions li").nth(1).wait_for()
    assert XSS in page.locator("#predictions").inner_text()
    ui.shot("xss-detail")
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: nothing wider than the screen
    page.wait_for_timeout(200)
    wide = page.evaluate("""() => [...document.querySelectorAll('body *')].filter((el) => el.getBoundingClientRect().right > 391)
        .map((el) => `${el.tagName}#${el.id}.${el.className} ${Math.round(el.getBoundingClientRect().right)}`).slice(0, 12)""")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390, wide
    ui.shot("phone-detail")
    page.set_viewport_size({"width": 1280, "height": 900})
    # the markup never became elements, and the page really forbids inline script
    assert page.locator("img[src='x']").count() == 0 and page.locator("main script").count() == 0
    blocked = page.evaluate("""() => new Promise((resolve) => {
        document.addEventListener('securitypolicyviolation', (e) => resolve(e.violatedDirective), { once: true });
        const s = document.createElement('script'); s.textContent = 'window.__inline = 1'; document.body.append(s);
        setTimeout(() => resolve(window.__inline === 1 ? 'ran' : 'no event'), 2000);
    })""")
    assert blocked.startswith("script-src"), blocked
    ui.errors.clear()  # the violation just provoked on purpose is the only one allowed
    with serve.http() as http:
        assert http.delete(f"/v1/classifiers/{created['classifier_id']}").status_code == 204


def test_api_key_prompt_then_everything_works(serve_with_key, ui, tmp_path):
    created = create_over_http(serve_with_key, ("red", "green"), per_class=2, name="keyed", key=API_KEY)
    page = ui.page
    page.goto(serve_with_key.base + "/")
    page.locator("#key-dialog[open]").wait_for()
    ui.shot("key-prompt")
    page.fill("#key-input", "not-the-key")
    page.get_by_role("button", name="Use this key").click()
    page.locator("#error-banner").wait_for()  # the wrong key: 401 again, said plainly, with a way to retry
    assert "API key" in page.locator("#error-banner").inner_text()
    ui.shot("key-refused")
    page.get_by_role("button", name="Enter API key").click()
    page.fill("#key-input", API_KEY)
    page.get_by_role("button", name="Use this key").click()
    page.get_by_role("link", name="keyed").wait_for()
    ui.shot("key-accepted-list")

    wait_ready(serve_with_key, created["classifier_id"], key=API_KEY)
    page.get_by_role("link", name="keyed").click()
    page.locator("#snippet-curl").wait_for()
    assert page.evaluate("() => sessionStorage.getItem('rmt.apiKey')") == API_KEY
    api_requests = [r for r in ui.requests if "/v1/" in r.url]
    assert api_requests and all(API_KEY not in r.url for r in ui.requests)
    authorised = [r for r in api_requests if r.headers.get("authorization") == f"Bearer {API_KEY}"]
    assert any(f"/v1/classifiers/{created['classifier_id']}" in r.url for r in authorised)
    assert "Authorization: Bearer $RMT_API_KEY" in page.locator("#snippet-curl").inner_text()
    assert 'api_key=os.environ["RMT_API_KEY"]' in page.locator("#snippet-python").inner_text()
    run_snippets(tmp_path, curl=page.locator("#snippet-curl").inner_text(), key=API_KEY,
                 python=page.locator("#snippet-python").inner_text(), cli=page.locator("#snippet-cli").inner_text())
    with page.expect_download() as got:  # a download behind auth: fetch with the header, then a blob URL
        page.get_by_role("button", name="Download ONNX model").click()
    onnx.checker.check_model(onnx.load(got.value.path()))
    ui.shot("key-detail")

    # A reload keeps the key (session storage of this tab): no second prompt.
    page.reload()
    page.locator("#clf-status .badge").wait_for()
    assert page.locator("#key-dialog[open]").count() == 0
    with serve_with_key.http(API_KEY) as http:
        assert http.delete(f"/v1/classifiers/{created['classifier_id']}").status_code == 204


def test_docs_load_with_no_request_leaving_the_machine(serve, ui):
    page = ui.page
    page.route(re.compile(r"^https?://(?!127\.0\.0\.1[:/]).*"), lambda route: route.abort())  # no waiting on DNS
    page.goto(serve.base + "/docs")
    page.locator(".swagger-ui .opblock").first.wait_for(timeout=30_000)
    ui.shot("docs")
    outside = [r.url for r in ui.requests
               if urlparse(r.url).scheme in ("http", "https", "ws", "wss") and urlparse(r.url).hostname != "127.0.0.1"]
    assert not outside, f"/docs asked other hosts: {outside}"


def test_watch_a_long_job_live_then_cancel_it(serve, ui):
    # 5 images per class leave a holdout, so the mask is tuned (and judged); many steps make a job to watch
    created = create_over_http(serve, ("red", "green"), per_class=5, name="long job", config={"min_steps": 3000})
    page = ui.page
    page.goto(f"{serve.base}/#/c/{created['classifier_id']}")
    page.wait_for_function("() => { const m = /^Step (\\d+) of (\\d+)/.exec(document.querySelector('#job-progress-text').textContent);"
                           " return m && +m[1] >= 3 && +m[2] >= 3000; }", timeout=60_000)
    assert re.search(r"about .+ left", page.locator("#job-progress-text").inner_text())
    assert page.locator("#job-stats").inner_text().count("–") < 3  # loss and accuracy are numbers now
    ui.shot("training-live")
    page.get_by_role("button", name="Cancel training").click()
    page.locator("#clf-status .badge-cancelled").wait_for(timeout=30_000)
    assert page.locator("#cancel-button").is_hidden()
    steps = re.match(r"Step (\d+) of (\d+)", page.locator("#job-progress-text").inner_text())
    assert steps and int(steps[1]) < int(steps[2])
    assert page.locator("#report").is_hidden() and page.locator("#use").is_hidden()
    drop_files(page, "#try-drop", payloads("red", 1, start=80))
    page.wait_for_function("() => document.querySelector('#try-status').textContent !== 'Classifying…'")
    assert "the training was cancelled, so there is no model" in page.locator("#try-status").inner_text()
    ui.shot("cancelled")
    with serve.http() as http:
        assert http.get(f"/v1/jobs/{created['job_id']}").json()["status"] == "cancelled"
        http.delete(f"/v1/classifiers/{created['classifier_id']}")


def test_a_zip_fills_the_classes_and_the_form_explains_mistakes(serve, ui):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:  # a zipped folder: pets/<class>/<image>
        for i, f in enumerate(payloads("red", 3)):
            zf.writestr(f"pets/cat/{i}.png", f["buffer"])
        for i, f in enumerate(payloads("green", 2)):
            zf.writestr(f"pets/dog/{i}.png", f["buffer"], compress_type=zipfile.ZIP_STORED)
        zf.writestr("pets/dog/.DS_Store", b"junk")
        zf.writestr("__MACOSX/pets/cat/._0.png", b"junk")
    with serve.http() as http:
        before = http.get("/v1/classifiers").json()["total"]
    page = ui.page
    page.goto(serve.base + "/#/new")
    page.set_input_files("#zip-input", files=[{"name": "pets.zip", "mimeType": "application/zip", "buffer": buf.getvalue()}])
    page.get_by_text("pets.zip: 5 images in 2 classes.").wait_for()
    names = page.locator(".class-name")
    assert [names.nth(i).input_value() for i in range(names.count())] == ["cat", "dog"]  # the empty defaults went
    expect(page.locator(".class-card").nth(0).locator(".thumb img")).to_have_count(3)
    expect(page.locator(".class-card").nth(1).locator(".thumb img")).to_have_count(2)
    page.wait_for_function("() => [...document.querySelectorAll('.thumb img')].every((i) => i.complete && i.naturalWidth > 0)")
    ui.shot("zip-loaded")

    names.nth(1).fill("cat")
    page.get_by_role("button", name="Train").click()
    assert "both called" in page.get_by_role("alert").inner_text()
    names.nth(1).fill("dog")
    page.get_by_role("button", name="Add a class").click()
    page.locator(".class-name").nth(2).fill("bird")
    page.get_by_role("button", name="Train").click()
    assert 'Class "bird" has no images yet.' in page.get_by_role("alert").inner_text()
    page.get_by_role("button", name="Remove this class").nth(2).click()
    page.get_by_text("Advanced settings").click()
    assert page.locator("#cfg-select option").all_inner_texts() == [
        "auto (best on validation)", "zero-shot", "head", "mask", "mask+head"]
    noise = Image.frombytes("RGB", (400, 400), random.Random(1).randbytes(400 * 400 * 3))
    big = io.BytesIO()
    noise.save(big, "PNG")
    assert len(big.getvalue()) > 200_000
    page.locator(".class-card").first.locator("input[type=file]").set_input_files(
        files=[{"name": "huge.png", "mimeType": "image/png", "buffer": big.getvalue()}])
    page.get_by_role("button", name="Train").click()  # the server's limit (RMT_MAX_IMAGE_BYTES), checked before sending
    assert re.search(r"huge.png is 4\d\d.\d KB; this server takes images up to 195.3 KB", page.get_by_role("alert").inner_text())
    page.get_by_role("button", name=re.compile(r"Remove image 4 \(huge.png\)")).click()
    page.fill("#cfg-extra", "{not json")
    page.get_by_role("button", name="Train").click()
    assert "not valid JSON" in page.get_by_role("alert").inner_text()
    ui.shot("form-errors")
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input:not([type=file]), select, textarea, button')]
        .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())
        .map((el) => el.outerHTML.slice(0, 80))""")
    assert not unlabelled, f"controls without an accessible name: {unlabelled}"
    with serve.http() as http:
        assert http.get("/v1/classifiers").json()["total"] == before  # nothing was sent


def test_the_page_reads_a_zip_by_the_same_rule_as_the_api(serve, ui):
    """The cases of tests/zip_rules.py, which tests/service/test_zip_rules.py sends to the API."""
    from tests.zip_rules import CASES, materialise

    page = ui.page
    page.goto(serve.base + "/")
    image = shape_png("circle", 0)
    for case, (entries, expected) in CASES.items():
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, content in materialise(entries, image).items():
                zf.writestr(name, content)
        got = page.evaluate("""async (b64) => {
            const { readZip } = await import("/ui/zip.js");
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            try {
              const counts = {};
              for (const m of await readZip(new File([bytes], "set.zip"))) {
                counts[m.parts[0]] = (counts[m.parts[0]] || 0) + 1;
              }
              return { counts };
            } catch (e) { return { error: e.message }; }
        }""", base64.b64encode(buf.getvalue()).decode())
        if isinstance(expected, dict):
            assert got == {"counts": expected}, case
        else:
            assert "error" in got and expected[1] in got["error"], (case, got)
