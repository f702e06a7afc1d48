"""Open an HTML report in a real headless browser and say what a reader would meet.

Playwright drives the system's Chromium (Debian's `chromium` package, which `make setup` installs
where it can; nothing is downloaded at run time). :func:`inspect` loads a page as a reader on a
laptop would (1366x768), and returns what went wrong: console errors, uncaught exceptions, script
dialogs (an `alert` from injected HTML would show here), requests that failed or left the file,
images that did not load, and whether the summary table is visible on the first screen.
"""

from __future__ import annotations

import shutil
from pathlib import Path

VIEWPORT = {"width": 1366, "height": 768}
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


# the text a reader sees without scrolling: every text node with a visible box above the fold
FIRST_SCREEN_TEXT = """() => {
  const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const out = [];
  for (let n = walk.nextNode(); n; n = walk.nextNode()) {
    if (!n.textContent.trim() || !n.parentElement.checkVisibility()) continue;   // a closed <details>
    const r = document.createRange(); r.selectNodeContents(n);
    const b = r.getBoundingClientRect();
    if (b.width > 0 && b.height > 0 && b.top < window.innerHeight && b.bottom > 0) out.push(n.textContent.trim());
  }
  return out.join(' ');
}"""
# tables that do not fit the page: wider than the viewport, or scrolled inside their box
WIDE_TABLES = """() => [...document.querySelectorAll('table')].map(t => {
  const b = t.getBoundingClientRect(), box = t.parentElement;
  return {caption: (t.caption ? t.caption.textContent : t.innerText).slice(0, 60), width: Math.round(b.width),
          right: Math.round(b.right), box: box.clientWidth, scroll: box.scrollWidth};
}).filter(t => t.right > window.innerWidth || t.scroll > t.box + 1)"""
def chromium_path() -> str | None:
    """The system Chromium, or None."""
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


def inspect(html: str | Path, screenshot: str | Path | None = None, first_screen: str = "table") -> dict:
    """Load `html` in headless Chromium; return the findings (empty lists mean all is well)."""
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    if exe is None:
        raise RuntimeError("no Chromium found: install Debian's `chromium` package (make setup does, as root)")
    url = Path(html).resolve().as_uri()
    found = {"console_errors": [], "page_errors": [], "dialogs": [], "failed_requests": [],
             "external_requests": [], "images": [], "broken_images": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.on("console", lambda m: m.type == "error" and found["console_errors"].append(m.text))
            page.on("pageerror", lambda e: found["page_errors"].append(str(e)))
            page.on("dialog", lambda d: (found["dialogs"].append(d.message), d.dismiss()))
            page.on("requestfailed", lambda r: found["failed_requests"].append(r.url))
            page.on("request", lambda r: r.url != url and not r.url.startswith("data:")
                    and found["external_requests"].append(r.url))
            page.goto(url, wait_until="load")
            page.wait_for_timeout(300)  # let late scripts (if any) run
            found["images"] = page.eval_on_selector_all(
                "img", "els => els.map(e => ({src: e.src.slice(0, 40), ok: e.complete && e.naturalWidth > 0,"
                       " w: e.naturalWidth, h: e.naturalHeight}))")
            found["broken_images"] = [i for i in found["images"] if not i["ok"]]
            box = page.locator(first_screen).first.bounding_box() if page.locator(first_screen).count() else None
            found["first_screen_box"] = box
            found["first_screen_visible"] = bool(box and box["y"] >= 0 and box["y"] + min(box["height"], 200)
                                                 <= VIEWPORT["height"] and box["width"] > 0)
            found["text"] = page.inner_text("body")
            found["first_screen_text"] = page.evaluate(FIRST_SCREEN_TEXT)
            found["wide_tables"] = page.evaluate(WIDE_TABLES)
            if screenshot:
                page.screenshot(path=str(screenshot))
        finally:
            browser.close()
    return found
