"""The documentation: the site builds, and the examples of README.md and docs/ work as written.

The conventions (docs/development.md, "The documentation check"):

- the site builds with ``mkdocs build --strict`` (broken links and anchors, pages left out of the
  navigation, API entries that name nothing: all fail), offline, and the README's links resolve;
- every ``aiayn`` line of a ``sh`` block is parsed by aiayn's own parser: flags, required
  options, values; ``--config NAME`` must name a shipped config and ``KEY=VALUE`` overrides must
  resolve against it; every ``make TARGET`` must be a Makefile target;
- every ``python`` block runs, on its own, in a scratch directory holding what the examples
  name (see `base_sandbox`), unless the line before it is ``<!-- no-test: why -->``;
- a ``sh`` block after ``<!-- test -->`` runs line by line in such a directory: ``aiayn`` lines
  in-process (`aiayn.cli.main`), other lines with bash. ``aiayn train`` and ``aiayn serve``
  lines are only parsed (minutes; forever); for ``train --out DIR`` a small random model is put
  at DIR/averaged, where the run would leave its model;
- what the pages quote from the code is the code's: every shipped config is in the training page's
  table, every quoted ``aiayn: error: override '...'`` line is the error that override gives, and
  the serving page's /api/info example shows the server's default limits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

PAGES = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])
SHELLS = {"sh", "bash", "shell", "console"}
TEST_MARK = "<!-- test -->"
NO_TEST = re.compile(r"<!--\s*no-test:\s*\S.*-->")
NOT_RUN = {"train", "serve", "demo"}  # parsed, never run here


@dataclasses.dataclass
class Block:
    page: Path
    line: int  # of the first line of code (1-based)
    lang: str
    code: str
    mark: str  # the line before the opening fence ("" if none)

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page that start at the left margin."""
    blocks, lines = [], page.read_text(encoding="utf-8").split("\n")
    i = 0
    while i < len(lines):
        fence = re.match(r"^(```+)\s*([\w+-]*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(fence.group(1))
                    and not lines[j].strip("`")), None)
        assert end is not None, f"{page}:{i + 1}: unclosed code fence"
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        blocks.append(Block(page, i + 2, fence.group(2).lower(), "\n".join(lines[i + 1:end]), before))
        i = end + 1
    return blocks


BLOCKS = [b for page in PAGES for b in fenced_blocks(page)]
PYTHON = [b for b in BLOCKS if b.lang == "python" and not NO_TEST.fullmatch(b.mark)]
SHELL = [b for b in BLOCKS if b.lang in SHELLS]
RUN_SHELL = [b for b in SHELL if b.mark == TEST_MARK]


def shell_lines(block: Block) -> list[tuple[int, str]]:
    """(line number, command) of each command of a shell block: continuations joined,
    comments and blank lines left out."""
    out, pending, start = [], "", 0
    for offset, raw in enumerate(block.code.split("\n")):
        if not pending:
            start = block.line + offset
        pending += raw.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip() and not pending.lstrip().startswith("#"):
            out.append((start, pending.strip()))
        pending = ""
    return out


def aiayn_argv(command: str) -> tuple[list[str], str | None, str | None, str | None] | None:
    """A command line that runs aiayn -> (its arguments, stdin text from `echo TEXT |`, `< FILE`,
    `> FILE`); None for any other command. Optional parts written `[--flag value]` count as given."""
    stdin_text = None
    if "|" in command:
        head, _, command = command.rpartition("|")
        words = shlex.split(head)
        if words[:1] != ["echo"]:
            return None
        stdin_text = " ".join(words[1:]) + "\n"
    words = [w.strip("[]") if w.startswith("[") or w.endswith("]") else w for w in shlex.split(command, comments=True)]
    words = [w for w in words if w]
    if words[:1] == ["torchrun"] and "-m" in words:
        at = words.index("-m")
        words = words[at + 1:]
    elif words[:1] and words[0].endswith("/python") and words[1:3] == ["-m", "aiayn"]:
        words = words[2:]
    if not words or Path(words[0]).name != "aiayn":
        return None
    argv, infile, outfile, i = [], None, None, 1
    while i < len(words):
        if words[i] in ("<", ">"):
            infile, outfile = (words[i + 1], outfile) if words[i] == "<" else (infile, words[i + 1])
            i += 2
            continue
        argv.append(words[i])
        i += 1
    return argv, stdin_text, infile, outfile


def shipped_config(name: str) -> Path:
    for folder in (REPO / "configs", REPO / "src" / "aiayn" / "configs"):
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    raise AssertionError(f"--config {name!r}: no shipped config of that name (configs/{name}.yaml); the docs "
                         "name configs, they do not give paths, so that the commands work from any directory")


