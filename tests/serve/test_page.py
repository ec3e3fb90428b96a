"""The chat page at / in a real browser (headless Chromium through Selenium) against a real `llamakit serve`:
Enter sends, the reply streams in and equals the API's answer to the same messages, the conversation and the
system prompt are sent, Stop and "New chat" end a reply, and the API key field unlocks a server that needs one."""

import re
import time
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import API_KEY, MODEL, served

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")  # Debian's chromium, chromium-driver
WAIT = 30  # seconds for anything the page waits on; generous, as the machine may be shared
LONG_WINDOW = 4096  # a context so long that a reply runs for seconds: time to press Stop or New chat

# Records, at each change of #log, the last reply's length and whether the page was busy: proof of streaming.
WATCH = """
window.seen = [];
new MutationObserver(() => {
  const replies = document.querySelectorAll("#log .message.assistant");
  const length = replies.length ? replies[replies.length - 1].textContent.length : 0;
  window.seen.push({length, busy: document.getElementById("send").disabled});
}).observe(document.getElementById("log"), {childList: true, subtree: true, characterData: true});
"""


@pytest.fixture(scope="module")
def driver():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"no browser: {CHROMIUM} or {CHROMEDRIVER} is missing (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the `test` extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.binary_location = str(CHROMIUM)
    chrome = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    chrome.set_page_load_timeout(WAIT)
    chrome.set_script_timeout(WAIT)
    yield chrome
    chrome.quit()


@pytest.fixture
def page(driver):
    """The browser; afterwards, the page's console holds no script error."""
    driver.get_log("browser")  # drop what earlier tests left
    yield driver
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and e["source"] != "network"]
    assert not errors, errors  # network: the 401s and 400s the tests provoke on purpose




@pytest.fixture(scope="module")
def server(assets, tmp_path_factory):
    """No key, the model's own 512-token window."""
    yield from served(assets, tmp_path_factory, "page", api_key=None)


@pytest.fixture(scope="module")
def long_server(assets, tmp_path_factory):
    yield from served(assets, tmp_path_factory, "page", "--max-seq-len", str(LONG_WINDOW), "--extend-context",
                      api_key=None)


@pytest.fixture(scope="module")
def keyed_server(assets, tmp_path_factory):
    yield from served(assets, tmp_path_factory, "page", api_key=API_KEY)


def wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, poll_frequency=0.02).until(lambda d: condition(), f"waited {WAIT} s for {what}")


def element(driver, id_: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, id_)


def messages(driver, kind: str) -> list[str]:
    """The texts of #log's `.message.<kind>` divs, exactly (Selenium's .text would trim them)."""
    return driver.execute_script(f"return [...document.querySelectorAll('#log .message.{kind}')]"
                                 ".map(div => div.textContent)")


def fill(driver, id_: str, value: str) -> None:
    field = element(driver, id_)
    field.clear()
    if value:
        field.send_keys(value)


def open_page(driver, server, *, max_tokens: str = "", system: str = "", model_shown: str = MODEL) -> None:
    """A fresh page at temperature 0 (so replies are the API's greedy answers), watched for streaming."""
    driver.get(f"{server.url}/")
    wait(driver, lambda: model_shown in element(driver, "model").text, f"the model name {model_shown!r} in the header")
    fill(driver, "temperature", "0")
    fill(driver, "max-tokens", max_tokens)
    fill(driver, "system", system)
    driver.execute_script(WATCH)


def say(driver, text: str) -> None:
    """Types into the message box and presses Enter."""
    from selenium.webdriver.common.keys import Keys

    element(driver, "input").send_keys(text, Keys.ENTER)


def idle(driver) -> bool:
    return element(driver, "send").is_enabled() and not element(driver, "stop").is_enabled()


def reply_to(driver, text: str) -> str:
    """Sends `text` with Enter and waits for the whole reply."""
    replies, errors = len(messages(driver, "assistant")), len(messages(driver, "error"))
    say(driver, text)
    # The reply's div appears in the same step that disables Send, so both together mean "done"; a failed
    # request removes that div and shows an error instead.
    wait(driver, lambda: idle(driver) and (len(messages(driver, "assistant")) > replies
                                           or len(messages(driver, "error")) > errors), f"the reply to {text!r}")
    assert len(messages(driver, "error")) == errors, messages(driver, "error")
    return messages(driver, "assistant")[-1]


def start_reply(driver, text: str) -> None:
    """Sends `text` and returns as soon as the first words of the reply show."""
    before = len(messages(driver, "assistant"))
    say(driver, text)
    wait(driver, lambda: len(messages(driver, "assistant")) > before and messages(driver, "assistant")[-1],
         f"the first words of the reply to {text!r}")


def api_reply(server, dialog: list[dict], **fields) -> str:
    """What the API answers at temperature 0 (not streamed), for the page's replies to equal."""
    response = httpx.post(f"{server.base_url}/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": MODEL, "messages": dialog, "temperature": 0, **fields}, timeout=WAIT)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def finish_reasons(server) -> list[str]:
    """How each request the server has logged ended, in order ("cancelled" for a client that left)."""
    return re.findall(r" completion tokens, .* finish (\w+)$", server.log_text(), re.MULTILINE)


