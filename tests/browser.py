"""The headless browser of the browser tests: Debian's chromium through chromium-driver
(:func:`chrome_driver`, skipping with the reason when missing) and the platform pages with their
configuration (:func:`page_with_config`)."""

from __future__ import annotations

import json
import os


# ============================================================================ headless Chromium

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage",
                  # software WebGL (SwiftShader) for Neuroglancer without a GPU
                  "--use-angle=swiftshader", "--enable-unsafe-swiftshader")


def chrome_driver(user_data_dir: str, window=(1200, 900)):
    """Selenium Chrome driver on Debian's ``chromium`` + ``chromium-driver`` with a fresh profile;
    ``pytest.skip`` (with the reason) when either, or selenium, is missing."""
    import shutil

    import pytest

    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver_bin = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)
    if chromium is None or driver_bin is None:
        pytest.skip("browser test needs Debian's chromium and chromium-driver "
                    "(apt-get install -y --no-install-recommends chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("browser test needs the selenium package")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={user_data_dir}")
    opts.add_argument(f"--window-size={window[0]},{window[1]}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        return webdriver.Chrome(service=Service(driver_bin), options=opts)
    except Exception as e:  # noqa: BLE001 - a broken browser install is a skip, with the reason
        pytest.skip(f"chromium could not be started through chromedriver: {str(e).splitlines()[0]}")


def page_with_config(template: str, script_url: str, config_var: str, config: dict) -> str:
    """An HTML page from WEBKNOSSOS_PAGE/CATMAID_PAGE with ``window.<config_var> = config`` set first."""
    head = f"<script>window.{config_var} = {json.dumps(config)};</script>"
    return template.replace("<head>", "<head>" + head, 1).replace("__SCRIPT__", script_url)
