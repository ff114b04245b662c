"""Take the README's picture of the attention explorer (docs/serve-explorer.png).

    .venv/bin/python docs/serve_screenshot.py --checkpoint runs/demo/train/averaged \\
        --text "Inserts a breakpoint in the program line." [--heads runs/heads-demo/heads.json]

It serves the checkpoint on a free loopback port (aiayn.serve.BackgroundServer), opens the
explorer in headless Debian chromium through Playwright (the browser test's set-up), types the
sentence, translates, picks the layer and head, hovers one target token, and saves the page.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

# As in tests/test_serve_browser.py: headless, and no background connections (the network is closed).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--text", required=True, help="the sentence to translate")
    parser.add_argument("--kind", default="cross", choices=["cross", "encoder", "decoder"])
    parser.add_argument("--layer", type=int, help="layer to show, from 1 (default: the last)")
    parser.add_argument("--head", default="mean", help="'mean' or a head number from 1")
    parser.add_argument("--hover", type=int, default=2, help="target token to hover, from 1 (0: none)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "serve-explorer.png"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--heads", help="a heads.json of the checkpoint (aiayn heads): roles in the pickers")
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from aiayn.serve import BackgroundServer
    from aiayn.serve.app import create_app
    from aiayn.serve.engine import Engine, ServeSettings

    with BackgroundServer(create_app(Engine(args.checkpoint, ServeSettings(heads=args.heads)))) as server, \
            tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(profile, executable_path=args.chromium, headless=True,
                                                       args=CHROMIUM_FLAGS, viewport={"width": 1300, "height": 900})
        page = context.new_page()
        page.goto(server.url + "/")
        # A function, not an expression: an expression is polled with eval(), which the CSP refuses.
        page.wait_for_function("() => document.getElementById('model-info').textContent.includes('checkpoint')")
        page.fill("#source", args.text)
        page.press("#source", "Enter")
        page.wait_for_selector("#heatmap-canvas[data-view]", timeout=120_000)
        page.click(f'#kind-tabs [data-kind="{args.kind}"]')
        layers = page.locator("#layer option").count()
        layer = (args.layer or layers) - 1
        page.select_option("#layer", str(layer))
        head = "mean" if args.head == "mean" else str(int(args.head) - 1)
        page.select_option("#head", head)
        page.wait_for_selector(f'#heatmap-canvas[data-view="{args.kind}:{layer}:{head}"]')
        if args.hover:
            page.hover(f"#row-labels .tok:nth-child({args.hover})")
        page.screenshot(path=args.out, full_page=True)
        context.close()
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
