"""A real headless Chromium for tests, driven through Selenium and Debian's chromium-driver.

Debian ships chromium and its matching chromedriver (packages ``chromium`` and ``chromium-driver``), so
no browser or driver is ever downloaded by a tool of its own. When they are missing and the tests run as
root on a Debian/Ubuntu machine (as CI does), ``find_chromium`` installs them with apt-get; otherwise it
fails with the command to run.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

PACKAGES = ("chromium", "chromium-driver", "fonts-dejavu-core")
BROWSERS = ("chromium", "chromium-browser")
INSTALL_TIMEOUT = 900


def _which() -> tuple[str | None, str | None]:
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    return browser, shutil.which("chromedriver")


def find_chromium() -> tuple[str, str]:
    """(chromium, chromedriver) paths, installing Debian's packages first when they are missing."""
    browser, driver = _which()
    if browser and driver:
        return browser, driver
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise RuntimeError(f"the browser tests need Chromium and its driver: "
                           f"sudo apt-get install -y {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True, timeout=INSTALL_TIMEOUT).returncode != 0:
        # a fresh machine may have no package lists yet
        subprocess.run([apt, "update", "-qq"], env=env, check=True, capture_output=True,
                       timeout=INSTALL_TIMEOUT)
        subprocess.run(install, env=env, check=True, capture_output=True, timeout=INSTALL_TIMEOUT)
    browser, driver = _which()
    if not (browser and driver):
        raise RuntimeError(f"apt-get installed {' '.join(PACKAGES)}, yet chromium or chromedriver is not "
                           f"on PATH")
    return browser, driver


@contextlib.contextmanager
def headless_chromium(width: int = 1300, height: int = 1000) -> Iterator:
    """A Selenium WebDriver on a headless Chromium (its own profile and process; quit on exit)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = find_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--allow-file-access-from-files", f"--window-size={width},{height}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def broken_images(driver) -> list[str]:
    """The <img> elements of the loaded page that did not load: (alt or the start of src) each."""
    return driver.execute_script(
        "return Array.from(document.images)"
        "  .filter(img => !img.complete || img.naturalWidth === 0)"
        "  .map(img => img.alt || img.src.slice(0, 80));")


def save_page_screenshot(driver, path: Path, max_height: int = 16000) -> Path:
    """The whole page (up to ``max_height`` pixels) as one PNG."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    width = driver.get_window_size()["width"]
    driver.set_window_size(width, min(max_height, height + 100))
    driver.save_screenshot(str(path))
    return path
