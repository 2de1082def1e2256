"""The README's screenshot of the web chat page (docs/images/web-chat.png): serves run directories
with minillm.serve, opens `/` in headless Chromium (Debian's /usr/bin/chromium + chromedriver, via
selenium), sends the messages one by one at temperature 0, waits for each streamed reply, and saves
the window.

    .venv/bin/python benchmarks/serve_screenshot.py      # runs/align-bench/sft, else the BPE base run
    .venv/bin/python benchmarks/serve_screenshot.py --run sft=runs/my-sft --message "Hello" --out /tmp/x.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import ROOT
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from minillm.commands.serve import parse_runs
from minillm.serve.app import create_app, run_in_thread

DEFAULT_RUNS = ["shakespeare-sft=runs/align-bench/sft", "shakespeare-bpe-base=runs/shakespeare-bpe-base"]
MESSAGES = ["Last word: Should die for ever.", "Last word: Now is the winter of our discontent"]


def chromium(width: int, height: int) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(arg)
    return webdriver.Chrome(service=webdriver.ChromeService("/usr/bin/chromedriver"), options=options)


def state(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", metavar="[NAME=]DIR",
                   help=f"runs to serve (default: those of {DEFAULT_RUNS} that exist)")
    p.add_argument("--message", action="append", help="messages to send, in order")
    p.add_argument("--out", type=Path, default=ROOT / "docs/images/web-chat.png")
    p.add_argument("--size", default="1000x640", help="window WIDTHxHEIGHT")
    args = p.parse_args()
    runs = parse_runs(args.run or [r for r in DEFAULT_RUNS if (ROOT / r.split("=")[1]).is_dir()])
    base_url, stop = run_in_thread(create_app({k: str(ROOT / v) for k, v in runs.items()}))
    driver = chromium(*map(int, args.size.split("x")))
    try:
        driver.get(base_url + "/")
        WebDriverWait(driver, 60).until(lambda d: state(d) == "idle")
        driver.execute_script("const t = document.getElementById('temperature'); t.value = 0;"
                              "t.dispatchEvent(new Event('input'));")
        for text in args.message or MESSAGES:
            driver.find_element(By.ID, "input").send_keys(text + "\n")
            WebDriverWait(driver, 120).until(lambda d: state(d) in ("idle", "error"))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        print(f"{args.out} ({state(driver)}): "
              + " | ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg .content")))
    finally:
        driver.quit()
        stop()


if __name__ == "__main__":
    main()
