"""The web chat page (src/minillm/serve/static/index.html) in a real browser: headless Debian Chromium,
driven by selenium through /usr/bin/chromedriver, opens `/` on the real uvicorn server, types messages
and watches the replies stream in.

The page keeps its state in body[data-state] ("loading", "idle", "streaming", "error"), so the tests
wait on that instead of sleeping. The reference for every reply is the server's own non-streaming
answer at temperature 0 (a different code path from the page's SSE stream) for the same conversation.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
import torch

from minillm.checkpoint import save_run
from minillm.config import ModelConfig
from minillm.tokenizer.char import CharTokenizer
from minillm.torch.model import Transformer, model_params

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's headless browser: apt-get install chromium chromium-driver "
           "(/usr/bin/chromium and /usr/bin/chromedriver)")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the `serve` extra)")
serve_app = pytest.importorskip("minillm.serve.app", reason="needs the server's extra (fastapi, uvicorn)")
from selenium.webdriver.common.by import By  # noqa: E402  (after the skip: selenium is optional)
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

TEXT = "hello world. the quick brown fox jumps over the lazy dog. Where does Anne see the sea?\n"
MODEL, KEY = "tiny-char", "page-test-key"
# Records the length of the last reply's text at every change of the message list, so a test can
# tell a reply that grew token by token from one that appeared at once.
WATCH_REPLY = """
window.replyLengths = [];
new MutationObserver(() => {
  const replies = document.querySelectorAll('.msg.assistant .content');
  if (replies.length) window.replyLengths.push(replies[replies.length - 1].textContent.length);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module")
def web_run(tmp_path_factory) -> Path:
    """A random char model whose matrices are scaled up (peaked next-token distributions, so greedy
    replies do not hinge on rounding), with a 256-token context for a two-turn conversation. Its
    output head gives the special tokens logit 0 and the characters large ones, so a reply runs on
    instead of ending at once on <|eos|> (or any other stop token), as an untrained model's may."""
    tok = CharTokenizer().train(TEXT)
    config = ModelConfig(vocab_size=tok.vocab_size, max_seq_len=256, d_model=32, n_layers=2, n_heads=4,
                         tie_embeddings=False)
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
        model.lm_head.weight[sorted(tok.special_tokens.values())] = 0.0
    path = tmp_path_factory.mktemp("web") / MODEL
    save_run(path, config, tok, model_params(model))
    return path


@pytest.fixture(scope="module")
def server(web_run):
    base_url, stop = serve_app.run_in_thread(serve_app.create_app({MODEL: str(web_run)}, max_batch=4))
    yield base_url
    stop()


@pytest.fixture(scope="module")
def keyed_server(web_run):
    base_url, stop = serve_app.run_in_thread(serve_app.create_app({MODEL: str(web_run)}, api_key=KEY))
    yield base_url
    stop()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,700"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def state(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def open_page(driver, base_url: str, expect: str = "idle") -> None:
    driver.get(base_url + "/")
    WebDriverWait(driver, 30).until(lambda d: state(d) in ("idle", "error"))
    assert state(driver) == expect, driver.find_element(By.ID, "error").text


def set_temperature(driver, value: float) -> None:
    """A range input has no keyboard-free setter: set it and fire the event a user's drag fires."""
    driver.execute_script("const t = document.getElementById('temperature'); t.value = arguments[0];"
                          "t.dispatchEvent(new Event('input'));", str(value))
    assert driver.find_element(By.ID, "temperature-value").text == f"{value:.2f}"


def send(driver, text: str) -> str:
    """Types `text` + Enter, waits for the reply to finish; returns the last reply shown."""
    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    driver.find_element(By.ID, "input").send_keys(text + "\n")
    WebDriverWait(driver, 60).until(lambda d: state(d) in ("idle", "error")
                                    and len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) > before)
    assert state(driver) == "idle", driver.find_element(By.ID, "error").text
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")[-1].get_attribute("textContent")


def reference(base_url: str, messages: list[dict], max_tokens: int | None = None,
              key: str | None = None) -> str:
    """The server's non-streaming temperature-0 answer to the conversation (max_tokens None: the
    server's default, as the page's "auto")."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = dict(model=MODEL, messages=messages, temperature=0)
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    response = httpx.post(base_url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def free_slots(base_url: str) -> int:
    return httpx.get(base_url + "/health", timeout=10).json()["models"][MODEL]["free_slots"]


def test_page_streams_replies_and_keeps_the_conversation(server, browser, tmp_path):
    open_page(browser, server)
    models = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#model option")]
    assert models == [MODEL]  # filled from /v1/models
    set_temperature(browser, 0)
    browser.find_element(By.CSS_SELECTOR, "#max-tokens option[value='64']").click()
    browser.execute_script(WATCH_REPLY)
    question = "Where does Anne see the sea?"
    first = send(browser, question)
    assert first and first == reference(server, [{"role": "user", "content": question}], 64)
    # Streamed: the reply was shown at several lengths on its way to the full text.
    lengths = [n for n in browser.execute_script("return window.replyLengths") if n]
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths) and lengths[-1] == len(first), lengths
    # The second request carries the whole conversation, kept in the page.
    second = send(browser, "the fox")
    history = [{"role": "user", "content": question},
               {"role": "assistant", "content": first}, {"role": "user", "content": "the fox"}]
    assert second == reference(server, history, 64)
    shown = [e.get_attribute("textContent") for e in browser.find_elements(By.CSS_SELECTOR, ".msg .content")]
    assert shown == [m["content"] for m in history] + [second]
    shot = tmp_path / "web-chat.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("MINILLM_WEB_SCREENSHOT"):  # e.g. docs/images/web-chat.png
        shutil.copyfile(shot, os.environ["MINILLM_WEB_SCREENSHOT"])


def test_stop_and_new_chat_leave_the_page_usable(server, browser):
    open_page(browser, server)
    set_temperature(browser, 0)  # max tokens "auto": the reply may run to the end of the context
    full = reference(server, [{"role": "user", "content": "hello"}])
    browser.find_element(By.ID, "input").send_keys("hello\n")
    stop = browser.find_element(By.ID, "stop")
    if state(browser) == "streaming":
        stop.click()
    WebDriverWait(browser, 60).until(lambda d: state(d) == "idle")
    shown = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")
    # Whether the click came before the end or not, what is shown is a prefix of the full reply.
    assert not shown or full.startswith(shown[-1].get_attribute("textContent"))
    assert not stop.is_enabled() and browser.find_element(By.ID, "send").is_enabled()
    # Stopping closes the stream, and the server frees the request's batch row.
    WebDriverWait(browser, 30).until(lambda _: free_slots(server) == 4)
    browser.find_element(By.ID, "clear").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    # "New chat" in the middle of a reply (or just after it): the old stream must not leak into the new chat.
    browser.find_element(By.ID, "input").send_keys("hello\n")
    browser.find_element(By.ID, "clear").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == [] and state(browser) == "idle"
    assert send(browser, "the dog") == reference(server, [{"role": "user", "content": "the dog"}])
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg")) == 2


def test_server_errors_are_shown_readably(server, browser):
    open_page(browser, server)
    # A model the server does not have: 404 with an OpenAI error body, shown as one readable line.
    browser.execute_script("const m = document.getElementById('model');"
                           "m.add(new Option('no-such-model', 'no-such-model')); m.value = 'no-such-model';")
    browser.find_element(By.ID, "input").send_keys("hello\n")
    WebDriverWait(browser, 30).until(lambda d: state(d) == "error")
    error = browser.find_element(By.ID, "error").text
    assert error.startswith("Server error 404: ") and "no-such-model" in error and "[object" not in error
    # The failed question is undone and back in the input box, ready to resend.
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    assert browser.find_element(By.ID, "input").get_attribute("value") == "hello"


def test_api_key_is_asked_for_and_sent(keyed_server, browser):
    open_page(browser, keyed_server, expect="error")  # /v1/models answers 401 without the key
    assert "401" in browser.find_element(By.ID, "error").text
    key_field = browser.find_element(By.ID, "api-key")
    assert key_field.is_displayed()
    key_field.send_keys(KEY + "\t")  # leaving the field fires its change event: the page reloads the models
    WebDriverWait(browser, 30).until(lambda d: state(d) == "idle")
    set_temperature(browser, 0)
    reply = send(browser, "the lazy dog")
    assert reply == reference(keyed_server, [{"role": "user", "content": "the lazy dog"}], key=KEY)
