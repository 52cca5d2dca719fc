"""Driving the gateway's page (serving/gateway/static/index.html) in a real headless Chromium:
Debian's `chromium` package, driven by Playwright's Python package as a driver only (it never
downloads a browser: scripts/browser-setup.sh installs both). Used by tests/browser/test_page_browser.py
and tests/page_screenshots.py."""

from contextlib import contextmanager
import os
from pathlib import Path

CHROMIUM = Path(os.environ.get("LDM_CHROMIUM", "/usr/bin/chromium"))
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 120_000  # a generation on a busy CPU; waits end at the event, not at this

# Records every src the live preview takes, and page errors, from the first script on.
OBSERVE = """
window.__page = { previews: [], errors: [] };
window.addEventListener("error", (e) => window.__page.errors.push(String(e.message)));
window.addEventListener("unhandledrejection", (e) => window.__page.errors.push(String(e.reason)));
document.addEventListener("securitypolicyviolation", (e) => window.__page.errors.push(`CSP: ${e.violatedDirective} ${e.blockedURI}`));
document.addEventListener("DOMContentLoaded", () => {
  const preview = document.getElementById("preview");
  new MutationObserver(() => window.__page.previews.push(preview.src))
    .observe(preview, { attributes: true, attributeFilter: ["src"] });
});
"""


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (scripts/browser-setup.sh installs it)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (scripts/browser-setup.sh installs Debian's chromium)"
    return None


@contextmanager
def chromium():
    """A headless Chromium browser (Playwright's Browser), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, url: str, viewport=(1200, 900), bypass_csp=True):
    """A fresh context and page at `url`, observed (see OBSERVE). Playwright's wait_for_function
    evaluates a string, which the page's Content-Security-Policy forbids (no 'unsafe-eval'): the
    tests that wait so bypass it; test_page_browser checks the page under it once."""
    context = browser.new_context(
        accept_downloads=True, viewport={"width": viewport[0], "height": viewport[1]}, bypass_csp=bypass_csp
    )
    context.set_default_timeout(TIMEOUT_MS)
    context.add_init_script(OBSERVE)
    page = context.new_page()
    page.requested = []  # every URL the page asked for
    page.on("request", lambda request: page.requested.append(request.url))
    page.goto(url)
    page.wait_for_selector("#generate:enabled")
    return page


def page_errors(page) -> list:
    return page.evaluate("window.__page.errors")


def previews(page) -> list:
    return page.evaluate("window.__page.previews")


def wait_for_step(page, step: int) -> None:
    """Until the progress bar shows at least `step` steps done."""
    page.wait_for_function("(step) => document.getElementById('progress').value >= step", arg=step)


def set_range(page, selector: str, *values) -> None:
    """Moves a range input as a user drags it: each value in turn (in one go), an input event
    for each, then change."""
    page.eval_on_selector(
        selector,
        """(el, values) => {
        for (const value of values) {
            el.value = value;
            el.dispatchEvent(new Event("input", { bubbles: true }));
        }
        el.dispatchEvent(new Event("change", { bubbles: true }));
    }""",
        [str(v) for v in values],
    )


def start(page, prompt: str, *, seed=7, steps=25, guidance=7.5, size="auto") -> None:
    page.fill("#prompt", prompt)
    page.fill("#seed", str(seed))
    page.fill("#size", size)
    set_range(page, "#steps", steps)
    set_range(page, "#guidance_scale", guidance)
    page.click("#generate")
