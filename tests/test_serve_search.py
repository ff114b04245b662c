"""The search settings of `aiayn serve`: the checkpoint's recommended search is the default,
a request may choose its beam and alpha (checked), requests with different settings never share
a batch, and with a shortlist a request's answer does not depend on the requests batched with
it. On the copy-task model (conftest.py)."""

from __future__ import annotations

import json
import shutil
import threading

import pytest

pytest.importorskip("fastapi", reason="aiayn serve needs the serve extra (fastapi, uvicorn)")

from fastapi.testclient import TestClient  # noqa: E402

from aiayn.config import SearchConfig  # noqa: E402
from aiayn.errors import UserError  # noqa: E402
from aiayn.serve.app import create_app  # noqa: E402
from aiayn.serve.engine import Engine, ServeSettings  # noqa: E402
from aiayn.translator import Translator  # noqa: E402


def post(client, path, body):
    response = client.post(path, json=body)
    return response.status_code, response.json()


def texts(body) -> list[list[str]]:
    return [[c["text"] for c in line] for line in body["translations"]]


def scores(body) -> list[float]:
    """Every candidate's score, flat (pytest.approx compares flat lists)."""
    return [c["score"] for line in body["translations"] for c in line]


def expected_texts(translations) -> list[list[str]]:
    return [[t.text for t in line] for line in translations]


def expected_scores(translations) -> list[float]:
    return [t.score for line in translations for t in line]


def recording(engine: Engine) -> list[tuple]:
    """Record every batch the engine translates: (key, lines)."""
    calls, translate = [], engine.translate

    def record(key, lines):
        calls.append((key, list(lines)))
        return translate(key, lines)

    engine.translate = record
    return calls