def metric(server, name: str) -> float:
    """A value from the server's /metrics (Prometheus' text format)."""
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=WAIT).text
    return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_enter_sends_and_the_reply_streams_in_as_the_api_gives_it(page, server):
    open_page(page, server)
    reply = reply_to(page, "Hello")
    assert messages(page, "user") == ["Hello"] and element(page, "input").get_attribute("value") == ""
    assert reply and reply == api_reply(server, [user("Hello")])  # no max_tokens: the rest of the window
    seen = page.execute_script("return window.seen")
    lengths = [s["length"] for s in seen]
    assert lengths == sorted(lengths) and lengths[-1] == len(reply)
    partial = {s["length"] for s in seen if s["busy"] and 0 < s["length"] < len(reply)}
    assert len(partial) >= 2, seen  # shown part by part while the request ran, not all at the end
    assert not messages(page, "error")


def test_a_second_message_carries_the_conversation(page, server):
    open_page(page, server, max_tokens="24")  # two turns must fit the 512-token window
    first = reply_to(page, "Hello")
    assert first == api_reply(server, [user("Hello")], max_tokens=24)
    second = reply_to(page, "Tell me more")
    history = [user("Hello"), assistant(first), user("Tell me more")]
    assert second == api_reply(server, history, max_tokens=24)
    assert second != api_reply(server, history[-1:], max_tokens=24)  # the history changes the answer: seen here
    assert messages(page, "user") == ["Hello", "Tell me more"] and messages(page, "assistant") == [first, second]


def test_the_system_prompt_is_sent(page, server):
    system = "Tell short stories."
    open_page(page, server, max_tokens="40", system=system)
    reply = reply_to(page, "A story, please.")
    dialog = [{"role": "system", "content": system}, user("A story, please.")]
    assert reply == api_reply(server, dialog, max_tokens=40)
    assert reply != api_reply(server, dialog[1:], max_tokens=40)  # the system prompt changes the answer


def test_stop_ends_a_long_reply_early_and_keeps_what_was_shown(page, long_server):
    open_page(page, long_server)  # no max tokens: the reply would run to the end of the 4096-token window
    requests, generated = len(finish_reasons(long_server)), metric(long_server, "llamakit_generation_tokens_total")
    start_reply(page, "Tell me a long story")
    element(page, "stop").click()
    wait(page, lambda: idle(page), "Send to be enabled again after Stop")
    partial = messages(page, "assistant")[-1]
    time.sleep(0.5)
    assert partial and messages(page, "assistant") == [partial] and not messages(page, "error")
    ended = wait(page, lambda: finish_reasons(long_server)[requests:], "the server to log the stopped request")
    assert ended == ["cancelled"]  # the page hung up, and the server let go of the slot long before the window's end
    assert metric(long_server, "llamakit_requests_running") == 0
    assert metric(long_server, "llamakit_generation_tokens_total") - generated < LONG_WINDOW / 2
    # The stopped reply stays in the conversation, as shown.
    fill(page, "max-tokens", "8")
    follow_up = reply_to(page, "And then?")
    history = [user("Tell me a long story"), assistant(partial), user("And then?")]
    assert follow_up == api_reply(long_server, history, max_tokens=8)


def test_new_chat_during_a_reply_starts_a_fresh_conversation(page, long_server):
    open_page(page, long_server)
    start_reply(page, "Tell me a long story")
    element(page, "reset").click()
    wait(page, lambda: idle(page), "Send to be enabled again after New chat")
    assert not messages(page, "user") and not messages(page, "assistant")
    fill(page, "max-tokens", "8")
    reply = reply_to(page, "Hello")  # not answered after the stopped story
    assert reply == api_reply(long_server, [user("Hello")], max_tokens=8)
    assert messages(page, "user") == ["Hello"] and messages(page, "assistant") == [reply]


def test_a_server_with_an_api_key_answers_once_the_key_is_typed(page, keyed_server):
    open_page(page, keyed_server, max_tokens="16", model_shown="API key")  # the header shows the 401's message
    say(page, "Hello")
    wait(page, lambda: messages(page, "error") and idle(page), "an error without the key")
    assert "API key" in messages(page, "error")[-1]
    # The failed message leaves the conversation and goes back to the box, to be sent again.
    assert not messages(page, "user") and not messages(page, "assistant")
    assert element(page, "input").get_attribute("value") == "Hello"
    fill(page, "key", API_KEY)
    reply = reply_to(page, "")  # Enter sends what the box holds
    assert reply == api_reply(keyed_server, [user("Hello")], max_tokens=16)
    assert element(page, "model").text == MODEL  # typing the key reloaded the model list
    page.refresh()  # the key is remembered (localStorage)
    wait(page, lambda: element(page, "model").text == MODEL, "the model name after a reload")
    assert element(page, "key").get_attribute("value") == API_KEY


def test_the_server_logs_have_no_traceback(driver, server, long_server, keyed_server):
    for s in (server, long_server, keyed_server):
        log = s.log_text()
        assert "chatcmpl-" in log and "Traceback" not in log, log
