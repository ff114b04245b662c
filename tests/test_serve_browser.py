"""The attention explorer in a real browser: Debian's chromium, headless, driven by Playwright.

It loads the page from a real server on loopback, types a sentence, translates, and checks what
is drawn: every heatmap cell has the colour of its weight from /api/attention (so the picture is
the right data, the right way round), hovering a token shades what it attends to, the pickers
switch kind, layer and head, the n-best list picks the target, errors are shown, and the page
fetches nothing from anywhere but the server.

`make setup` installs chromium with apt when it can (as root); elsewhere this test skips and
says why. Playwright launches the system's chromium (executable_path): it never downloads one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="aiayn serve needs the serve extra (fastapi, uvicorn)")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is missing: pip install -e '.[dev]'")

import httpx2  # noqa: E402

from aiayn.serve import BackgroundServer  # noqa: E402
from aiayn.serve.app import create_app  # noqa: E402
from aiayn.serve.engine import Engine, ServeSettings  # noqa: E402

# Without the background-networking flags chromium tries to reach Google at start, which a
# closed network refuses; --headless etc. as the project's rules ask.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# The explorer's colour map (explorer.js), to compute the colour each weight must have.
VIRIDIS = [(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
           (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37)]


def viridis(v: float) -> tuple[int, int, int]:
    x = min(1.0, max(0.0, v)) * (len(VIRIDIS) - 1)
    i = min(len(VIRIDIS) - 2, int(x))
    t = x - i
    return tuple(round(a + t * (b - a)) for a, b in zip(VIRIDIS[i], VIRIDIS[i + 1]))


def find_chromium() -> str:
    for candidate in (shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.skip("Debian's chromium is not installed, and installing it needs root and apt "
                "(make setup runs: apt-get install --no-install-recommends chromium)")


@pytest.fixture(scope="module")
def server(copy_checkpoint):
    with BackgroundServer(create_app(Engine(copy_checkpoint, ServeSettings(max_chars=60)))) as server:
        yield server


@pytest.fixture()
def page(server, tmp_path):
    executable = find_chromium()
    requests, problems = [], []
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=executable, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1100, "height": 900})
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.on("request", lambda r: requests.append(r.url))
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        try:
            yield page
        finally:
            context.close()
    # Everything came from the server: no CDN, no fonts, nothing remote.
    assert requests and all(url.startswith(server.url) for url in requests), requests
    # The one error the browser logs is the 413 the test provokes on purpose.
    assert [p for p in problems if "status of 413" not in p] == [], problems


def cell_colours(page) -> list[list[tuple[int, int, int]]]:
    """The colour at the centre of every cell of the drawn heatmap."""
    return page.evaluate("""() => {
        const c = document.getElementById("heatmap-canvas");
        const ctx = c.getContext("2d"), cell = Number(c.dataset.cell), ratio = c.width / c.clientWidth;
        const out = [];
        for (let r = 0; r < Number(c.dataset.rows); r++) {
            const row = [];
            for (let k = 0; k < Number(c.dataset.cols); k++) {
                const d = ctx.getImageData(Math.floor((k + 0.5) * cell * ratio), Math.floor((r + 0.5) * cell * ratio), 1, 1).data;
                row.push([d[0], d[1], d[2]]);
            }
            out.push(row);
        }
        return out;
    }""")


def assert_drawn(page, weights, kind, layer, head):
    """The heatmap shows exactly weights[kind][layer][head] (or the mean of the heads)."""
    page.wait_for_selector(f'#heatmap-canvas[data-view="{kind}:{layer}:{head}"]')
    heads = weights[kind][layer]
    if head == "mean":
        matrix = [[sum(h[r][c] for h in heads) / len(heads) for c in range(len(heads[0][0]))]
                  for r in range(len(heads[0]))]
    else:
        matrix = heads[head]
    drawn = cell_colours(page)
    assert len(drawn) == len(matrix) and len(drawn[0]) == len(matrix[0])
    for r, row in enumerate(matrix):
        for c, weight in enumerate(row):
            want = viridis(weight)
            assert max(abs(a - b) for a, b in zip(drawn[r][c], want)) <= 3, (kind, layer, head, r, c, weight, drawn[r][c])


def test_explorer_translates_and_draws_the_attention(page, server):
    page.goto(server.url + "/")
    # Predicates are functions, not expressions: Playwright polls an expression with eval(),
    # which the page's Content-Security-Policy (script-src 'self') rightly refuses.
    page.wait_for_function("() => document.getElementById('model-info').textContent.includes('copy → copy')")

    # Errors are shown, from the page itself and from the server.
    page.click("#translate")
    assert page.locator("#error").is_visible() and "Type a sentence" in page.text_content("#error")
    page.fill("#source", "a " * 40)
    page.click("#translate")
    page.wait_for_function("() => document.getElementById('error').textContent.includes('the limit is 60')")

    sentence = "a b c d e f g"
    page.fill("#source", sentence)
    page.press("#source", "Enter")
    page.wait_for_selector("#heatmap-canvas[data-view]")
    assert page.locator("#error").is_hidden()
    candidates = page.locator("#nbest-list li")
    assert candidates.count() == 4  # n-best defaults to the beam of 4
    assert page.text_content("#nbest-list li:first-child .cand-text") == sentence
    scores = [float(t.split()[1]) for t in page.locator(".cand-score").all_text_contents()]
    assert scores == sorted(scores, reverse=True)

    weights = httpx2.post(server.url + "/api/attention", json={"src": sentence, "tgt": sentence},
                          timeout=30).json()["attention"]
    weights = {kind: value["weights"] for kind, value in weights.items()}
    assert_drawn(page, weights, "cross", 0, "mean")

    # Hovering a target token shades the source tokens by how much it attends to each.
    page.hover("#row-labels .tok:nth-child(4)")
    shaded = [float(v) for v in page.eval_on_selector_all("#col-labels .tok", "els => els.map(e => e.dataset.weight)")]
    mean_row = [sum(h[3][c] for h in weights["cross"][0]) / 4 for c in range(len(shaded))]
    assert shaded == pytest.approx(mean_row, abs=1e-3)
    assert "active" in page.get_attribute("#row-labels .tok:nth-child(4)", "class")
    # ... and hovering a source token shades the target tokens that attend to it.
    page.hover("#col-labels .tok:nth-child(2)")
    shaded = [float(v) for v in page.eval_on_selector_all("#row-labels .tok", "els => els.map(e => e.dataset.weight)")]
    assert shaded == pytest.approx([sum(h[r][1] for h in weights["cross"][0]) / 4 for r in range(len(shaded))], abs=1e-3)

    # Kind, layer and head pickers; the masked decoder attention is lower-triangular when drawn.
    page.click('#kind-tabs [data-kind="decoder"]')
    assert_drawn(page, weights, "decoder", 0, "mean")
    page.select_option("#layer", "1")
    page.select_option("#head", "2")
    assert_drawn(page, weights, "decoder", 1, 2)
    page.click('#kind-tabs [data-kind="encoder"]')
    assert_drawn(page, weights, "encoder", 1, 2)
    page.click('#heads-strip .thumb[data-head="mean"]')
    assert_drawn(page, weights, "encoder", 1, "mean")
    assert page.input_value("#head") == "mean"

    # Another candidate of the n-best list becomes the target of the attention.
    second = page.text_content("#nbest-list li:nth-child(2) .cand-text")
    assert second != sentence
    page.click("#nbest-list li:nth-child(2)")
    page.wait_for_function("([s]) => document.getElementById('attention-panel').dataset.tgt === s", arg=[second])
    assert "selected" in page.get_attribute("#nbest-list li:nth-child(2)", "class")
    page.click('#kind-tabs [data-kind="cross"]')
    page.wait_for_selector(f'#heatmap-canvas[data-rows="{len(second.split()) + 1}"][data-view="cross:1:mean"]')
