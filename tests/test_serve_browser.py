"""The attention explorer in a real browser: Debian's chromium, headless, driven by Playwright.

It loads the page from a real server on loopback (given a heads.json, as ``aiayn serve --heads``
would be), types a sentence, translates, and checks what is drawn: every heatmap cell has the
colour of its weight from /api/attention (so the picture is the right data, the right way round),
the layer picker opens on the layer that aligns best, hovering a token shades what it attends to,
the pickers switch kind, layer and head and show each head's role, the word-link view draws a line
for each link of the alignment, the n-best list picks the target, each line of the input is its
own sentence, a target and α of one's own are used, old results are dimmed while a request runs
and after an error, errors are shown, and the page fetches nothing from anywhere but the server.

`make setup` installs chromium with apt when it can (as root); elsewhere this test skips and
says why. Playwright launches the system's chromium (executable_path): it never downloads one.
"""

from __future__ import annotations

import json
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


# The copy model has 2+2 layers of 4 heads; its alignments are read from layer 2 (the last) by
# default, so the heads file's best layer, 1, is where the explorer must open.
ROLES = {kind: [[f"{kind[:3]} {layer + 1}.{head + 1}" for head in range(4)] for layer in range(2)]
         for kind in ("encoder", "decoder", "cross")}


@pytest.fixture(scope="module")
def server(copy_checkpoint, tmp_path_factory):
    heads = tmp_path_factory.mktemp("heads") / "heads.json"
    heads.write_text(json.dumps({"roles": ROLES, "alignment_best": {"layer": 1, "head": None, "aer": 0.3}}))
    engine = Engine(copy_checkpoint, ServeSettings(max_chars=60, heads=str(heads)))
    with BackgroundServer(create_app(engine)) as server:
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
    candidates = page.locator("#sentences li")
    assert candidates.count() == 4  # n-best defaults to the beam of 4
    assert page.text_content("#sentences li:first-child .cand-text") == sentence
    scores = [float(t.split()[1]) for t in page.locator(".cand-score").all_text_contents()]
    assert scores == sorted(scores, reverse=True)

    answer = httpx2.post(server.url + "/api/attention", json={"src": sentence, "tgt": sentence}, timeout=30).json()
    weights = {kind: value["weights"] for kind, value in answer["attention"].items()}
    # It opens on the layer that aligns best (alignment_best of the heads file), not the default one (2).
    assert page.input_value("#layer") == "0" and "aligns best (AER 0.30)" in page.text_content("#layer option:checked")
    assert_drawn(page, weights, "cross", 0, "mean")

    # The word links: a line for each link of the alignment, source word above, target word below.
    alignment = answer["alignment"]
    page.wait_for_selector(f'#links[data-links="{len(alignment["links"])}"]')
    drawn = page.eval_on_selector_all("#links line.link", "els => els.map(e => [Number(e.dataset.src), Number(e.dataset.tgt)])")
    assert sorted(drawn) == sorted(alignment["links"]) and len(drawn) == len(sentence.split())
    assert page.eval_on_selector_all("#links text.word.src", "els => els.map(e => e.textContent)") == alignment["src_words"]
    assert page.eval_on_selector_all("#links text.word.tgt", "els => els.map(e => e.textContent)") == alignment["tgt_words"]
    for line in page.eval_on_selector_all("#links line.link", "els => els.map(e => [e.y1.baseVal.value, e.y2.baseVal.value])"):
        assert line[0] < line[1]  # from the source line down to the target line
    # Hovering a target word highlights its link and the source word it links to.
    i, j = alignment["links"][2]
    page.hover(f'#links text.word.tgt[data-index="{j}"]')
    active = page.eval_on_selector_all("#links line.link.active", "els => els.map(e => [Number(e.dataset.src), Number(e.dataset.tgt)])")
    assert active == [[i, j]]
    assert "active" in page.get_attribute(f'#links text.word.src[data-index="{i}"]', "class")
    page.hover("#translate")
    assert page.locator("#links line.link.active").count() == 0

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

    # Kind, layer and head pickers, each head with its role; the masked decoder attention.
    page.click('#kind-tabs [data-kind="decoder"]')
    assert_drawn(page, weights, "decoder", 0, "mean")
    page.select_option("#layer", "1")
    assert_drawn(page, weights, "decoder", 1, "mean")
    page.select_option("#layer", "0")
    page.select_option("#head", "2")
    assert_drawn(page, weights, "decoder", 0, 2)
    assert page.text_content("#head option:checked") == "3 of 4 · dec 1.3"
    assert page.text_content("#head-role") == "role: dec 1.3"
    page.click('#kind-tabs [data-kind="encoder"]')
    assert_drawn(page, weights, "encoder", 0, 2)
    assert page.text_content("#head-role") == "role: enc 1.3"
    assert "enc 1.4" in page.text_content('#heads-strip .thumb[data-head="3"]')
    page.click('#heads-strip .thumb[data-head="mean"]')
    assert_drawn(page, weights, "encoder", 0, "mean")
    assert page.input_value("#head") == "mean" and page.locator("#head-role").is_hidden()

    # Another candidate of the n-best list becomes the target of the attention.
    second = page.text_content("#sentences li:nth-child(2) .cand-text")
    assert second != sentence
    page.click("#sentences li:nth-child(2)")
    page.wait_for_function("([s]) => document.getElementById('attention-panel').dataset.tgt === s", arg=[second])
    assert "selected" in page.get_attribute("#sentences li:nth-child(2)", "class")
    page.click('#kind-tabs [data-kind="cross"]')
    page.wait_for_selector(f'#heatmap-canvas[data-rows="{len(second.split()) + 1}"][data-view="cross:0:mean"]')
    links = httpx2.post(server.url + "/api/attention", json={"src": sentence, "tgt": second}, timeout=30).json()
    page.wait_for_selector(f'#links[data-links="{len(links["alignment"]["links"])}"]')


