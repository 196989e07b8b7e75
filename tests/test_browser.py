"""The chat page in a real browser: Debian's chromium, headless, driven by selenium through chromedriver.

The browser tests are skipped, with the reason, only where no browser is
installed; the checks of page.py's embedded configuration run everywhere.
Set CHAT_SCREENSHOT=path.png to keep a screenshot of the conversation.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from serving import CPU, serving

from t5dialog.generation import generate_response
from t5dialog.models import GENERATION_DEFAULTS
from t5dialog.serve import page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="no browser: chromium and chromedriver are not installed "
                                       "(apt-get install chromium chromium-driver)")
OPTIONS = {**GENERATION_DEFAULTS, "max_new_tokens": 24}  # the server's defaults, which the page's controls start from
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=820,640"]


@pytest.fixture(scope="module")
def url(tiny_model, loaded):
    with serving(loaded, tiny_model, OPTIONS) as listener:
        yield listener.url


@pytest.fixture(scope="module")
def expected(loaded):
    """The reply the server's model gives to ``text`` after ``history``, with its options and ``changed``."""
    model, tokenizer = loaded

    def reply(text, history=(), **changed):
        options = {**OPTIONS, **changed}
        return generate_response(text, model, tokenizer, CPU, history=list(history), max_length=64, **options)

    return reply


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
    from selenium.webdriver.support.ui import WebDriverWait

    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.bot"))
    driver.find_element(By.ID, "message").send_keys(text)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, 300).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.bot")) > before)
    return finished_reply(driver)


def finished_reply(driver) -> str:
    """Wait for the reply being written to end; its text, which must hold no note saying it failed."""
    assert wait_for_the_reply(driver) == "", "the turn failed"
    assert driver.find_element(By.ID, "status").text == ""
    return driver.execute_script("const b = document.querySelectorAll('.msg.bot'); return b[b.length - 1].textContent;")


def wait_for_the_reply(driver) -> str:
    """Wait for the reply being written to end; the note its bubble shows when it failed ("" when it did not)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 300).until(  # a hang guard: the tiny model answers 24 tokens in well under a second
        lambda d: not d.find_elements(By.CSS_SELECTOR, ".writing"))
    return driver.execute_script("const n = document.querySelector('.msg.bot:last-of-type .note'); "
                                 "return n ? n.textContent : '';")


def writing_has_begun(driver):
    """Wait until the reply being written shows its first words."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 300).until(lambda d: d.execute_script(
        "const w = document.querySelector('.bot.writing'); return w && w.textContent.length > 0;"))


def set_control(driver, name, value):
    driver.execute_script("document.getElementById(arguments[0]).value = arguments[1];", name, str(value))


@needs_browser
def test_a_conversation_in_the_browser_streams_keeps_history_and_resets(browser, url, expected, tmp_path):

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


LONG = 300  # max_new_tokens for a reply that is still being written when the test acts (the tiny model never ends one)


@needs_browser
def test_enter_while_a_reply_is_written_keeps_that_reply_and_the_typed_text(browser, url, expected):
    browser.get(url)
    set_control(browser, "max_new_tokens", LONG)
    box = browser.find_element(By.ID, "message")
    box.send_keys("Hello there .", Keys.ENTER)
    writing_has_begun(browser)
    assert browser.find_element(By.ID, "stop").is_displayed() and not browser.find_element(By.ID, "send").is_displayed()
    box.send_keys("What time is it ?", Keys.ENTER)
    # Had the reply ended before that Enter, the message would have gone out and left the box.
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.you")) == 1
    assert box.get_attribute("value") == "What time is it ?"
    assert "stays here" in browser.find_element(By.ID, "status").text

    first = finished_reply(browser)  # not cancelled: written to its end
    assert first == expected("Hello there .", max_new_tokens=LONG)
    assert box.get_attribute("value") == "What time is it ?" and browser.find_element(By.ID, "send").is_displayed()
    set_control(browser, "max_new_tokens", 24)
    box.send_keys(Keys.ENTER)  # now it goes, after the first turn
    assert wait_for_the_reply(browser) == "" and box.get_attribute("value") == ""
    second = browser.find_elements(By.CSS_SELECTOR, ".msg.bot")[-1].text
    assert second == expected("What time is it ?", ["Hello there .", first])


UNREACHABLE = "the server did not answer: is `python infer.py --serve` still running?"


