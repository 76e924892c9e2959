"""The playground page in headless Chromium (Debian's chromium + Playwright; tests/e2e/install_browser.sh)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# `make test` installs the browser; in CI a missing browser is a failure, never a silent skip.
if os.environ.get("CI"):
    import playwright.sync_api as sync_api  # noqa: F401
else:
    sync_api = pytest.importorskip("playwright.sync_api", reason="run tests/e2e/install_browser.sh")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
    pytest.skip("chromium is not installed: run tests/e2e/install_browser.sh", allow_module_level=True)

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page(live):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            context = browser.new_context()
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(live.url + "/")
            page.wait_for_selector('[data-model="sentiment"] form')
            yield page
            assert errors == []
        finally:
            browser.close()


@pytest.mark.slow
def test_page_lists_models_and_failures(page):
    names = page.eval_on_selector_all("[data-model]", "cards => cards.map(c => c.dataset.model)")
    assert {"sentiment", "writer", "mobilenet", "corrupt"} <= set(names)
    assert "safetensors" in page.inner_text('[data-model="corrupt"] .error')
    assert page.locator("script[src], link[rel=stylesheet]").count() == 0  # self-contained


@pytest.mark.slow
def test_classify_text(page, http):
    card = page.locator('[data-model="sentiment"]')
    card.locator("textarea").fill("A lovely, moving film")
    card.get_by_role("button", name="Classify").click()
    card.locator(".bar").first.wait_for()
    shown = card.locator(".bar").evaluate_all("bars => bars.map(b => b.dataset.label)")
    expected = http.post("/models/sentiment", json={"inputs": "A lovely, moving film"}).json()[0]
    assert shown == [d["label"] for d in expected]
    assert "inference" in card.locator(".timing").inner_text()


@pytest.mark.slow
def test_classify_image(page, cat_png, tmp_path):
    image = tmp_path / "cat.png"
    image.write_bytes(cat_png)
    card = page.locator('[data-model="mobilenet"]')
    card.locator("input[type=file]").set_input_files(str(image))
    card.get_by_role("button", name="Classify image").click()
    card.locator(".bar").first.wait_for()
    labels = card.locator(".bar").evaluate_all("bars => bars.map(b => b.dataset.label)")
    assert set(labels) == {"cat", "dog", "bird"}


@pytest.mark.slow
def test_generate_streams_text(page, http):
    card = page.locator('[data-model="writer"]')
    card.locator("textarea").fill("Hello world")
    card.locator("input[type=number]").fill("8")
    card.get_by_role("button", name="Generate").click()
    page.wait_for_selector('[data-model="writer"] .generated[data-done="true"]')
    expected = http.post("/models/writer", json={"inputs": "Hello world", "parameters": {"max_new_tokens": 8}}).json()
    assert card.locator(".generated").text_content() == expected[0]["generated_text"]
    assert "8 tokens" in card.locator(".timing").inner_text()


@pytest.mark.slow
def test_compare_sentences(page, http):
    card = page.locator('[data-model="embedder"]')
    card.locator("textarea").first.fill("a calm evening")
    card.locator("textarea").nth(1).fill("a quiet night\nstock prices fell")
    card.get_by_role("button", name="Compare").click()
    card.locator(".bar").first.wait_for()
    shown = card.locator(".bar").evaluate_all("bars => bars.map(b => [b.dataset.label, +b.querySelector('.score').textContent])")
    expected = http.post("/models/embedder", json={"inputs": {"source_sentence": "a calm evening",
                                                             "sentences": ["a quiet night", "stock prices fell"]}}).json()
    assert [label for label, _ in shown] == ["a quiet night", "stock prices fell"]
    assert [score for _, score in shown] == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_chat_keeps_the_conversation(page):
    card = page.locator('[data-model="chatty"]')
    for n, text in enumerate(["Hello there", "And then?"], start=1):
        card.locator("textarea").fill(text)
        card.get_by_role("button", name="Send").click()
        page.wait_for_selector(f'[data-model="chatty"] .turn.assistant[data-done="true"] >> nth={n - 1}')
    assert card.locator(".turn.user").all_inner_texts() == ["Hello there", "And then?"]
    assert card.locator(".turn.assistant").count() == 2 and "tokens" in card.locator(".timing").inner_text()
    writer = page.locator('[data-model="writer"]')  # no chat template: the plain generation form
    assert writer.get_by_role("button", name="Generate").count() == 1


@pytest.mark.slow
def test_example_buttons_fill_the_inputs(page):
    card = page.locator('[data-model="sentiment"]')
    card.get_by_role("button", name="Example").click()
    assert card.locator("textarea").input_value() == "A gorgeous, witty, seductive movie."