def check_command(argv: list[str]):
    """aiayn's parser on ``argv`` (a failure names the problem), and a train command's config and
    overrides resolved as the trainer resolves them. Returns the parsed arguments."""
    from aiayn.cli import build_parser

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = build_parser().parse_args(argv)
    except SystemExit as e:
        if e.code == 0:  # --help
            return None
        raise AssertionError(f"aiayn {shlex.join(argv)}: {errors.getvalue().strip()}") from None
    if args.command == "train":  # the config and the overrides, resolved as the trainer does
        from aiayn.train.config import load_raw_config, resolve_config

        resolve_config(load_raw_config(shipped_config(args.config), list(args.overrides)), vocab_size=8000)
    return args


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", (REPO / "Makefile").read_text(encoding="utf-8"), re.M))


# -- the site ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built with --strict into a temporary directory (not site/)."""
    pytest.importorskip("mkdocs", reason="the docs extra is missing: pip install -c constraints.txt -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    return out


def test_the_site_builds_with_strict_checks(site):
    for page in ["index.html", "getting-started.html", "model.html", "reference/translator.html"]:
        assert (site / page).is_file(), page
    # The API reference was generated from the docstrings, not left empty.
    assert "translate_nbest" in (site / "reference" / "translator.html").read_text(encoding="utf-8")
    assert "label_smoothed_loss" in (site / "reference" / "train.html").read_text(encoding="utf-8")


def test_the_site_loads_nothing_from_elsewhere(site):
    remote = re.compile(r"<(?:script|link|img)\b[^>]*\b(?:src|href)=[\"'](?:https?:)?//", re.I)
    for page in site.rglob("*.html"):
        html = page.read_text(encoding="utf-8")
        assert "fonts.googleapis.com" not in html and "fonts.gstatic.com" not in html, page
        assert not remote.search(html), f"{page.relative_to(site)}: {remote.search(html).group(0)}"


def test_readme_links_resolve(site):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert links
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        assert (REPO / target).exists(), f"README.md links to {target}, which does not exist"
        if anchor:
            assert target.startswith("docs/") and target.endswith(".md"), link
            html = site / (target[len("docs/"):-len(".md")] + ".html")
            assert f'id="{anchor}"' in html.read_text(encoding="utf-8"), f"README.md: no #{anchor} in {target}"


def test_readme_stays_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines; the details belong in docs/"


def test_no_placeholders():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        found = re.search(r"\b(TODO|TBD|FIXME|XXX)\b", text)
        assert not found, f"{page.relative_to(REPO)}: {found.group(0)}"


# -- shell lines: parsed -----------------------------------------------------------------------


def test_the_conventions_find_examples():
    assert len(PYTHON) >= 8 and len(SHELL) >= 20 and len(RUN_SHELL) >= 6
    assert any(b.page.name == "README.md" for b in PYTHON) and any(b.page.name == "README.md" for b in RUN_SHELL)


@pytest.mark.parametrize("block", SHELL, ids=lambda b: b.name)
def test_shell_lines_parse(block):
    commands = 0
    for line, command in shell_lines(block):
        words = shlex.split(command, comments=True)
        if words[:1] == ["make"]:
            targets = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
            missing = set(targets) - make_targets()
            assert not missing, f"{block.page.name}:{line}: make {' '.join(sorted(missing))}: no such target"
            continue
        parsed = aiayn_argv(command)
        if parsed is None:
            assert not any(Path(w).name == "aiayn" for w in words), \
                f"{block.page.name}:{line}: an aiayn command in a form this check does not read: {command}"
            continue
        try:
            check_command(parsed[0])
        except AssertionError as e:
            raise AssertionError(f"{block.page.name}:{line}: {e}") from None
        except Exception as e:
            raise AssertionError(f"{block.page.name}:{line}: aiayn {shlex.join(parsed[0])}: {e}") from None
        commands += 1


# -- the scratch directory the examples run in -------------------------------------------------

WORDS = {"click": "klicken", "the": "die", "dialog": "dialog", "cells": "zellen", "select": "wählen", "close": "schließen",
         "open": "öffnen", "window": "fenster", "file": "datei", "new": "neue", "table": "tabelle", "red": "rote",
         "text": "text", "insert": "einfügen", "copy": "kopieren", "page": "seite", "button": "schaltfläche", "a": "eine",
         "and": "und", "to": "zu", "ok": "ok", "name": "name", "enter": "eingeben", "your": "ihren", "small": "kleine"}


def corpus_lines(n: int, seed: int) -> tuple[list[str], list[str]]:
    """n distinct English-like sentences and their word-by-word 'German': a tiny parallel corpus."""
    g, seen, src, tgt = random.Random(seed), set(), [], []
    words = sorted(WORDS)
    while len(src) < n:
        sentence = [g.choice(words) for _ in range(g.randint(3, 9))]
        if tuple(sentence) in seen:
            continue
        seen.add(tuple(sentence))
        src.append(" ".join(sentence).capitalize() + ".")
        tgt.append(" ".join(WORDS[w] for w in sentence).capitalize() + ".")
    return src, tgt


def write_corpus(root: Path) -> None:
    src, tgt = corpus_lines(1500, seed=5)
    (root / "corpus").mkdir()
    for name, lo, hi in (("train", 0, 1400), ("dev", 1400, 1450), ("test", 1450, 1500)):
        (root / "corpus" / f"{name}.en").write_text("".join(s + "\n" for s in src[lo:hi]), encoding="utf-8")
        (root / "corpus" / f"{name}.de").write_text("".join(t + "\n" for t in tgt[lo:hi]), encoding="utf-8")


def put_model(dataset: Path, out: Path) -> Path:
    """What ``aiayn train --data DATASET --out OUT`` leaves at OUT/averaged, in miniature: a small
    random model on the dataset's vocabulary that recommends the demo's search (beam 4, α 1.3)."""
    import torch

    from aiayn.checkpoint import save_checkpoint
    from aiayn.data import load_dataset
    from aiayn.model import Transformer, TransformerConfig

    data = load_dataset(dataset)
    torch.manual_seed(0)
    config = TransformerConfig(src_vocab_size=data.tokenizer.vocab_size, d_model=32, d_ff=64, n_heads=4,
                               n_encoder_layers=1, n_decoder_layers=1, max_positions=24)
    meta = {"step": 0, "languages": data.manifest["languages"],
            "search": {"beam": 4, "alpha": 1.3, "max_len_a": 1.0, "max_len_b": 50}}
    return save_checkpoint(out / "averaged", Transformer(config), dataset / "spm.model", meta)


@contextlib.contextmanager
def working_directory(path: Path):
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@pytest.fixture(scope="module")
def base_sandbox(tmp_path_factory) -> Path:
    """What the examples name: corpus/ (a small generated En-De corpus with dev and test sets),
    data/mine (prepared from it as the quick start does), and runs/mine/averaged and
    runs/demo/train/averaged (small random models on its vocabulary). Not configs/: the examples
    name configs, which works from any directory."""
    from aiayn.data import PrepareOptions, prepare_dataset

    root = tmp_path_factory.mktemp("docs-sandbox")
    write_corpus(root)
    with working_directory(root), contextlib.redirect_stdout(io.StringIO()):
        prepare_dataset(PrepareOptions(out="data/mine", src="corpus/train.en", tgt="corpus/train.de",
                               valid_src="corpus/dev.en", valid_tgt="corpus/dev.de",
                               test_src="corpus/test.en", test_tgt="corpus/test.de"))
    put_model(root / "data" / "mine", root / "runs" / "mine")
    shutil.copytree(root / "runs" / "mine" / "averaged", root / "runs" / "demo" / "train" / "averaged")
    return root


@pytest.fixture
def sandbox(base_sandbox, tmp_path) -> Path:
    """A fresh copy of `base_sandbox` for one block, which is also the working directory."""
    import torch

    root = tmp_path / "sandbox"
    shutil.copytree(base_sandbox, root, symlinks=True)
    threads = torch.get_num_threads()  # a config's train.num_threads sets them for the process
    try:
        with working_directory(root):
            yield root
    finally:
        torch.set_num_threads(threads)


# -- python blocks: run --------------------------------------------------------------------------


@pytest.mark.parametrize("block", PYTHON, ids=lambda b: b.name)
def test_python_block_runs(block, sandbox):
    # Padded so that a traceback names the page's own line numbers.
    code = compile("\n" * (block.line - 1) + block.code, str(block.page), "exec")
    exec(code, {"__name__": "__docs__"})


# -- marked shell blocks: run --------------------------------------------------------------------


def run_aiayn(argv: list[str], stdin_text: str | None, infile: str | None, outfile: str | None) -> tuple[int, str]:
    from aiayn.cli import main

    data = stdin_text.encode() if stdin_text is not None else Path(infile).read_bytes() if infile else b""
    stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
    stdout = open(outfile, "w", encoding="utf-8") if outfile else io.StringIO()
    errors = io.StringIO()
    saved = sys.stdin
    sys.stdin = stdin
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(errors):
            status = main(argv)
    finally:
        sys.stdin = saved
        if outfile:
            stdout.close()
    return status, errors.getvalue()


@pytest.mark.parametrize("block", RUN_SHELL, ids=lambda b: b.name)
def test_marked_shell_block_runs(block, sandbox):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for line, command in shell_lines(block):
        where = f"{block.page.relative_to(REPO)}:{line}: {command}"
        parsed = aiayn_argv(command)
        if parsed is None:
            run = subprocess.run(["bash", "-c", command], cwd=sandbox, env=env, capture_output=True, text=True,
                                 timeout=60)
            assert run.returncode == 0, f"{where}\nexit status {run.returncode}\n{run.stdout}{run.stderr}"
            continue
        argv = parsed[0]
        args = check_command(argv)
        if args is not None and args.command in NOT_RUN:
            if args.command == "train" and not (Path(args.out) / "averaged").exists():
                put_model(Path(args.data), Path(args.out))
            continue
        status, errors = run_aiayn(*parsed)
        assert status == 0, f"{where}\nexit status {status}\n{errors}"


# -- the API's examples --------------------------------------------------------------------------


def json_keys(text: str) -> set[str]:
    return set(re.findall(r'"(\w+)":', text))


def example_after(page: str, heading: str) -> str:
    blocks = fenced_blocks(REPO / "docs" / page)
    text = (REPO / "docs" / page).read_text(encoding="utf-8")
    line = text[:text.index(heading)].count("\n") + 1
    return next(b.code for b in blocks if b.line > line and b.lang == "json")


def test_serving_page_shows_the_apis_fields(base_sandbox):
    """The documented /api/info and /api/health examples have the fields the server answers with."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from aiayn.serve.app import create_app
    from aiayn.serve.engine import Engine

    with TestClient(create_app(Engine(base_sandbox / "runs" / "mine" / "averaged"))) as client:
        info, health = client.get("/api/info").json(), client.get("/api/health").json()
    documented = json_keys(example_after("serving.md", "### `GET /api/info`"))
    shown = set(info) | {k for part in ("languages", "layers", "search", "limits", "batching") for k in info[part]}
    assert shown <= documented, f"/api/info answers with {sorted(shown - documented)}, not in docs/serving.md"
    answered = shown | set(info["model"])
    assert documented <= answered, f"docs/serving.md shows {sorted(documented - answered)}, which /api/info lacks"
    text = (REPO / "docs" / "serving.md").read_text(encoding="utf-8")
    health_doc = json_keys(text[text.index("### `GET /api/health`"):text.index("### Errors")])
    assert set(health) == health_doc, f"/api/health: {sorted(health)} against docs/serving.md's {sorted(health_doc)}"


# -- what the pages quote from the code ------------------------------------------------------------


def test_every_shipped_config_is_in_the_training_pages_table():
    from aiayn.config import shipped_configs

    text = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    table = text[text.index("| config | what it is |"):]
    table = table[:table.index("\n\n")]
    named = set(re.findall(r"`([\w-]+)`", "\n".join(row.split("|")[1] for row in table.splitlines()[2:])))
    assert set(shipped_configs()) <= named, f"docs/training.md's config table lacks {sorted(set(shipped_configs()) - named)}"


QUOTED_OVERRIDE_ERROR = re.compile(r"aiayn: error: (override '([^']+)': .*)$")


def test_quoted_override_errors_are_the_ones_the_code_gives():
    """Each ``aiayn: error: override 'KEY=VALUE': ...`` line of a page's code blocks, against the
    error that override gives on a shipped config (an override's error names the override, not a
    file line: no page may promise FILE:LINE for it)."""
    from aiayn.errors import UserError
    from aiayn.train.config import load_raw_config, resolve_config

    quoted = [(b, m) for b in BLOCKS for line in b.code.splitlines() if (m := QUOTED_OVERRIDE_ERROR.search(line))]
    assert quoted, "no page quotes an override's error"
    for block, match in quoted:
        with pytest.raises(UserError) as caught:
            resolve_config(load_raw_config(shipped_config("libreoffice-small"), [match.group(2)]), vocab_size=8000)
        assert str(caught.value) == match.group(1), f"{block.name}: the code says {caught.value}"


def test_the_serving_pages_limits_are_the_servers_defaults():
    from aiayn.serve.engine import MAX_ALPHA, ServeSettings

    example = example_after("serving.md", "### `GET /api/info`")
    documented = {k: float(v) for k, v in re.findall(r'"(max_\w+|batch_wait_ms)": ([\d.]+)', example)}
    s = ServeSettings()
    defaults = {"max_lines": s.max_lines, "max_chars": s.max_chars, "max_beam": s.max_beam, "max_alpha": MAX_ALPHA,
                "max_body_bytes": s.max_body_bytes, "batch_wait_ms": s.batch_wait_ms,
                "max_batch_lines": s.max_batch_lines}
    for key, value in defaults.items():
        assert documented.get(key) == value, f"docs/serving.md: {key} {documented.get(key)}, the server's default {value}"
