"""A real browser for the tests: headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by
selenium, with a download folder.

Use it from a test module with ``from browser import browser  # noqa: F401`` (the fixture) and a test that
takes ``browser``: ``browser.open(path)`` opens a local file, ``browser.driver`` is the selenium WebDriver,
``browser.wait_for_download(name)`` returns the downloaded file's path. Where Chromium, its driver or selenium
is missing the test skips, saying why; with the environment variable CI set it fails instead (CI installs them:
.ci/run). ``start_chromium(folder)`` is the same browser without pytest (benchmarks/review_page.py).
"""

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_NAMES = ("chromedriver",)
DRIVER_FALLBACK = Path("/usr/bin/chromedriver")  # Debian's chromium-driver
WINDOW = "1280,900"


def find_program(names, fallback: Path | None = None) -> str | None:
    for name in names:
        if found := shutil.which(name):
            return found
    return str(fallback) if fallback and fallback.is_file() else None


def missing_browser() -> str:
    """Why a browser cannot start here ('' when it can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if not find_program(CHROMIUM_NAMES):
        return "no chromium on PATH (Debian: apt-get install chromium chromium-driver)"
    if not find_program(DRIVER_NAMES, DRIVER_FALLBACK):
        return "no chromedriver on PATH or at /usr/bin/chromedriver (Debian: apt-get install chromium-driver)"
    return ""


def start_chromium(downloads: Path):
    """A headless Chromium WebDriver that saves downloads into ``downloads`` without asking."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = find_program(CHROMIUM_NAMES)
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={WINDOW}",
    ):
        options.add_argument(argument)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(options=options, service=Service(find_program(DRIVER_NAMES, DRIVER_FALLBACK)))
    # headless Chromium may ignore the download prefs; the DevTools command makes sure
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    return driver


@dataclass
class Browser:
    driver: object  # selenium.webdriver.Chrome
    downloads: Path

    def open(self, path: Path) -> None:
        self.driver.get(Path(path).resolve().as_uri())

    def wait_for_download(self, name: str, timeout: float = 10.0) -> Path:
        """The downloaded file, once complete (Chromium writes a .crdownload first)."""
        path = self.downloads / name
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.is_file() and not list(self.downloads.glob("*.crdownload")):
                return path
            time.sleep(0.05)
        raise AssertionError(
            f"no download {name} within {timeout} s; the folder holds "
            f"{sorted(p.name for p in self.downloads.iterdir())}"
        )


def require_browser() -> None:
    if reason := missing_browser():
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, where the browser tests must run")
        pytest.skip(reason)


@pytest.fixture
def browser(tmp_path):
    require_browser()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = start_chromium(downloads)
    try:
        yield Browser(driver, downloads)
    finally:
        driver.quit()