def concurrently(client, requests: list[tuple[str, dict]]) -> list[tuple[int, dict]]:
    """Send the requests at once, each from its own thread; the answers in order."""
    answers: list = [None] * len(requests)

    def send(i, path, body):
        answers[i] = post(client, path, body)

    threads = [threading.Thread(target=send, args=(i, path, body)) for i, (path, body) in enumerate(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return answers


@pytest.fixture(scope="module")
def tuned_checkpoint(copy_checkpoint, tmp_path_factory):
    """The copy model, with a recommended search of its own in meta.json (as a recipe's
    search: section records it)."""
    path = tmp_path_factory.mktemp("tuned") / "tuned"
    shutil.copytree(copy_checkpoint, path)
    meta = json.loads((path / "meta.json").read_text())
    meta["search"] = {"beam": 3, "alpha": 1.3, "max_len_a": 1.5, "max_len_b": 20}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_the_default_search_is_the_checkpoints_own(tuned_checkpoint):
    lines = ["a b c d e f g h", "i j"]
    with TestClient(create_app(Engine(tuned_checkpoint))) as client:
        info = client.get("/api/info").json()
        assert info["search"] == {"beam": 3, "alpha": 1.3, "max_len_a": 1.5, "max_len_b": 20, "shortlist": False}
        status, body = post(client, "/api/translate", {"text": lines, "nbest": 3})
    assert status == 200
    want = Translator(tuned_checkpoint, search=SearchConfig(beam=3, alpha=1.3, max_len_a=1.5, max_len_b=20))
    expected = want.translate_nbest(lines, nbest=3)
    assert texts(body) == expected_texts(expected)
    assert scores(body) == pytest.approx(expected_scores(expected), abs=1e-5)
    # The server's settings replace the checkpoint's, one by one.
    info = Engine(tuned_checkpoint, ServeSettings(beam=2, alpha=0.2)).info()
    assert info["search"] == {"beam": 2, "alpha": 0.2, "max_len_a": 1.5, "max_len_b": 20, "shortlist": False}
    assert info["limits"]["max_beam"] == 8 and info["limits"]["max_alpha"] == 10
    # A recommended beam over the server's largest is refused at start-up, in the library's words.
    with pytest.raises(UserError, match=r"^the checkpoint's recommended beam 3 is over max_beam 2: choose a beam"):
        Engine(tuned_checkpoint, ServeSettings(max_beam=2))
    assert Engine(tuned_checkpoint, ServeSettings(beam=2, max_beam=2)).search.beam == 2


def test_a_request_chooses_its_alpha(copy_checkpoint):
    lines = ["a b c d e f", "g h i"]
    with TestClient(create_app(Engine(copy_checkpoint))) as client:
        got = {}
        for alpha in (0, 0.6, 2.5):
            status, body = post(client, "/api/translate", {"text": lines, "beam": 4, "alpha": alpha, "nbest": 4})
            assert status == 200, body
            got[alpha] = body
        status, body = post(client, "/api/attention", {"src": "a b c", "alpha": 2.5, "beam": 2})
        assert status == 200 and body["tgt"] == "a b c"
    translator = Translator(copy_checkpoint)
    for alpha, answer in got.items():
        expected = translator.translate_nbest(lines, nbest=4, search=SearchConfig(beam=4, alpha=alpha))
        assert texts(answer) == expected_texts(expected)
        assert scores(answer) == pytest.approx(expected_scores(expected), abs=1e-5)
    # The scores are the length penalty's: different alphas rank by different numbers.
    assert scores(got[0])[0] != pytest.approx(scores(got[2.5])[0], abs=1e-3)


RAW = "raw"


@pytest.mark.parametrize("path, body, message", [
    ("/api/translate", {"text": "a", "alpha": -0.1}, "alpha must be a number from 0 to 10 (got -0.1)"),
    ("/api/translate", {"text": "a", "alpha": 10.5}, "alpha must be a number from 0 to 10 (got 10.5)"),
    ("/api/translate", {"text": "a", "alpha": "0.6"}, "alpha: must be a number"),
    ("/api/translate", {"text": "a", "alpha": True}, "alpha: must be a number"),
    ("/api/translate", (RAW, b'{"text": "a", "alpha": NaN}'), "alpha must be a number from 0 to 10 (got nan)"),
    ("/api/translate", (RAW, b'{"text": "a", "alpha": Infinity}'), "alpha must be a number from 0 to 10 (got inf)"),
    ("/api/attention", {"src": "a", "alpha": -1}, "alpha must be a number from 0 to 10 (got -1.0)"),
])
def test_a_bad_alpha_is_a_422(copy_checkpoint, path, body, message):
    with TestClient(create_app(Engine(copy_checkpoint))) as client:
        if isinstance(body, tuple):
            response = client.post(path, content=body[1], headers={"Content-Type": "application/json"})
        else:
            response = client.post(path, json=body)
        assert response.status_code == 422, response.text
        assert response.json()["error"] == message
        assert client.get("/api/health").json()["batches"] == 0


def test_requests_with_different_settings_never_share_a_batch(copy_checkpoint):
    engine = Engine(copy_checkpoint, ServeSettings(batch_wait_ms=1500))
    calls = recording(engine)
    requests = [("/api/translate", {"text": "a b"}),  # the default search: beam 4, alpha 0.6
                ("/api/translate", {"text": "c d", "alpha": 0.6, "beam": 4}),  # the same, said out loud
                ("/api/translate", {"text": "e f", "alpha": 1.0}),
                ("/api/translate", {"text": "g h", "beam": 2}),
                ("/api/attention", {"src": "i j", "alpha": 1.0})]
    with TestClient(create_app(engine)) as client:
        answers = concurrently(client, requests)
    assert [status for status, _ in answers] == [200] * 5
    assert [body["translations"] for _, body in answers[:4]] == [["a b"], ["c d"], ["e f"], ["g h"]]
    default = engine.search
    batches = {key: sorted(lines) for key, lines in calls}
    assert batches == {(default, 1): ["a b", "c d"], (default.replace(alpha=1.0), 1): ["e f", "i j"],
                       (default.replace(beam=2), 1): ["g h"]}
    assert len(calls) == 3


def test_with_a_shortlist_a_request_does_not_depend_on_its_batch(copy_checkpoint, copy_dataset, tmp_path):
    """The sentences' candidates differ (a short shortlist), so a batch's union of candidates
    would change the scores of each (P is normalised over the candidates)."""
    from aiayn.data import load_dataset
    from aiayn.inference.shortlist import Shortlist

    shortlist = Shortlist.from_dataset(load_dataset(copy_dataset), frequent=2, per_source=2)
    path = tmp_path / "short.shortlist.json"
    shortlist.save(path)
    engine = Engine(copy_checkpoint, ServeSettings(shortlist=str(path), batch_wait_ms=1500))
    tok = engine.checkpoint.tokenizer
    one, other = "a b c d e", "p q r s t"
    assert shortlist.candidate_set(tok.encode(one)) != shortlist.candidate_set(tok.encode(other))
    calls = recording(engine)
    request = {"text": one, "beam": 4, "nbest": 3}
    with TestClient(create_app(engine)) as client:
        status, alone = post(client, "/api/translate", request)
        assert status == 200 and calls == [((engine.search, 3), [one])]
        answers = concurrently(client, [("/api/translate", request),
                                        ("/api/translate", {"text": [other, other], "beam": 4, "nbest": 3})])
    assert [status for status, _ in answers] == [200, 200]
    assert len(calls) == 2 and sorted(calls[1][1]) == [one, other, other]  # batched together
    # The same texts and the same scores (up to float rounding: a batch pads and sums in
    # another order; a union of candidates would move them by far more, see the docstring).
    batched = answers[0][1]
    assert texts(batched) == texts(alone) and scores(batched) == pytest.approx(scores(alone), abs=1e-5)
    assert texts(alone)[0][0] == one
