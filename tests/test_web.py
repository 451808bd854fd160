"""The browser page in headless Chromium (Debian's chromium + chromedriver, driven by selenium),
with a fake microphone playing real speech, against a real ``osum-serve`` with auth on.

Saves a screenshot to ``artifacts/web-page.png``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
KEY = "k-browser-0123456789abcdef"


def _chromium() -> tuple[str, str]:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver:
        pytest.fail("chromium and chromedriver are not installed (make test installs them with apt-get)")
    return browser, driver


def test_browser_page_shows_the_transcript_and_tags(male_clip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _chromium()
    sil = np.zeros(16000, np.float32)
    wav = tmp_path / "mic.wav"  # Chromium loops this file as the microphone
    sf.write(wav, np.concatenate([sil, male_clip, sil, sil]), 16000, subtype="PCM_16")
    env = dict(os.environ, OSUM_API_KEYS=f"browser:{KEY}")
    proc = subprocess.Popen([sys.executable, "-m", "streaming.app", "--model", "tiny", "--grpc-port", "0", "--ws-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    driver = None
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        port = json.loads(line)["ws_port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
            assert page.headers["Content-Type"].startswith("text/html") and b"app.js" in page.read()
        opts = webdriver.ChromeOptions()
        opts.binary_location = browser
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                    f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
                    "--window-size=1100,800"):  # fmt: skip
            opts.add_argument(arg)
        driver = webdriver.Chrome(options=opts, service=Service(driver_path))
        driver.get(f"http://127.0.0.1:{port}/")
        driver.find_element(By.ID, "key").send_keys(KEY)  # sent as the WebSocket subprotocol ["token", key]
        driver.find_element(By.ID, "mic").click()

        def rendered(d):  # type: ignore[no-untyped-def]
            finals = [e.text for e in d.find_elements(By.CSS_SELECTOR, ".utt.final .text") if e.text.strip()]
            chips = [e.get_attribute("data-kind") for e in d.find_elements(By.CSS_SELECTOR, ".chip")]
            return (finals, chips) if finals and chips else False

        finals, chips = WebDriverWait(driver, 120, poll_frequency=0.5).until(rendered)
        out = ROOT / "artifacts"
        out.mkdir(exist_ok=True)
        driver.save_screenshot(str(out / "web-page.png"))
        assert {"emotion", "style", "events"} <= set(chips)
        assert "after the end of speech" in driver.find_element(By.ID, "latency").text
        assert driver.find_element(By.ID, "status").text == "listening"
        errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".error")]
        assert not errors, errors
    finally:
        if driver is not None:
            driver.quit()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=60)  # also closes the pipes
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
