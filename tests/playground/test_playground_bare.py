"""A bundle without model.attention.onnx: /v1/inspect is a 404, and the page hides its tab."""

from __future__ import annotations

from pathlib import Path

import pytest
from browser import console_errors, open_page, start_server


@pytest.fixture(scope="module")
def server(bundle_without_attention: Path, tmp_path_factory):
    s = start_server(bundle_without_attention, tmp_path_factory.mktemp("playground-bare"))
    yield s
    s.stop()


def test_page_hides_the_inspect_tab_without_the_graph(browser, server):
    open_page(browser, server)
    assert browser.find_element("id", "model-name").text == "bundle"
    assert not browser.find_element("id", "tab-inspect").is_displayed()
    assert browser.find_element("id", "tab-chat").is_displayed()
    # the probe's 404 is logged by Chromium as a failed resource load; nothing else
    assert not [e for e in console_errors(browser) if "404" not in e["message"]]
