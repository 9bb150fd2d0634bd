"""The chat page at `/`, in a real headless Chromium (Debian's chromium and chromium-driver) driven by selenium against
the real server: the streamed answer shown is the one the `openai` client gets, the route and /health are shown, an
API key is asked for, and the page reaches no other origin. A screenshot is kept as an artifact."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import openai
import pytest
from serving_helpers import MODEL_ID, open_model

from edgepack.serve.app import ServerConfig, start_server_thread

ARTIFACTS = Path(os.environ.get("EDGEPACK_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "build" /
                                "test-artifacts"))
MAX_TOKENS = 16
QUESTION = "Say hello to the sea."
SYSTEM = "You are brief."
FOLLOW_UP = "And to the hills."


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        message = "headless Chromium is not installed: apt-get install chromium chromium-driver"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,760"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


def ask(browser, text: str, system: str = "") -> None:
    """Type `text` (and the system prompt) at temperature 0 and wait until the page marks the answer complete."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    system_box = browser.find_element(By.ID, "system")
    system_box.clear()
    if system:
        system_box.send_keys(system)
    browser.execute_script("const slider = document.getElementById('temperature'); slider.value = '0';"
                           "slider.dispatchEvent(new Event('input'));"  # as dragging it does: the label follows
                           f"document.getElementById('max-tokens').value = '{MAX_TOKENS}';")
    done_before = len(browser.find_elements(By.CSS_SELECTOR, ".turn.assistant[data-complete='true']"))
    browser.find_element(By.ID, "message").send_keys(text)
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 30).until(
        lambda b: len(b.find_elements(By.CSS_SELECTOR, ".turn.assistant[data-complete='true']")) > done_before
        or b.find_elements(By.CSS_SELECTOR, ".turn.error"))


def api_answer(server, messages: list[dict]) -> str:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    return client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=MAX_TOKENS,
                                          temperature=0).choices[0].message.content


def shown_answers(browser) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".turn.assistant .text")]


def test_the_page_streams_the_answer_the_api_gives(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "model-name").text == MODEL_ID)
    ask(browser, QUESTION, SYSTEM)
    conversation = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    first = api_answer(server, conversation)
    assert shown_answers(browser) == [first.strip()]  # the browser's .text trims the ends of what it shows
    turn = browser.find_element(By.CSS_SELECTOR, ".turn.assistant")
    assert turn.get_attribute("data-route") == "local"
    assert "route: local" in turn.find_element(By.CSS_SELECTOR, ".meta").text
    WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#health dd[data-field='answers']"))
    assert browser.find_element(By.CSS_SELECTOR, "#health dd[data-field='model']").text == MODEL_ID

    ask(browser, FOLLOW_UP, SYSTEM)  # the first turn is sent again
    conversation += [{"role": "assistant", "content": first}, {"role": "user", "content": FOLLOW_UP}]
    second = api_answer(server, conversation)
    assert shown_answers(browser) == [first.strip(), second.strip()]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "chat_page.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000

    # an API error is shown, and the refused question stays out of the conversation sent next
    browser.execute_script("document.getElementById('message').value = arguments[0];", "sea " * 400)
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".turn.error"))
    assert "maximum context length" in browser.find_element(By.CSS_SELECTOR, ".turn.error").text
    browser.find_element(By.ID, "message").clear()
    ask(browser, FOLLOW_UP, SYSTEM)
    conversation += [{"role": "assistant", "content": second}, {"role": "user", "content": FOLLOW_UP}]
    assert shown_answers(browser)[-1] == api_answer(server, conversation).strip()


def test_the_page_asks_for_the_api_key_and_then_answers(browser, tiny_gguf):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    model = open_model(tiny_gguf)
    running = start_server_thread(model, ServerConfig(port=0, api_key="sekret"))
    try:
        browser.get(running.url + "/")
        WebDriverWait(browser, 10).until(lambda b: "needs an API key" in b.find_element(By.ID, "key-note").text)
        key = browser.find_element(By.ID, "api-key")
        key.send_keys("sekret", Keys.TAB)  # the change event
        WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "model-name").text == MODEL_ID)
        ask(browser, QUESTION)
        turn = browser.find_element(By.CSS_SELECTOR, ".turn.assistant")
        assert turn.get_attribute("data-route") == "local" and not browser.find_elements(By.CSS_SELECTOR,
                                                                                         ".turn.error")
    finally:
        running.stop()
        model.close()


def test_the_page_is_self_contained(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert not re.search(r"https?://", page.text)  # no CDN, font or other origin: it works offline
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", page.text)
