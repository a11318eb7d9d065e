"""A real browser for UI tests: Debian's chromium driven by Playwright, and where its evidence goes.

`.ci/run` installs chromium at /usr/bin/chromium; Playwright's own browser download (`playwright
install`) cannot work on this network, so Playwright is pointed at that executable instead. Every
`Browser` gets a fresh temporary profile, so no state (cookies, local storage: MLflow keeps its
GenAI/model-training choice there) leaks from one test module, or one developer, to the next.

Screenshots and, on failure, the page's HTML and text go to `screenshot_dir()`:
`$OPPEN_TEST_OUTPUT/screenshots/`, by default `<repo>/test-output/screenshots/` (gitignored).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

import pytest

from oppen.local_stack import PROJECT_DIR

CHROMIUM = Path("/usr/bin/chromium")
# Headless in a closed network: without the background-networking flags chromium keeps dialling
# Google's services and those refused connections slow and clutter every page load.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Prefect's UI scrolls inside an inner panel, so a full-page screenshot stops at the window's
# height: a tall window is what gets the whole page into one picture (MLflow's UI likewise).
TALL_VIEWPORT = {"width": 1440, "height": 2400}
# Generous: a loaded CI machine (2 cores, a training run just finished) renders these SPAs slowly.
PAGE_TIMEOUT_MS = 90_000


def output_dir() -> Path:
    """`$OPPEN_TEST_OUTPUT`, else `<repo>/test-output` (gitignored)."""
    return Path(os.environ.get("OPPEN_TEST_OUTPUT") or PROJECT_DIR / "test-output")


def screenshot_dir() -> Path:
    path = output_dir() / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def require_chromium() -> None:
    """Skip (with the reason in the summary) where the browser is not installed."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: the browser tier needs Debian's chromium (`apt-get install -y chromium`; "
                    ".ci/run installs it)")


class Browser:
    """One headless chromium with a throwaway profile; pages open with a tall viewport.

    Use as a context manager: it owns the Playwright driver, the browser process and the profile
    directory, and removes all three on exit, also when a test fails.
    """

    def __init__(self, viewport: dict[str, int] | None = None) -> None:
        self.viewport = viewport or TALL_VIEWPORT
        self._playwright = None
        self._context = None
        self._profile: str | None = None
        self.console_errors: list[str] = []

    def __enter__(self) -> Self:
        from playwright.sync_api import sync_playwright

        self._profile = tempfile.mkdtemp(prefix="oppen-chromium-")
        try:
            self._playwright = sync_playwright().start()
            self._context = self._playwright.chromium.launch_persistent_context(
                self._profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
                viewport=self.viewport)
            self._context.set_default_timeout(PAGE_TIMEOUT_MS)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._context is not None:
                self._context.close()
        finally:
            self._context = None
            if self._playwright is not None:
                self._playwright.stop()
                self._playwright = None
            if self._profile is not None:
                shutil.rmtree(self._profile, ignore_errors=True)
                self._profile = None

    def open(self, url: str):
        """A new page at `url`, loaded (the SPA's own data still arrives later: wait for its content)."""
        page = self._context.new_page()
        # Kept for the failure report: a blank page is usually explained by a failed API call.
        page.on("console", lambda message: self.console_errors.append(f"{page.url}: {message.text}")
                if message.type == "error" else None)
        page.goto(url, wait_until="domcontentloaded")
        return page

    @contextmanager
    def evidence(self, page, name: str, report=print) -> Iterator[None]:
        """Screenshot the page as the block leaves it, pass or fail; on failure also its HTML and text.

        `report` gets one line per saved file, so a CI log says where the pictures are. The page is
        closed afterwards (a module's tests open several; each SPA holds its own polling and memory).
        """
        try:
            yield
        except BaseException:
            try:
                for path in self.save(page, name, html=True):
                    report(f"saved {path}")
            except Exception as error:  # noqa: BLE001 - the test's own failure is the one to report
                report(f"could not save the page's evidence: {error!r}")
            if self.console_errors:
                report("browser console errors:\n  " + "\n  ".join(self.console_errors[-20:]))
            raise
        else:
            for path in self.save(page, name):
                report(f"saved {path}")
        finally:
            page.close()

    @staticmethod
    def save(page, name: str, html: bool = False) -> list[Path]:
        base = screenshot_dir() / safe_name(name)
        saved = [base.with_suffix(".png")]
        # full_page as well as the tall viewport: MLflow's overview scrolls the document itself.
        page.screenshot(path=saved[0], full_page=True)
        if html:
            saved.append(base.with_suffix(".html"))
            saved[-1].write_text(page.content())
            saved.append(base.with_suffix(".txt"))
            saved[-1].write_text(f"{page.url}\n\n{page.inner_text('body')}")
        return saved
