"""The resume state beside a checkpoint's weights (aiayn.train.state, the trainer's Progress)."""

from __future__ import annotations

import json

import pytest

from aiayn.errors import UserError
from aiayn.train import train
from aiayn.train.state import list_checkpoints

from helpers import COPY_CONFIG, TINY, assert_same_final_state

OPTS = TINY + ["model.dropout=0.1", "train.batch_tokens=300", "train.save_every=2", "train.valid_every=2",
               "train.valid_bleu_sentences=5", "train.average_last=0"]


def edit_progress(checkpoint, **changes) -> None:
    file = checkpoint / "trainer_state.json"
    state = json.loads(file.read_text())
    state["progress"].update(changes)
    file.write_text(json.dumps(state))


def test_a_checkpoint_of_an_older_version_resumes_exactly(small_copy, tmp_path):
    """Checkpoints written before Progress lost its unused ``extra`` field (and before it counted
    patience on its own) store ``extra`` and lack the new fields: they resume, exactly."""
    reference = tmp_path / "reference"
    train(COPY_CONFIG, small_copy, reference, OPTS + ["train.max_updates=6"])
    out = tmp_path / "old"
    train(COPY_CONFIG, small_copy, out, OPTS + ["train.max_updates=4"])
    last = list_checkpoints(out)[-1]
    state = json.loads((last / "trainer_state.json").read_text())
    assert "extra" not in state["progress"]
    old = {k: v for k, v in state["progress"].items() if k in OLD_PROGRESS_FIELDS}
    state["progress"] = {**old, "extra": {}}
    (last / "trainer_state.json").write_text(json.dumps(state))
    assert train(COPY_CONFIG, small_copy, out, OPTS + ["train.max_updates=6"], resume=True).step == 6
    assert_same_final_state(out, reference)


# Progress as checkpoints stored it before `extra` went (git show ab0d845:src/aiayn/train/trainer.py)
OLD_PROGRESS_FIELDS = ("step", "skipped_total", "skipped_in_row", "overflow_total", "best_bleu", "best_step",
                       "bad_validations", "last_valid_step", "last_valid", "elapsed_s", "tokens_seen", "last_save_s",
                       "last_valid_s")


def test_an_unknown_progress_field_is_a_clear_error(small_copy, tmp_path):
    out = tmp_path / "run"
    train(COPY_CONFIG, small_copy, out, OPTS + ["train.max_updates=2"])
    edit_progress(list_checkpoints(out)[-1], from_the_future=1)
    with pytest.raises(UserError, match=r"trainer_state.json: unknown progress field\(s\) from_the_future"):
        train(COPY_CONFIG, small_copy, out, OPTS + ["train.max_updates=4"], resume=True)