@needs_browser
def test_a_stopped_refused_or_unanswered_turn_says_so_and_gives_the_message_back(browser, url, expected):
    browser.get(url)
    box = browser.find_element(By.ID, "message")
    set_control(browser, "max_new_tokens", LONG)
    box.send_keys("Hello there .", Keys.ENTER)
    writing_has_begun(browser)
    browser.find_element(By.ID, "stop").click()
    assert wait_for_the_reply(browser) == "stopped"
    assert box.get_attribute("value") == "Hello there ."  # back in the box, to send again

    set_control(browser, "max_new_tokens", 5000)  # above the server's limit: it answers 400 with one line
    box.send_keys(Keys.ENTER)
    assert wait_for_the_reply(browser) == "max_new_tokens 5000 is above this server's limit of 1024"
    assert box.get_attribute("value") == "Hello there ."

    set_control(browser, "max_new_tokens", 24)
    # What fetch does when nothing listens on the port.
    browser.execute_script("window.realFetch = fetch; window.fetch = () => Promise.reject(new TypeError('Failed to fetch'));")
    box.send_keys(Keys.ENTER)
    assert wait_for_the_reply(browser) == UNREACHABLE
    assert box.get_attribute("value") == "Hello there ."
    before = browser.execute_script("return getComputedStyle(document.querySelector('.bot.failed'), '::before').content;")
    assert "(empty reply)" not in before
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.you.cancelled")) == 3

    browser.execute_script("window.fetch = window.realFetch;")
    box.send_keys(Keys.ENTER)
    assert wait_for_the_reply(browser) == ""
    # None of the failed turns was sent as conversation.
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.bot")[-1].text == expected("Hello there .")


@needs_browser
def test_the_page_fits_a_phone_screen(browser, url):
    browser.set_window_size(390, 800)
    browser.get(url)
    assert browser.execute_script("return window.innerWidth;") <= 400  # the window really is that narrow
    browser.find_element(By.TAG_NAME, "summary").click()  # the decoding settings open too
    set_control(browser, "max_new_tokens", LONG)  # a reply longer than the log is high
    say(browser, "Hello there .")
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth;")
    assert browser.execute_script(  # each bubble holds its text: none is squeezed shorter than it
        "return [...document.querySelectorAll('.msg')].every((m) => m.scrollHeight <= m.clientHeight);")
    for button in ("send", "reset"):
        inside = browser.execute_script("const r = document.getElementById(arguments[0]).getBoundingClientRect(); "
                                        "return r.left >= 0 && r.right <= window.innerWidth && r.bottom <= window.innerHeight;",
                                        button)
        assert inside, f"the {button} button is not fully on the screen"


@needs_browser
def test_a_long_conversation_sends_only_its_latest_turns_that_fit(browser, url, expected):
    # 400 turns of ~70 characters but ~190 bytes each: the body is over 64 KiB by bytes, not by characters.
    history = [f"turn {i} {'☕' * 60} ." for i in range(400)]
    body = json.dumps({"message": "Hi .", "history": history, "stream": True, **OPTIONS}, ensure_ascii=False)
    assert len(body) < 65536 < len(body.encode())
    browser.get(url)
    browser.execute_script("chat.history = arguments[0];", history)
    assert say(browser, "Hi .") == expected("Hi .", history)  # the model reads only the latest turns anyway
    assert browser.execute_script("return chat.history.length;") == 402  # the tab keeps them all


ODD_NAME = "a<!--<script>"  # would end the page's <script> early, were it embedded as it is


def test_a_scratch_checkpoint_is_named_a_demo_and_the_tiny_one_is_not(tiny_model, tmp_path):
    assert page.notice(tiny_model) is None
    scratch = tmp_path / ODD_NAME
    scratch.mkdir()
    (scratch / "run_config.json").write_text(json.dumps({"model": "scratch"}))
    assert page.notice(scratch) == "from-scratch demo model: expect odd replies"


def embedded_config(html: str) -> str:
    return html.split("const CONFIG = ", 1)[1].split(";  //", 1)[0]


def test_the_embedded_configuration_holds_no_angle_bracket(tmp_path):
    folder = tmp_path / ODD_NAME
    folder.mkdir()
    config = embedded_config(page.render(folder, OPTIONS, LIMITS, 65536).decode())
    assert "<" not in config and json.loads(config)["checkpoint"] == ODD_NAME


LIMITS = {"max_new_tokens": 1024, "num_beams": 8}


@needs_browser
def test_the_header_shows_the_notice_and_an_odd_checkpoint_name(browser, url, tmp_path):
    browser.get(url)
    assert not browser.find_element(By.ID, "notice").is_displayed()  # the tiny checkpoint is no demo
    folder = tmp_path / ODD_NAME
    folder.mkdir()
    (folder / "run_config.json").write_text(json.dumps({"model": "scratch"}))
    saved = tmp_path / "page.html"
    saved.write_bytes(page.render(folder, OPTIONS, LIMITS, 65536))
    browser.get(saved.as_uri())  # the page alone: its script runs without a server
    assert browser.find_element(By.ID, "checkpoint").text == ODD_NAME
    assert browser.find_element(By.ID, "notice").text == "from-scratch demo model: expect odd replies"
    assert browser.find_element(By.ID, "max_new_tokens").get_attribute("value") == "24"
    assert browser.find_element(By.ID, "seed").get_attribute("value") == ""  # no seed unless one is given
