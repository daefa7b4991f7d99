#!/usr/bin/env python
"""Screenshot of a dashboard in headless Chromium (Debian's chromium + chromedriver), for the README.

    python scripts/screenshot_dashboard.py demo_out/dashboard.html docs/dashboard.png --height 2400
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html")
    ap.add_argument("png")
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=2400)
    args = ap.parse_args(argv)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--window-size={args.width},{args.height}", "--hide-scrollbars"):
        opts.add_argument(a)
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    drv = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)
    try:
        drv.get(Path(args.html).resolve().as_uri())
        time.sleep(2)
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        drv.save_screenshot(args.png)
    finally:
        drv.quit()
    print(args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
