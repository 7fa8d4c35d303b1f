"""The playground in headless Chromium against the live service (no API key): loading, streaming and
stopping, token view, chat, and the inside-the-model view. conftest.py explains the set-up."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from browser import DEADLINE_S, console_errors, open_page, requested_urls, screenshot, start_server, wait

RUNNING = re.compile(r"^textgen_num_requests_running\{[^}]*\} (\S+)$", re.M)


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory):
    s = start_server(tiny_bundle, tmp_path_factory.mktemp("playground"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def page(browser, server):
    open_page(browser, server)
    return browser


def by_id(driver, element_id: str):
    return driver.find_element("id", element_id)


def running(server) -> float:
    return sum(float(v) for v in RUNNING.findall(httpx.get(server.url("/metrics"), timeout=10).text))


def test_page_is_served_with_a_strict_content_security_policy(server):
    r = httpx.get(server.url("/"), timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    for name in ("playground.js", "playground.css"):
        assert httpx.get(server.url(f"/playground/{name}"), timeout=10).status_code == 200
    assert httpx.get(server.url("/playground/../config.json"), timeout=10).status_code == 404


def test_page_loads_without_console_errors_or_other_origins(page, server):
    urls = requested_urls(page)
    assert urls, "no network events were recorded"
    foreign = [u for u in urls if not (u.startswith(server.base_url + "/") or u.startswith("data:"))]
    assert not foreign, f"requests to other origins: {foreign}"
    assert server.url("/openapi.json") in urls and server.url("/v1/models") in urls
    assert not console_errors(page)
    assert by_id(page, "model-name").text == "bundle"
    assert by_id(page, "key-box").is_displayed() is False
    # the server's limits reach the controls
    assert by_id(page, "max_tokens").get_attribute("max") == "256"
    assert by_id(page, "temperature").get_attribute("max") == "2"
    screenshot(page, "completion-empty")


def _token_count(driver) -> int:
    return len(driver.find_elements("css selector", "#output .tok"))


def test_streamed_completion_appears_token_by_token_and_stop_ends_it(page, server):
    by_id(page, "tab-complete").click()
    by_id(page, "max_tokens").clear()
    by_id(page, "max_tokens").send_keys("200")
    by_id(page, "token-view").click()
    by_id(page, "send").click()
    wait(page, lambda d: _token_count(d) >= 2, message="no tokens appeared")
    first = _token_count(page)
    wait(page, lambda d: _token_count(d) > first, message="the stream did not continue")
    assert by_id(page, "stop").is_enabled() and not by_id(page, "send").is_enabled()
    assert running(server) >= 1
    by_id(page, "stop").click()
    wait(
        page, lambda d: by_id(d, "stats").get_attribute("data-done") == "true", message="stop did not end it"
    )
    stats = by_id(page, "stats").text
    assert "finish: stopped" in stats and "time to first token" in stats and "tokens/s" in stats, stats
    assert _token_count(page) < 200
    wait(page, lambda d: running(server) == 0, message="the server kept generating after stop")
    # token view: shaded by probability, alternatives on focus
    tok = page.find_elements("css selector", "#output .tok")[1]
    assert tok.get_attribute("data-prob") is not None and tok.get_attribute("tabindex") == "0"
    page.execute_script("arguments[0].focus()", tok)
    tip = by_id(page, "tooltip")
    wait(page, lambda d: tip.is_displayed(), message="no tooltip on focus")
    assert "%" in tip.text and len(tip.find_elements("css selector", "tr")) >= 1
    screenshot(page, "completion-tokens")
    by_id(page, "token-view").click()
    assert not console_errors(page)


def test_chat_mode_streams_an_answer(page, server):
    by_id(page, "tab-chat").click()
    by_id(page, "max_tokens").clear()
    by_id(page, "max_tokens").send_keys("12")
    assert by_id(page, "prompt").get_attribute("value") == ""  # each mode keeps its own draft
    by_id(page, "prompt").send_keys("Hello there")
    by_id(page, "send").click()
    wait(
        page,
        lambda d: (
            by_id(d, "stats").get_attribute("data-done") == "true"
            and "finish: length" in by_id(d, "stats").text
        ),
        message="the chat answer did not finish",
    )
    messages = page.find_elements("css selector", "#chat-log .msg")
    assert [m.get_attribute("class") for m in messages] == ["msg user", "msg assistant"]
    assert messages[0].text.endswith("Hello there") and "ROMEO" not in messages[0].text
    assert 1 <= len(messages[1].find_elements("css selector", ".tok")) <= 12
    screenshot(page, "chat")
    assert not console_errors(page)


def test_inspect_tab_draws_layer_by_head_grid_and_hover_highlights(page, server, tiny_bundle):
    arch = json.loads((tiny_bundle / "config.json").read_text())["architecture"]
    tab = by_id(page, "tab-inspect")
    assert tab.is_displayed()
    tab.click()
    prompt = by_id(page, "inspect-prompt")
    prompt.clear()
    prompt.send_keys("Your cat is a lovely cat")
    by_id(page, "inspect-run").click()
    wait(page, lambda d: by_id(d, "inspect-result").is_displayed(), message="no inspect result")
    cells = page.find_elements("css selector", "#grid .cell")
    assert len(cells) == arch["n_layer"] * arch["n_head"]
    tokens = page.find_elements("css selector", "#tokens .tok-cell")
    assert len(tokens) >= 5
    from selenium.webdriver.common.action_chains import ActionChains

    def highlighted() -> list[str]:
        return [t.get_attribute("data-weight") for t in tokens]

    ActionChains(page).move_to_element(tokens[2]).perform()
    wait(
        page, lambda d: "query" in tokens[2].get_attribute("class"), message="hover did not select the token"
    )
    after_2 = highlighted()
    assert all(float(w) == 0 for w in after_2[3:]), "weights above the diagonal"
    assert sum(float(w) for w in after_2[:3]) == pytest.approx(1, abs=2e-3)
    ActionChains(page).move_to_element(tokens[-1]).perform()
    wait(page, lambda d: "query" in tokens[-1].get_attribute("class"), message="hover did not move")
    assert highlighted() != after_2
    big = by_id(page, "big")  # hovering a cell of the large heatmap names the pair and the weight
    ActionChains(page).move_to_element_with_offset(big, 0, big.size["height"] // 4).perform()
    wait(page, lambda d: "attends to" in by_id(d, "big-caption").text, message="no caption on hover")
    assert "%" in by_id(page, "big-caption").text
    cells[-1].click()
    assert cells[-1].get_attribute("aria-pressed") == "true"
    assert by_id(page, "big-title").text == f"Layer {arch['n_layer']}, head {arch['n_head']}"
    tokens[3].click()
    bars = page.find_elements("css selector", "#bars .bar")
    assert len(bars) == 10 and "position 4" in by_id(page, "bars-title").text
    screenshot(page, "inspect")
    by_id(page, "theme").click()
    assert page.find_element("tag name", "html").get_attribute("data-theme") == "dark"
    screenshot(page, "inspect-dark")
    by_id(page, "theme").click()
    assert not console_errors(page)
    foreign = [
        u
        for u in requested_urls(page)
        if not u.startswith(server.base_url + "/") and not u.startswith("data:")
    ]
    assert not foreign


def test_keyboard_reaches_the_tabs_and_controls(page):
    by_id(page, "tab-complete").click()
    from selenium.webdriver.common.keys import Keys

    by_id(page, "tab-complete").send_keys(Keys.ARROW_RIGHT)
    assert page.switch_to.active_element.get_attribute("id") == "tab-chat"
    assert by_id(page, "tab-chat").get_attribute("aria-selected") == "true"
    for el in page.find_elements("css selector", "input, textarea"):
        if not el.is_displayed():
            continue
        el_id = el.get_attribute("id")
        labels = page.find_elements("css selector", f'label[for="{el_id}"]')
        assert labels or el.find_elements("xpath", "ancestor::label"), f"#{el_id} has no label"
    assert DEADLINE_S > 0
