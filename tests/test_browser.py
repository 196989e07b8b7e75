"""The chat page in a real browser: Debian's chromium, headless, driven by selenium through chromedriver.

Skipped, with the reason, only where no browser is installed. Set
CHAT_SCREENSHOT=path.png to keep a screenshot of the conversation.
"""

import os
import shutil
import threading
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from t5dialog.generation import generate_response, load
from t5dialog.models import GENERATION_DEFAULTS
from t5dialog.serve import server as serve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="no browser: chromium and chromedriver are not installed "
                                       "(apt-get install chromium chromium-driver)")
CPU = torch.device("cpu")
OPTIONS = {**GENERATION_DEFAULTS, "max_new_tokens": 24}  # the server's defaults, which the page's controls start from
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=820,640"]


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load(tiny_model, CPU)


@pytest.fixture(scope="module")
def url(tiny_model, loaded):
    model, tokenizer = loaded
    engine = serve.Engine(model, tokenizer, CPU, "fp32", 64, OPTIONS, tiny_model)
    server = serve.open_server(Namespace(serve=True, port=0), None)
    thread = threading.Thread(target=serve.serve, args=(server, engine), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    thread.join()


@pytest.fixture
def browser(tmp_path, monkeypatch):
    from selenium import webdriver

    # Selenium talks to chromedriver on 127.0.0.1 over HTTP, and a proxy the user exported would take that
    # connection; the page is on loopback too, which Chromium never sends to a proxy.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


# Every length the last reply bubble's text goes through: more than two means it grew piece by piece.
WATCH = """
window.lengths = [];
new MutationObserver(() => {
  const bots = document.querySelectorAll(".msg.bot");
  if (bots.length) window.lengths.push(bots[bots.length - 1].textContent.length);
}).observe(document.getElementById("log"), {subtree: true, childList: true, characterData: true});
"""


def say(driver, text) -> str:
    """Type a message, send it, wait for the reply to finish; its text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.bot"))
    driver.find_element(By.ID, "message").send_keys(text)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, 300).until(  # a hang guard: the tiny model answers in well under a second
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.bot")) > before and not d.find_elements(By.CSS_SELECTOR, ".writing"))
    assert driver.find_element(By.ID, "status").text == ""
    return driver.execute_script("const b = document.querySelectorAll('.msg.bot'); return b[b.length - 1].textContent;")


def test_a_conversation_in_the_browser_streams_keeps_history_and_resets(browser, url, loaded, tmp_path):
    from selenium.webdriver.common.by import By

    model, tokenizer = loaded

    def expected(text, history=()):
        return generate_response(text, model, tokenizer, CPU, history=list(history), max_length=64, **OPTIONS)

    browser.get(url)
    assert browser.title == "T5 DailyDialog chat"
    assert browser.find_element(By.ID, "max_new_tokens").get_attribute("value") == "24"  # the server's defaults
    browser.execute_script(WATCH)
    first = say(browser, "Hello there .")
    assert first == expected("Hello there .")
    assert len(set(browser.execute_script("return window.lengths;"))) > 2  # it appeared piece by piece
    second = say(browser, "What time is it ?")
    assert second == expected("What time is it ?", ["Hello there .", first])  # the tab's conversation was sent

    shot = Path(os.environ.get("CHAT_SCREENSHOT") or tmp_path / "chat.png")
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    browser.switch_to.new_window("tab")  # another tab is another conversation
    browser.get(url)
    assert say(browser, "What time is it ?") == expected("What time is it ?")
    browser.close()
    browser.switch_to.window(browser.window_handles[0])

    browser.find_element(By.ID, "reset").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == [] and browser.find_element(By.ID, "empty").is_displayed()
    assert say(browser, "What time is it ?") == expected("What time is it ?")  # the conversation starts afresh
