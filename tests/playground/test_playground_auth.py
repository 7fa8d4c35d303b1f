"""The playground against a server with an API key: the page asks for it, shows the server's error
for a wrong one, and works with the right one (the key stays in the page's memory)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from browser import console_errors, open_page, screenshot, start_server, wait

KEY = "playground-test-key"


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory):
    s = start_server(tiny_bundle, tmp_path_factory.mktemp("playground-auth"), TEXTGEN_API_KEY=KEY)
    yield s
    s.stop()


def by_id(driver, element_id: str):
    return driver.find_element("id", element_id)


def test_page_is_open_and_inspect_needs_the_key(server):
    assert httpx.get(server.url("/"), timeout=10).status_code == 200
    assert httpx.get(server.url("/playground/playground.js"), timeout=10).status_code == 200
    body = {"prompt": "a cat"}
    assert httpx.post(server.url("/v1/inspect"), json=body, timeout=30).status_code == 401
    assert httpx.get(server.url("/v1/inspect"), timeout=30).status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(server.url("/v1/inspect"), json=body, headers=auth, timeout=30).status_code == 200


def test_api_key_is_required_and_a_wrong_one_shows_the_servers_message(browser, server):
    open_page(browser, server)  # the page itself is open: it holds the key field
    assert by_id(browser, "key-box").is_displayed()
    assert "API key" in by_id(browser, "status").text
    assert not by_id(browser, "tab-inspect").is_displayed()  # unknown until the key works
    field = by_id(browser, "api-key")
    assert field.get_attribute("type") == "password"
    field.send_keys("wrong-key")
    by_id(browser, "key-apply").click()
    wait(
        browser,
        lambda d: "missing or invalid API key" in by_id(d, "status").text,
        message="the server's error message was not shown",
    )
    assert by_id(browser, "status").text.startswith("401")
    screenshot(browser, "auth-wrong-key")
    field.clear()
    field.send_keys(KEY)
    by_id(browser, "key-apply").click()
    wait(browser, lambda d: by_id(d, "model-name").text == "bundle", message="the right key was not accepted")
    assert not by_id(browser, "status").is_displayed()
    assert by_id(browser, "tab-inspect").is_displayed()
    # the key is in memory only
    assert browser.execute_script("return window.localStorage.length + window.sessionStorage.length") == 0
    by_id(browser, "max_tokens").clear()
    by_id(browser, "max_tokens").send_keys("5")
    by_id(browser, "send").click()
    wait(
        browser,
        lambda d: "finish: length" in by_id(d, "stats").text,
        message="generation with the key failed",
    )
    assert " 5 tokens" in by_id(browser, "stats").text
    # a 401 the page provoked on purpose is logged by Chromium as a failed resource load; nothing else
    errors = [e for e in console_errors(browser) if "401" not in e["message"]]
    assert not errors