def test_explorer_lines_target_alpha_width_and_dimming(page, server):
    page.goto(server.url + "/")
    page.wait_for_function("() => document.getElementById('model-info').textContent.includes('copy → copy')")

    # Each line is its own sentence (a blank line is none), with its own translations.
    page.fill("#source", "a b c\n\n  d e f g  ")
    page.press("#source", "Enter")
    page.wait_for_selector("#heatmap-canvas[data-view]")
    sentences = page.locator("#sentences .sentence")
    assert sentences.count() == 2
    assert page.locator(".sentence-src").all_text_contents() == ["1. a b c", "2. d e f g"]
    assert [sentences.nth(k).locator("li").count() for k in range(2)] == [4, 4]
    assert [sentences.nth(k).locator("li .cand-text").first.text_content() for k in range(2)] == ["a b c", "d e f g"]
    # Any candidate of any sentence can be shown.
    pick = sentences.nth(1).locator("li").nth(1)
    text = pick.locator(".cand-text").text_content()
    pick.click()
    page.wait_for_function("([t]) => { const d = document.getElementById('attention-panel').dataset; "
                           "return d.tgt === t && d.sentence === '1' && d.index === '1'; }", arg=[text])
    page.wait_for_selector('#heatmap-canvas[data-cols="5"]')  # d e f g </s>

    # A target of one's own (line 2 for source line 2) is listed first for its sentence and shown.
    page.fill("#source", "a b c\nd e f")
    page.fill("#target", "\nf e d d")
    page.press("#target", "Enter")
    page.wait_for_function("() => document.getElementById('attention-panel').dataset.tgt === 'a b c'")
    mine = page.locator('#sentences li[data-sentence="1"][data-index="target"]')
    assert mine.locator(".cand-text").text_content() == "f e d d" and "your target" in mine.text_content()
    mine.click()
    page.wait_for_function("() => document.getElementById('attention-panel').dataset.tgt === 'f e d d'")
    page.wait_for_selector('#heatmap-canvas[data-rows="5"][data-cols="4"]')
    page.wait_for_selector('#links[data-links="4"]')
    page.fill("#target", "")

    # α is sent: with α = 0 the score is log P itself.
    page.fill("#alpha", "0")
    page.fill("#source", "a b c d")
    page.press("#source", "Enter")
    page.wait_for_function("() => document.getElementById('attention-panel').dataset.tgt === 'a b c d'")
    for note in page.locator(".cand-score").all_text_contents():
        score, log_p = note.split()[1], note.split()[-1]
        assert score == log_p, note

    # A long sentence: the heatmap takes the width there is, not a fixed one.
    long = " ".join(("abcdefghijklmnopqrst" * 2)[:29])  # 29 of the copy task's words, 57 characters
    page.fill("#source", long)
    page.press("#source", "Enter")
    page.wait_for_selector('#heatmap-canvas[data-cols="30"]')
    widths = page.evaluate("""() => ({canvas: document.getElementById("heatmap-canvas").clientWidth,
                                      labels: document.getElementById("row-labels").offsetWidth,
                                      wrap: document.getElementById("heatmap-wrap").clientWidth})""")
    assert widths["canvas"] > 800 and widths["canvas"] + widths["labels"] <= widths["wrap"] + 1, widths
    assert widths["canvas"] + widths["labels"] >= widths["wrap"] - 60, widths

    # Old results are dimmed while a request runs: hold the next translation until checked.
    held = []
    page.route("**/api/translate", lambda route: held.append(route))
    page.fill("#source", "e f g")
    page.press("#source", "Enter")
    page.wait_for_function("() => document.getElementById('results').classList.contains('stale') && "
                           "document.getElementById('attention-panel').classList.contains('stale')")
    assert len(held) == 1
    held[0].continue_()
    page.unroute("**/api/translate")
    page.wait_for_function("() => document.getElementById('attention-panel').dataset.tgt === 'e f g' && "
                           "!document.getElementById('results').classList.contains('stale') && "
                           "!document.getElementById('attention-panel').classList.contains('stale')")
    # ... and after an error, until new results arrive.
    page.fill("#source", "a " * 40)
    page.press("#source", "Enter")
    page.wait_for_function("() => document.getElementById('error').textContent.includes('the limit is 60')")
    assert "stale" in page.get_attribute("#results", "class")
    assert "stale" in page.get_attribute("#attention-panel", "class")
    page.fill("#source", "a b")
    page.press("#source", "Enter")
    page.wait_for_function("() => document.getElementById('attention-panel').dataset.tgt === 'a b' && "
                           "!document.getElementById('results').classList.contains('stale')")
    assert "stale" not in page.get_attribute("#attention-panel", "class")
