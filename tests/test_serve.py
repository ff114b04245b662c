"""`aiayn serve`'s API through FastAPI's test client, on the copy-task model (whose answers are
known exactly) and a random model with a short position table; and the command line."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi", reason="aiayn serve needs the serve extra (fastapi, uvicorn)")

import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from aiayn.alignment import AlignmentSettings, align_ids  # noqa: E402
from aiayn.attention import attention_maps  # noqa: E402
from aiayn.cli import main  # noqa: E402
from aiayn.config import SearchConfig  # noqa: E402
from aiayn.errors import UserError  # noqa: E402
from aiayn.serve.app import create_app  # noqa: E402
from aiayn.serve.engine import Engine, ServeSettings  # noqa: E402
from aiayn.serve.server import is_loopback  # noqa: E402
from aiayn.translator import Translator  # noqa: E402

from helpers import BYTE_PIECE_OUTPUT, BYTE_PIECE_TEXT  # noqa: E402

# fp32: the exactness checks below compare with the fp32 model (auto is bf16 on CPUs that have it).
SETTINGS = dict(max_lines=8, max_chars=200, max_beam=6, precision="fp32")


@pytest.fixture(scope="module")
def engine(copy_checkpoint):
    return Engine(copy_checkpoint, ServeSettings(**SETTINGS))


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine)) as client:
        yield client


def post(client, path, body):
    response = client.post(path, json=body)
    return response.status_code, response.json()


# -- /api/translate ------------------------------------------------------------------------------


def test_translate_one_sentence_and_a_list(client):
    assert post(client, "/api/translate", {"text": "a b c d e"}) == (200, {"translations": ["a b c d e"]})
    lines = ["f g h", "", "  i   j  ", "k l m n o p q r s"]
    status, body = post(client, "/api/translate", {"text": lines})
    # Blank lines answer blank; input is cleaned (NFC, single spaces) as `aiayn translate` does.
    assert status == 200 and body == {"translations": ["f g h", "", "i j", "k l m n o p q r s"]}
    assert post(client, "/api/translate", {"text": "a b c", "beam": 1}) == (200, {"translations": ["a b c"]})


def test_nbest_answers_have_the_translators_scores(client, copy_checkpoint):
    status, body = post(client, "/api/translate", {"text": ["a b c d", "e f"], "beam": 4, "nbest": 3})
    assert status == 200
    expected = Translator(copy_checkpoint, search=SearchConfig(beam=4), precision="fp32").translate_nbest(["a b c d", "e f"], nbest=3)
    assert len(body["translations"]) == 2
    for got, want in zip(body["translations"], expected):
        assert [c["text"] for c in got] == [t.text for t in want]
        assert [c["score"] for c in got] == pytest.approx([t.score for t in want], abs=1e-5)
        assert [c["log_prob"] for c in got] == pytest.approx([t.log_prob for t in want], abs=1e-5)
        assert [c["score"] for c in got] == sorted((c["score"] for c in got), reverse=True)
    assert body["translations"][0][0]["text"] == "a b c d"


RAW = "raw"  # marks a body sent as bytes, not as JSON


@pytest.mark.parametrize("body, status, message", [
    ((RAW, b'{"text": "a b'), 400, "malformed JSON at character"),
    ((RAW, b"[1, 2]"), 422, "must be a JSON object"),
    ((RAW, b"null"), 422, "must be a JSON object"),
    ({}, 422, "text is required"),
    ({"txt": "a b"}, 422, "unknown field 'txt'"),
    ({"text": 5}, 422, "text: must be a string or a list of strings"),
    ({"text": ["a", 3]}, 422, "text: must be a string or a list of strings"),
    ({"text": "a", "beam": "4"}, 422, "beam: Input should be a valid integer"),
    ({"text": "a", "beam": 2.5}, 422, "beam: Input should be a valid integer"),
    ({"text": "a", "nbest": True}, 422, "nbest: Input should be a valid integer"),
    ({"text": "a", "beam": 0}, 422, "beam must be between 1 and 6 (got 0)"),
    ({"text": "a", "beam": 7}, 422, "beam must be between 1 and 6 (got 7)"),
    ({"text": "a", "beam": 2, "nbest": 3}, 422, "nbest must be between 1 and the beam size 2 (got 3)"),
    ({"text": "a", "nbest": 0}, 422, "nbest must be between 1"),
    ({"text": ""}, 422, "text is empty"),
    ({"text": " \t "}, 422, "text is empty"),
    ({"text": []}, 422, "text is an empty list"),
    ({"text": ["", "  "]}, 422, "every line of text is empty"),
    ({"text": ["a"] * 9}, 413, "text has 9 lines; the limit is 8"),
    ({"text": "a" * 201}, 413, "text has 201 characters; the limit is 200"),
    ({"text": ["a", "b" * 201]}, 413, "line 2 of text has 201 characters"),
])
def test_bad_translate_requests_get_a_clear_4xx(client, body, status, message):
    if isinstance(body, tuple):
        response = client.post("/api/translate", content=body[1], headers={"Content-Type": "application/json"})
    else:
        response = client.post("/api/translate", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_bodies_that_are_not_json_or_too_large_are_refused(client, engine):
    response = client.post("/api/translate", content=b'{"text": "a"}', headers={"Content-Type": "text/plain"})
    assert response.status_code == 415 and "Content-Type: application/json" in response.json()["error"]
    huge = json.dumps({"text": "a" * (engine.settings.max_body_bytes + 1)}).encode()
    response = client.post("/api/translate", content=huge, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "over the limit" in response.json()["error"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"text": "'
        for _ in range(engine.settings.max_body_bytes // 1000 + 1):
            yield b"a" * 1000
        yield b'"}'

    response = client.post("/api/translate", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "over the limit" in response.json()["error"]
    assert client.get("/api/nowhere").json() == {"error": "Not Found"}
    assert client.get("/api/translate").status_code == 405


def test_the_body_limit_admits_every_request_within_the_line_limits(copy_checkpoint):
    # The worst case per character: json.dumps writes one outside the BMP as two escapes, 12
    # bytes ("\\ud83d\\ude00"), and Python counts it as one character. The request, at
    # the default limits: 64 lines of 1,000, with every other field.
    settings = ServeSettings()
    worst = {"text": ["😀" * settings.max_chars] * settings.max_lines, "beam": settings.max_beam,
             "alpha": 0.123456789, "nbest": settings.max_beam}
    for dumps in (json.dumps, lambda body: json.dumps(body, indent=1)):
        assert len(dumps(worst).encode()) <= settings.max_body_bytes
    attention = {"src": "😀" * settings.max_chars, "tgt": "😀" * settings.max_chars, "beam": 8, "alpha": 0.6}
    assert len(json.dumps(attention).encode()) <= ServeSettings(max_lines=1).max_body_bytes
    # Through a server (smaller limits, the same arithmetic): the body passes, the lines are
    # within max_chars, so the request is translated.
    small = ServeSettings(max_lines=32, max_chars=40, beam=1, max_beam=2)
    with TestClient(create_app(Engine(copy_checkpoint, small))) as client:
        def send(body):
            return client.post("/api/translate", content=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})

        response = send({"text": ["😀" * 40] * 32, "beam": 1, "alpha": 0.6, "nbest": 1})
        assert response.status_code == 200, response.text
        assert len(response.json()["translations"]) == 32
        # One emoji more is over the characters' limit (counted as characters), not the body's.
        response = send({"text": ["😀" * 40] * 31 + ["😀" * 41], "beam": 1})
        assert response.status_code == 413
        assert response.json()["error"] == "line 32 of text has 41 characters; the limit is 40"


@pytest.mark.parametrize("path, raw, field", [
    ("/api/translate", b'{"text": "\\ud800x"}', "text"),
    ("/api/translate", b'{"text": ["a b", "c \\udfff"]}', "text"),
    ("/api/translate", b'{"text": "a \\ud83d"}', "text"),  # the first half of a pair, alone
    ("/api/attention", b'{"src": "a\\ud800"}', "src"),
    ("/api/attention", b'{"src": "a b", "tgt": "\\udc00"}', "tgt"),
])
def test_a_lone_surrogate_is_a_422_naming_the_field(client, caplog, path, raw, field):
    """Valid JSON that is not valid Unicode: a client's mistake, not the server's."""
    with caplog.at_level(logging.WARNING):
        response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error.startswith(f"{field}: not valid Unicode") and "lone surrogate" in error, error
    if b"[" in raw:
        assert "line 2" in error
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    # A pair of halves is one character, and fine.
    assert post(client, "/api/translate", {"text": "a b 😀"})[0] == 200


def test_a_failing_batch_answers_500_and_the_server_keeps_serving(copy_checkpoint):
    engine = Engine(copy_checkpoint, ServeSettings(**SETTINGS))
    translate = engine.translate

    def faulty(key, lines):  # a bug that only some input triggers
        if any("t" in line for line in lines):
            raise RuntimeError("simulated failure")
        if any("s" in line for line in lines):
            raise UserError("simulated user error")
        return translate(key, lines)

    engine.translate = faulty
    with TestClient(create_app(engine)) as client:
        status, body = post(client, "/api/translate", {"text": "a t b"})
        assert status == 500 and body == {"error": "translation failed: RuntimeError: simulated failure"}
        status, body = post(client, "/api/translate", {"text": "a s b"})
        assert status == 422 and body == {"error": "simulated user error"}
        assert post(client, "/api/translate", {"text": "a b"}) == (200, {"translations": ["a b"]})
        health = client.get("/api/health").json()
        assert health["status"] == "ok" and health["failed_requests"] == 2


# -- /api/attention --------------------------------------------------------------------------------


def test_attention_of_the_models_own_translation(client, copy_checkpoint):
    status, body = post(client, "/api/attention", {"src": "a b c d e f"})
    assert status == 200
    assert body["translated"] is True and body["src"] == body["tgt"] == "a b c d e f"
    assert body["src_tokens"] == ["▁a", "▁b", "▁c", "▁d", "▁e", "▁f", "</s>"]
    assert body["tgt_tokens"] == body["src_tokens"] and body["tgt_inputs"] == ["<s>"] + body["src_tokens"][:-1]
    maps = attention_maps(copy_checkpoint, "a b c d e f", "a b c d e f")
    shapes = {"encoder": ("src_tokens", "src_tokens"), "decoder": ("tgt_tokens", "tgt_inputs"),
              "cross": ("tgt_tokens", "src_tokens")}
    for kind, (rows, cols) in shapes.items():
        got = body["attention"][kind]
        assert got["rows"] == body[rows] and got["columns"] == body[cols] and got["title"]
        weights = got["weights"]
        assert len(weights) == 2 and all(len(layer) == 4 for layer in weights)  # layers, heads
        want = maps.weights[kind]
        for layer in range(2):
            for head in range(4):
                matrix = weights[layer][head]
                assert len(matrix) == len(got["rows"]) and all(len(row) == len(got["columns"]) for row in matrix)
                for row, want_row in zip(matrix, want[layer, head].tolist()):
                    assert row == pytest.approx(want_row, abs=6e-5)  # rounded to 4 decimals
                    assert sum(row) == pytest.approx(1.0, abs=1e-3)
                    assert all(len(repr(p)) <= 6 for p in row), row  # 0.xxxx in the JSON, not 17 digits


def test_attention_of_the_translation_has_the_searchs_own_tokens(byte_piece_checkpoint):
    """The byte-piece model writes control characters in byte pieces, which its text shows as
    spaces: encoding that text again gives other subwords than those the model produced."""
    engine = Engine(byte_piece_checkpoint)
    tok = engine.checkpoint.tokenizer
    assert tok.pieces(tok.encode(BYTE_PIECE_TEXT)) != BYTE_PIECE_OUTPUT  # the case this test is about
    with TestClient(create_app(engine)) as client:
        status, body = post(client, "/api/attention", {"src": "the cat sat", "beam": 2})
        assert status == 200 and body["translated"] is True and body["tgt"] == BYTE_PIECE_TEXT
        assert body["tgt_tokens"] == BYTE_PIECE_OUTPUT + ["</s>"]
        assert body["tgt_inputs"] == ["<s>"] + BYTE_PIECE_OUTPUT
        ids = [tok.sp.piece_to_id(p) for p in BYTE_PIECE_OUTPUT]
        maps = attention_maps(engine.checkpoint, "the cat sat", tgt_ids=ids)
        cross = body["attention"]["cross"]["weights"]
        assert len(cross[0][0]) == len(ids) + 1
        for row, want in zip(cross[0][0], maps.weights["cross"][0, 0].tolist()):
            assert row == pytest.approx(want, abs=6e-5)
        # A given target is that text's own subwords.
        status, body = post(client, "/api/attention", {"src": "the cat sat", "tgt": BYTE_PIECE_TEXT})
        assert status == 200 and body["translated"] is False
        assert body["tgt_tokens"] == tok.pieces(tok.encode(BYTE_PIECE_TEXT)) + ["</s>"]


def test_a_candidates_tokens_give_the_attention_of_exactly_that_output(byte_piece_checkpoint):
    """The explorer's path: /api/translate with details gives each candidate's subword ids, and
    /api/attention with them as tgt_ids shows the weights of exactly that output (its text,
    encoded again, would be other subwords)."""
    engine = Engine(byte_piece_checkpoint)
    tok = engine.checkpoint.tokenizer
    ids = [tok.sp.piece_to_id(p) for p in BYTE_PIECE_OUTPUT]
    with TestClient(create_app(engine)) as client:
        status, body = post(client, "/api/translate", {"text": "the cat sat", "beam": 2, "details": True})
        assert status == 200
        (candidate,) = body["translations"][0]
        assert candidate["text"] == BYTE_PIECE_TEXT and candidate["tokens"] == ids
        assert set(candidate) == {"text", "score", "log_prob", "tokens"}
        status, plain = post(client, "/api/translate", {"text": "the cat sat", "beam": 2})
        assert plain["translations"] == [BYTE_PIECE_TEXT]  # without details: the text alone
        status, body = post(client, "/api/attention", {"src": "the cat sat", "tgt": candidate["text"],
                                                        "tgt_ids": candidate["tokens"]})
        assert status == 200 and body["tgt"] == BYTE_PIECE_TEXT and body["translated"] is False
        assert body["tgt_tokens"] == BYTE_PIECE_OUTPUT + ["</s>"]
        status, body = post(client, "/api/attention", {"src": "the cat sat", "tgt_ids": ids})
        assert status == 200 and body["tgt"] == BYTE_PIECE_TEXT  # the text of the ids
        for bad in ([tok.eos_id], [tok.vocab_size], [-1], [ids[0]] * (engine.max_subwords + 1)):
            status, body = post(client, "/api/attention", {"src": "the cat sat", "tgt_ids": bad})
            assert status == 422 and "tgt_ids" in body["error"], body
        status, body = post(client, "/api/attention", {"src": "the cat sat", "tgt_ids": ["a"]})
        assert status == 422


def test_attention_with_a_given_target(client):
    status, body = post(client, "/api/attention", {"src": "a b c", "tgt": "c  b"})
    assert status == 200 and body["translated"] is False and body["tgt"] == "c b"
    assert body["tgt_tokens"] == ["▁c", "▁b", "</s>"]
    cross = body["attention"]["cross"]["weights"]
    assert len(cross[0][0]) == 3 and len(cross[0][0][0]) == 4
    status, body = post(client, "/api/attention", {"src": "a b c", "tgt": ""})  # an empty translation
    assert status == 200 and body["tgt_tokens"] == ["</s>"]


@pytest.mark.parametrize("body, status, message", [
    ({"src": ""}, 422, "src is empty"),
    ({"src": 3}, 422, "src: Input should be a valid string"),
    ({"src": "a", "tgt": ["b"]}, 422, "tgt: Input should be a valid string"),
    ({"tgt": "a"}, 422, "src is required"),
    ({"src": "a" * 201}, 413, "src has 201 characters"),
    ({"src": "a", "tgt": "b" * 201}, 413, "tgt has 201 characters"),
    ({"src": "a", "beam": 9}, 422, "beam must be between 1 and 6"),
])
def test_bad_attention_requests_get_a_clear_4xx(client, body, status, message):
    response = client.post("/api/attention", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_a_source_longer_than_the_model_reads_is_a_422_before_any_search(random_checkpoint):
    # The random model has a learned position table of 64: at most 63 subwords. Both endpoints
    # refuse a longer source alike, naming it and the limit, instead of translating its start.
    engine = Engine(random_checkpoint)
    long = "the cat sat on the mat " * 20
    n = len(engine.checkpoint.tokenizer.encode(long.strip()))
    assert n > 63
    with TestClient(create_app(engine)) as client:
        status, body = post(client, "/api/translate", {"text": long})
        assert (status, body) == (422, {"error": f"text has {n} subwords; this model reads at most 63 (max_subwords)"})
        status, body = post(client, "/api/translate", {"text": ["the cat", long], "nbest": 2})
        assert status == 422 and body["error"].startswith(f"line 2 of text has {n} subwords")
        for request in ({"src": long}, {"src": long, "tgt": "a"}):
            status, body = post(client, "/api/attention", request)
            assert (status, body) == (422, {"error": f"src has {n} subwords; this model reads at most 63 (max_subwords)"})
        status, body = post(client, "/api/attention", {"src": "a", "tgt": long})
        assert status == 422 and body["error"].startswith(f"tgt has {n} subwords")
        health = client.get("/api/health").json()
        assert health["batches"] == 0 and health["failed_requests"] == 0  # refused before searching
        assert client.get("/api/info").json()["limits"]["max_subwords"] == 63
        status, body = post(client, "/api/attention", {"src": "the cat sat on the mat"})
        assert status == 200 and body["attention"]["cross"]["weights"]


# -- word alignments --------------------------------------------------------------------------------


def check_alignment(alignment: dict, src: str, tgt: str) -> None:
    """The shape every alignment must have: the words of each side, one in-range link per target
    word (none for an empty side), the Pharaoh line of exactly those links, soft rows summing to 1."""
    assert set(alignment) == {"src_words", "tgt_words", "pharaoh", "links", "soft"}
    assert alignment["src_words"] == src.split() and alignment["tgt_words"] == tgt.split()
    n_src, n_tgt = len(alignment["src_words"]), len(alignment["tgt_words"])
    links = [tuple(link) for link in alignment["links"]]
    assert all(0 <= i < n_src and 0 <= j < n_tgt for i, j in links), links
    assert sorted(j for _, j in links) == (list(range(n_tgt)) if n_src else [])  # one link per target word
    assert alignment["pharaoh"] == " ".join(f"{i}-{j}" for i, j in sorted(links, key=lambda link: (link[1], link[0])))
    soft = alignment["soft"]
    assert len(soft) == (n_tgt if n_src else 0) and all(len(row) == n_src for row in soft)
    for j, row in enumerate(soft):
        assert sum(row) == pytest.approx(1.0, abs=2e-3)
        assert row[dict((b, a) for a, b in links)[j]] == max(row)  # the link is the row's largest weight


def expected_alignment(engine, src: str, tgt_ids: list[int]) -> dict:
    """The alignment aiayn.alignment gives for the pair on the served model, default settings."""
    src_ids = engine.tokenizer.encode(src, "src")
    (alignment,) = align_ids(engine.translator.model, engine.tokenizer, [src_ids], [tgt_ids], AlignmentSettings())
    return alignment.to_dict()


def test_translate_with_alignment_gives_candidates_with_their_alignment(client, engine):
    lines = ["a b c d", "", "e  f g"]
    status, body = post(client, "/api/translate", {"text": lines, "nbest": 2, "alignment": True})
    assert status == 200 and len(body["translations"]) == 3
    for line, candidates in zip(lines, body["translations"]):
        for candidate in candidates:
            assert set(candidate) == {"text", "score", "log_prob", "tokens", "alignment"}
            check_alignment(candidate["alignment"], line, candidate["text"])
            # Teacher-forced on exactly the candidate's tokens against its (cleaned) source.
            want = expected_alignment(engine, " ".join(line.split()), candidate["tokens"])
            assert candidate["alignment"]["links"] == want["links"]
            assert len(candidate["alignment"]["soft"]) == len(want["soft"])
            for row, want_row in zip(candidate["alignment"]["soft"], want["soft"]):
                assert row == pytest.approx(want_row, abs=1e-4)
    assert body["translations"][0][0]["text"] == "a b c d"
    assert len(body["translations"][0][0]["alignment"]["links"]) == 4
    assert body["translations"][1][0]["alignment"]["links"] == []  # a blank line: nothing to link
    # nbest 1 and no details: still candidate objects, since the alignment needs a place.
    status, body = post(client, "/api/translate", {"text": "a b c", "alignment": True})
    assert status == 200
    (candidate,) = body["translations"][0]
    check_alignment(candidate["alignment"], "a b c", "a b c")
    # Without alignment the candidates have none (not even a null).
    status, body = post(client, "/api/translate", {"text": "a b c", "details": True})
    assert set(body["translations"][0][0]) == {"text", "score", "log_prob", "tokens"}
    status, body = post(client, "/api/translate", {"text": "a b c", "alignment": "yes"})
    assert status == 422 and body["error"].startswith("alignment: Input should be a valid boolean")
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert "word alignment" in schema["TranslateRequest"]["properties"]["alignment"]["description"]
    assert set(schema["WordAlignment"]["properties"]) == {"src_words", "tgt_words", "pharaoh", "links", "soft"}


def test_attention_answers_the_alignment_of_the_pair_shown(client, engine):
    status, body = post(client, "/api/attention", {"src": "a b c", "tgt": "c  b"})
    assert status == 200
    check_alignment(body["alignment"], "a b c", "c b")
    assert body["alignment"] == expected_alignment(engine, "a b c", engine.tokenizer.encode("c b", "tgt"))
    # The model's own translation, and an empty target (no links).
    status, body = post(client, "/api/attention", {"src": "a b c d"})
    assert status == 200
    check_alignment(body["alignment"], "a b c d", body["tgt"])
    status, body = post(client, "/api/attention", {"src": "a b c", "tgt": ""})
    assert status == 200 and body["alignment"]["links"] == [] and body["alignment"]["tgt_words"] == []


# -- /api/info, /api/health, docs, the explorer's files ---------------------------------------------


def test_info_names_the_model_without_server_paths(client, copy_checkpoint):
    response = client.get("/api/info")
    info = response.json()
    assert info["checkpoint"] == copy_checkpoint.name
    assert info["languages"] == {"src": "copy", "tgt": "copy"}
    assert info["vocab_size"] == 45 and info["lowercase"] is False and info["heads"] == 4 and info["layers"] == {"encoder": 2, "decoder": 2}
    assert info["model"]["d_model"] == 64 and info["parameters"] > 0 and info["step"] > 0
    assert info["limits"]["max_lines"] == 8 and info["limits"]["max_chars"] == 200 and info["limits"]["max_beam"] == 6
    assert info["search"] == {"beam": 4, "alpha": 0.6, "max_len_a": 1.0, "max_len_b": 50, "shortlist": False}
    # Alignments are read from the last layer by default: of two, the second.
    assert info["alignment"] == {"layer": 2, "head": None, "rows": "predicts"}
    assert info["roles"] is None and info["alignment_best"] is None  # no --heads
    # meta.json holds absolute run and data paths: none may appear.
    assert str(copy_checkpoint.parent) not in response.text and "/tmp" not in response.text


def heads_json(layers: int = 2, heads: int = 4, **changes) -> dict:
    """A heads.json as `aiayn heads` writes it, for the copy model (2+2 layers of 4 heads)."""
    data = {"format": "aiayn-heads", "version": 1,
            "roles": {kind: [[f"{kind}-{layer + 1}.{head + 1}" for head in range(heads)] for layer in range(layers)]
                      for kind in ("encoder", "decoder", "cross")},
            "alignment_best": {"layer": 2, "head": 3, "aer": 0.25}, "heads": []}
    data.update(changes)
    return data


def test_info_passes_on_the_roles_and_best_layer_of_a_heads_file(copy_checkpoint, tmp_path):
    path = tmp_path / "heads.json"
    path.write_text(json.dumps(heads_json()))
    engine = Engine(copy_checkpoint, ServeSettings(heads=str(path)))
    with TestClient(create_app(engine)) as client:
        info = client.get("/api/info").json()
    assert info["roles"] == heads_json()["roles"]
    assert info["alignment_best"] == {"layer": 2, "head": 3, "aer": 0.25}
    # Alignments are then read from the head that agreed best, and answers carry them.
    assert info["alignment"] == {"layer": 2, "head": 3, "rows": "predicts"}
    assert engine.alignment_settings == AlignmentSettings(layer=2, head=3)
    (src_ids,) = engine.tokenizer.encode_batch(["a b c"])
    (tgt_ids,) = engine.tokenizer.encode_batch(["c b"])
    (want,) = align_ids(engine.translator.model, engine.tokenizer, [src_ids], [tgt_ids], AlignmentSettings(layer=2, head=3))
    assert engine.align([src_ids], [tgt_ids]) == [want.to_dict()]
    assert str(tmp_path) not in json.dumps(info)  # no server paths
    # alignment_best may be absent (no reference alignments), or name a layer's mean (head null).
    path.write_text(json.dumps({"roles": heads_json()["roles"]}))
    info = Engine(copy_checkpoint, ServeSettings(heads=str(path))).info()
    assert info["alignment_best"] is None and info["alignment"] == {"layer": 2, "head": None, "rows": "predicts"}
    path.write_text(json.dumps(heads_json(alignment_best={"layer": 1, "head": None, "aer": 0.5})))
    assert Engine(copy_checkpoint, ServeSettings(heads=str(path))).info()["alignment_best"] == \
        {"layer": 1, "head": None, "aer": 0.5}


@pytest.mark.parametrize("content, message", [
    (None, "heads file not found"),
    ("{not json", "not JSON"),
    ("[]", 'it has no "roles" object'),
    (json.dumps(heads_json(format="aiayn-attention")), "its format is 'aiayn-attention', not 'aiayn-heads'"),
    (json.dumps({"roles": {"encoder": heads_json()["roles"]["encoder"]}}), "roles.decoder is not a list of layers"),
    (json.dumps(heads_json(layers=3)), "roles.encoder has 3 layer(s) of 4 head(s), but this model's encoder "
                                       "attention has 2 layer(s) of 4 heads"),
    (json.dumps(heads_json(heads=8)), "roles.encoder has 2 layer(s) of 8 head(s)"),
    (json.dumps(heads_json(alignment_best={"layer": 3, "head": None, "aer": 0.1})),
     "alignment_best.layer is 3, but this model's decoder has 2 layer(s)"),
    (json.dumps(heads_json(alignment_best={"layer": 1, "head": 5, "aer": 0.1})),
     "alignment_best.head is 5, not null or a head 1 ... 4"),
    (json.dumps(heads_json(alignment_best={"layer": 1, "head": 1, "aer": "low"})), "alignment_best.aer is 'low'"),
])
def test_a_bad_heads_file_is_a_one_line_error_naming_it(copy_checkpoint, tmp_path, capsys, content, message):
    path = tmp_path / "heads.json"
    if content is not None:
        path.write_text(content)
    with socket.socket() as busy:  # were the file taken, the command would stop at the busy port, not serve
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--checkpoint", str(copy_checkpoint), "--heads", str(path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"aiayn: error: {path}: ") and message in err and err.count("\n") == 1, err


def test_info_finds_the_languages_of_an_averaged_checkpoint(copy_checkpoint, tmp_path):
    from aiayn.train import average_checkpoints

    averaged = average_checkpoints([copy_checkpoint, copy_checkpoint], tmp_path / "avg")
    info = Engine(averaged).info()
    assert info["checkpoint"] == "avg" and info["languages"] == {"src": "copy", "tgt": "copy"}


def test_info_reads_only_the_checkpoints_own_meta(copy_checkpoint, tmp_path):
    """A checkpoint whose meta.json has no languages has none, even if it names another
    checkpoint that has them: the server reads no other directory."""
    other = tmp_path / "other"
    shutil.copytree(copy_checkpoint, other)
    bare = tmp_path / "bare"
    shutil.copytree(copy_checkpoint, bare)
    meta = json.loads((bare / "meta.json").read_text())
    del meta["languages"]
    meta["averaged_from"] = [str(other)]  # an old averaged checkpoint's list of its sources
    (bare / "meta.json").write_text(json.dumps(meta))
    assert json.loads((other / "meta.json").read_text())["languages"] == {"src": "copy", "tgt": "copy"}
    assert Engine(bare).info()["languages"] is None


def test_health_and_docs(client):
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["pending_lines"] == 0 and health["batches"] >= 1
    schema = client.get("/openapi.json").json()
    assert {"/api/translate", "/api/attention", "/api/info", "/api/health"} <= set(schema["paths"])
    assert "TranslateRequest" in schema["components"]["schemas"]
    assert client.get("/docs").status_code == 200


def test_the_explorer_is_served_with_a_self_only_policy(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for path in ("/static/explorer.js", "/static/explorer.css"):
        assert path in page.text and client.get(path).status_code == 200
    # No file outside the package's static folder is reachable.
    assert client.get("/static/../app.py").status_code == 404
    assert client.get("/static/%2e%2e/app.py").status_code == 404


def test_int8_server_translates(copy_checkpoint):
    with TestClient(create_app(Engine(copy_checkpoint, ServeSettings(quantize="int8")))) as client:
        assert post(client, "/api/translate", {"text": "a b c d"}) == (200, {"translations": ["a b c d"]})
        assert client.get("/api/info").json()["quantize"] == "int8"


def test_the_server_says_which_precision_it_runs_in(copy_checkpoint):
    """precision auto (the default) is resolved once, at start-up, and /api/info says both."""
    from aiayn.precision import resolve_precision

    with TestClient(create_app(Engine(copy_checkpoint, ServeSettings()))) as client:
        info = client.get("/api/info").json()
        assert (info["precision"], info["precision_setting"]) == (resolve_precision("auto", torch.device("cpu")), "auto")
        assert post(client, "/api/translate", {"text": "a b c d"}) == (200, {"translations": ["a b c d"]})
    with pytest.raises(UserError, match="unknown --precision 'fp8'"):
        ServeSettings(precision="fp8").check(name=lambda field: f"--{field}")


def test_a_server_with_a_shortlist_translates(copy_checkpoint, copy_dataset, tmp_path, capsys):
    from aiayn.data import load_dataset
    from aiayn.inference.shortlist import Shortlist

    path = tmp_path / "copy.shortlist.json"
    Shortlist.from_dataset(load_dataset(copy_dataset)).save(path)
    with TestClient(create_app(Engine(copy_checkpoint, ServeSettings(shortlist=str(path))))) as client:
        assert post(client, "/api/translate", {"text": "a b c d"}) == (200, {"translations": ["a b c d"]})
        assert client.get("/api/info").json()["search"]["shortlist"] is True
    assert main(["serve", "--checkpoint", str(copy_checkpoint), "--shortlist", str(tmp_path / "none.json")]) == 2
    assert "shortlist file not found" in capsys.readouterr().err


# -- the command line --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_settings_errors_name_the_field_and_the_command_names_the_flag(copy_checkpoint, capsys):
    for settings, message in [
        (ServeSettings(max_beam=0), "max_beam must be at least 1 (got 0)"),
        (ServeSettings(max_batch_lines=0), "max_batch_lines must be at least 1 (got 0)"),
        (ServeSettings(beam=9), "beam must be between 1 and max_beam 8 (got 9)"),
        (ServeSettings(alpha=-1.0), "alpha must be a number from 0 to 10 (got -1.0)"),
        (ServeSettings(alpha=float("nan")), "alpha must be a number from 0 to 10 (got nan)"),
        (ServeSettings(batch_wait_ms=-1), "batch_wait_ms must not be negative (got -1)"),
        (ServeSettings(quantize="int4"), "unknown quantize 'int4'; known: int8"),
        (ServeSettings(quantize="int8", device="cuda"), "quantize int8 runs on the CPU only (device cuda)"),
    ]:
        with pytest.raises(UserError) as error:
            settings.check()
        assert str(error.value) == message and "--" not in message
    for flags, message in [(["--max-batch-lines", "0"], "aiayn: error: --max-batch-lines must be at least 1 (got 0)"),
                           (["--alpha", "-1"], "aiayn: error: --alpha must be a number from 0 to 10 (got -1.0)")]:
        assert main(["serve", "--checkpoint", str(copy_checkpoint), *flags]) == 2
        assert capsys.readouterr().err.strip() == message  # one line


def test_serve_command_errors_are_one_line(copy_checkpoint, tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(copy_checkpoint), "--beam", "9"]) == 2
    assert "--beam must be between 1 and --max-beam 8 (got 9)" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(copy_checkpoint), "--max-lines", "0"]) == 2
    assert "--max-lines must be at least 1" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--checkpoint", str(copy_checkpoint), "--port", str(port)]) == 2
        assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err
        # Beyond loopback: a warning that the API has no authentication (the bind then fails
        # on the busy port, so nothing listens beyond loopback in this test).
        assert main(["serve", "--checkpoint", str(copy_checkpoint), "--host", "0.0.0.0", "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert "warning" in err and "no authentication" in err and "in use" in err


def test_serve_has_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--checkpoint", "--host", "--port", "--max-lines", "--max-chars", "--max-beam", "--batch-wait-ms"):
        assert flag in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "serve" in capsys.readouterr().out


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("no-such-host.invalid")
    if socket.has_ipv6:
        assert is_loopback("::1") and not is_loopback("::")


def test_serve_command_serves_until_interrupted(copy_checkpoint):
    """The real command: `aiayn serve --port 0` prints its URL, answers, and stops on Ctrl-C."""
    import httpx2

    process = subprocess.Popen([sys.executable, "-m", "aiayn", "serve", "--checkpoint", str(copy_checkpoint),
                                "--port", "0", "--no-access-log"], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        line = ""
        while "serving" not in line:
            assert time.monotonic() < deadline and process.poll() is None, f"server did not start: {line}"
            line = process.stderr.readline()
        url = line.split(" on ")[1].split("/ ")[0]
        assert url.startswith("http://127.0.0.1:")
        for _ in range(100):  # the socket listens already; uvicorn may need a moment to serve
            try:
                health = httpx2.get(url + "/api/health", timeout=5)
                break
            except httpx2.TransportError:
                time.sleep(0.1)
        assert health.json()["status"] == "ok"
        response = httpx2.post(url + "/api/translate", json={"text": ["a b", "c d e"]}, timeout=30)
        assert response.json() == {"translations": ["a b", "c d e"]}
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
