"""The web page in headless Chromium (Debian's ``chromium``; ``make browser`` installs it): submit a
problem, watch every worker's column fill, see the answer."""

from __future__ import annotations

import os

import pytest
import torch

from hogwild.engine.engine import Engine
from hogwild.server.app import create_app, serve_in_thread

CHROMIUM = "/usr/bin/chromium"
# The network is closed: keep Chromium from trying to reach anything.
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing: run `make browser`")


@pytest.fixture(scope="module")
def url(model):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # leave a core to the event loop and the browser
    try:
        with serve_in_thread(create_app(Engine(model), max_sessions=2, queue_size=2)) as base:
            yield base
    finally:
        torch.set_num_threads(before)


def test_page_streams_workers_and_answer(url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            problems = []  # console errors and script errors: a Content-Security-Policy refusal would show here
            page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            response = page.goto(url + "/")
            assert response.headers["x-frame-options"] == "DENY" and "script-src 'sha256-" in response.headers[
                "content-security-policy"]
            expect(page.locator("#key-label")).to_be_hidden()  # this server wants no API key
            expect(page.locator("#model")).to_have_text("SmolLM2-135M-Instruct")
            page.fill("#problem", "What is 12 * 7?")
            page.fill("#workers", "2")
            page.fill("#budget", "24")
            page.click("#solve")
            columns = page.locator("#board .worker")
            expect(columns).to_have_count(2, timeout=60_000)
            for i, name in enumerate(["Alice", "Bob"]):
                expect(columns.nth(i).locator("h2")).to_have_text(name)
                expect(columns.nth(i).locator(".worker-text")).not_to_be_empty(timeout=60_000)
            expect(page.locator("#answer")).not_to_be_empty(timeout=120_000)
            expect(page.locator("#solve")).to_be_enabled(timeout=60_000)
            texts = [columns.nth(i).locator(".worker-text").inner_text() for i in range(2)]
            assert "Hi, I'm Alice." in texts[0] and "Hi, I'm Bob." in texts[1]
            assert "forward passes" in page.locator("#status").inner_text()
            expect(page.locator("#history-list li").first).to_contain_text("Alice [1]:")
            assert page.locator("#error").inner_text() == ""
            expect(page.locator("#collab")).to_be_hidden()  # no stats asked for
            shot = tmp_path / "hogwild-web.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            assert problems == []
            # The inline style applies (its hash is in the policy): the answer box shows, with its margin.
            assert page.locator("#history").evaluate("e => getComputedStyle(e).marginTop") == "12px"
        finally:
            browser.close()


def test_page_shows_who_reads_whom_with_collab_stats(url):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url + "/")
            page.fill("#problem", "What is 3 + 4?")
            page.fill("#workers", "2")
            page.fill("#budget", "6")
            page.check("#collab-stats")
            page.click("#solve")
            expect(page.locator("#collab")).to_be_visible()
            expect(page.locator("#collab-pass")).to_contain_text("pass ", timeout=60_000)
            expect(page.locator("#solve")).to_be_enabled(timeout=120_000)
            rows = page.locator("#collab-table tr")
            expect(rows).to_have_count(3)
            assert rows.nth(0).locator("th").all_inner_texts()[1:] == ["Alice", "Bob"]
            for r, name in enumerate(["Alice", "Bob"], start=1):
                assert rows.nth(r).locator("th").inner_text() == name
                cells = [float(x) for x in rows.nth(r).locator("td").all_inner_texts()]
                assert len(cells) == 2 and all(0 <= x <= 1 for x in cells), cells
                assert rows.nth(r).locator("td").nth(r - 1).get_attribute("class") == "diag"
            assert page.locator("#error").inner_text() == ""
        finally:
            browser.close()


def test_page_asks_for_the_api_key_when_the_server_wants_one(model):
    from playwright.sync_api import expect, sync_playwright

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    app = create_app(Engine(model), max_sessions=1, queue_size=1, api_key="page-key")
    try:
        with serve_in_thread(app) as base, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            try:
                page = browser.new_page()
                page.goto(base + "/")
                expect(page.locator("#key-label")).to_be_visible()
                page.fill("#problem", "What is 2 + 2?")
                page.fill("#budget", "3")
                page.click("#solve")
                expect(page.locator("#error")).to_contain_text("API key")
                page.fill("#api-key", "page-key")
                page.locator("#api-key").dispatch_event("change")
                expect(page.locator("#model")).to_have_text("SmolLM2-135M-Instruct")
                page.click("#solve")
                expect(page.locator("#answer-box")).to_be_visible(timeout=120_000)
                assert page.locator("#error").inner_text() == ""
            finally:
                browser.close()
    finally:
        torch.set_num_threads(before)


def test_page_answers_while_thinking(model):
    """"Answer while thinking" checked: the thoughts pane moves while the answer pane fills (the
    probes always say yes: the embedded model would keep its writer waiting)."""
    from playwright.sync_api import expect, sync_playwright

    engine = Engine(model)
    engine.probe_policy = lambda i, p_yes, p_no: True
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with serve_in_thread(create_app(engine, max_sessions=1, queue_size=1)) as base, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                problems = []  # a Content-Security-Policy refusal would show here
                page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda error: problems.append(str(error)))
                page.goto(base + "/")
                expect(page.locator("#thinkers")).to_be_hidden()
                page.check("#async")
                expect(page.locator("#thinkers")).to_be_visible()
                expect(page.locator("#workers")).to_be_hidden()
                page.fill("#problem", "What is 12 * 7?")
                page.fill("#budget", "20")
                page.click("#solve")
                expect(page.locator("#answer-pane")).to_be_visible(timeout=60_000)
                # Record, in the order they happen, which pane each change of the board touches.
                page.evaluate("""() => {
                    window.touched = [];
                    new MutationObserver((records) => records.forEach((r) => {
                        const node = r.target.closest ? r.target : r.target.parentElement;
                        const pane = node.closest(".column");
                        window.touched.push(pane ? pane.id : "");
                    })).observe(document.getElementById("board"), {childList: true, subtree: true});
                }""")
                expect(page.locator("#answer-box")).to_be_visible(timeout=120_000)
                expect(page.locator("#solve")).to_be_enabled(timeout=60_000)
                touched = page.evaluate("window.touched")
                assert "answer-pane" in touched and "thoughts-pane" in touched, touched
                first_answer = touched.index("answer-pane")
                assert "thoughts-pane" in touched[first_answer:], "the thoughts stopped when the answer began"
                assert page.locator("#thoughts-text").inner_text().strip()
                assert page.locator("#answer-text").inner_text().strip()
                assert "first answer token after" in page.locator("#status").inner_text()
                expect(page.locator("#history")).to_be_hidden()
                assert page.locator("#error").inner_text() == ""
                assert problems == []
            finally:
                browser.close()
    finally:
        torch.set_num_threads(before)
