"""Screenshots of the playground for docs/playground.md, with the real engine on a real bundle.

    .venv/bin/python tests/playground/capture_docs.py --bundle artifacts/small

Starts ``python -m service`` on a loopback ephemeral port, drives headless Chromium through the
completion (token view on, one token focused), chat and inside-the-model views, and writes
docs/img/playground-*.png (128-colour PNGs, to keep the repository small).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from browser import ROOT, missing, open_page, server_harness, start_chromium, wait


def finished(d) -> bool:
    return d.find_element("id", "stats").get_attribute("data-done") == "true"


def save(driver, out: Path) -> None:
    from PIL import Image

    driver.save_screenshot(str(out))
    Image.open(out).convert("RGB").quantize(colors=128, dither=Image.Dither.NONE).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True, help="a bundle with model.attention.onnx")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    a = ap.parse_args()
    if missing():
        sys.exit(f"error: {missing()}")
    with tempfile.TemporaryDirectory() as tmp:
        server = server_harness.start(a.bundle, Path(tmp) / "server.log", fake=False)
        driver = start_chromium(1360, 1000)
        try:
            by_id = lambda i: driver.find_element("id", i)  # noqa: E731
            open_page(driver, server)
            for field, value in (("max_tokens", "60"), ("seed", "7"), ("temperature", "0.8")):
                by_id(field).clear()
                by_id(field).send_keys(value)
            by_id("token-view").click()
            by_id("send").click()
            wait(driver, finished, 120)
            tokens = driver.find_elements("css selector", "#output .tok")
            driver.execute_script("arguments[0].focus()", tokens[min(6, len(tokens) - 1)])
            save(driver, a.out / "playground-completion.png")
            by_id("tab-chat").click()
            by_id("max_tokens").clear()
            by_id("max_tokens").send_keys("40")
            by_id("prompt").send_keys("Good morrow, sweet prince. What news from the court?")
            by_id("send").click()
            wait(driver, finished, 120)
            save(driver, a.out / "playground-chat.png")
            by_id("tab-inspect").click()
            by_id("inspect-run").click()
            wait(driver, lambda d: d.find_element("id", "inspect-result").is_displayed(), 120)
            cells = driver.find_elements("css selector", "#tokens .tok-cell")
            from selenium.webdriver.common.action_chains import ActionChains

            ActionChains(driver).move_to_element(cells[-1]).perform()
            big = by_id("big")  # a cell below the diagonal: its caption names the pair and the weight
            ActionChains(driver).move_to_element_with_offset(big, 45, 87).perform()
            driver.set_window_size(1360, 1240)
            save(driver, a.out / "playground-inspect.png")
            by_id("theme").click()
            save(driver, a.out / "playground-inspect-dark.png")
        finally:
            driver.quit()
            server.stop()


if __name__ == "__main__":
    main()
