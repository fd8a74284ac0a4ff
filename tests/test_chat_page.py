"""The chat page in a real browser: headless Chromium loads it from a running gateway (the whole stack, through
the serve_stack fixture), asks a question, and sees the answer stream in.

Needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver); without them the test
fails, saying so, rather than skipping: a page nobody ever loaded is not tested."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,900"]
FIRST_CHUNKS_TIMEOUT_S = 120          # the first answer on CPU includes the prompt's prefill
ANSWER_TIMEOUT_S = 300
MAX_TOKENS = 48


def chromium_driver(profile_dir: Path):
    """A headless Chromium with a fresh profile, driven through the system's chromedriver (never downloaded)."""
    try:
        from selenium import webdriver
    except ImportError:
        pytest.fail("selenium is not installed (pip install selenium)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.fail("the chat page test needs Chromium and its driver, which are not installed: "
                    "apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile_dir}"]:
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def ask_through_the_page(base_url: str, api_key: str | None, profile_dir: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium_driver(profile_dir)
    try:
        browser.get(base_url + "/")
        assert "pagestream" in browser.title
        if api_key:
            key = browser.find_element(By.ID, "api-key")
            key.send_keys(api_key)
            browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
        # The page names the served model once /v1/models answered: the API is reachable from it.
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "model").text.strip())
        # Greedy and bounded, so the answers end in seconds on a CPU.
        browser.find_element(By.ID, "temperature").send_keys("0")
        browser.find_element(By.ID, "max-tokens").send_keys(str(MAX_TOKENS))

        for turn, question in enumerate(["What is the capital of France?", "And of Italy?"]):
            browser.find_element(By.ID, "input").send_keys(question)
            browser.find_element(By.ID, "send").click()
            answers = WebDriverWait(browser, 10).until(
                lambda b: (found := b.find_elements(By.CSS_SELECTOR, ".message.assistant")) and len(found) > turn
                and found)
            answer = answers[turn]
            # Streamed: the answer grows delta by delta (data-chunks counts the deltas appended).
            WebDriverWait(browser, FIRST_CHUNKS_TIMEOUT_S).until(
                lambda b: int(answer.get_attribute("data-chunks") or 0) >= 2
                or b.find_elements(By.CSS_SELECTOR, ".message.error"))
            WebDriverWait(browser, ANSWER_TIMEOUT_S).until(
                lambda b: answer.get_attribute("data-state") != "streaming")
            errors = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".message.error")]
            assert not errors, f"the page showed an error: {errors}"
            assert answer.get_attribute("data-state") == "done"
            assert int(answer.get_attribute("data-chunks")) >= 2, "the answer did not arrive as a stream"
            assert answer.text.strip(), "the answer is empty"

        users = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".message.user")]
        assert users == ["What is the capital of France?", "And of Italy?"]
    finally:
        browser.quit()


def test_chat_page_streams_an_answer(serve_stack, tmp_path):
    ask_through_the_page(serve_stack.base_url, serve_stack.api_key, tmp_path / "chromium-profile")
